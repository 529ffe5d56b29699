"""``manage.py audit_demo``: Loupe's main job, end to end, on whatever database and broker are set.

On the embedded default (SQLite, tasks in-process) it needs no servers:

1. migrates the database and creates the demo cast (a provider organisation with a submitter, two
   independent reviewers and an operator);
2. loads the reference models of the zoo (trained on the synthetic world, committed with checksums;
   ``--rebuild-zoo`` retrains them) and registers them with their model cards;
3. opens one case per reference model with the probe plan that suits it and runs every probe, with a
   progress bar per run:
   - the tiny CLIP: grounding faithfulness of every method, the randomisation sanity check,
     robustness, cross-modal attention and head ablation;
   - the "shortcut" CLIP (which learned a watermark instead of the object): the shortcut probe
     (TCAV with corrected significance, relevance on the watermark, add/remove the watermark);
   - the tiny LLaVA captioner: token attribution, attention statistics and feature swap;
4. records the two reviewers' sign-offs (approvals, and a rejection where the evidence flags a
   shortcut), issues the PDF report of every case (signed with a development issuer key, made on
   first use when no production key is configured), countersigns a copy as the two reviewers, verifies
   it, and prints what it did and where the files are.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from governance import pipeline, registration, workflow
from governance.console import RunBars
from governance.management.commands.create_user import new_password
from governance.models import AIModel, AuditCase, Membership, ModelVersion, Organisation

# name in the zoo -> (inventory name, risk category, intended purpose, case title, plan)
DEMO_MODELS: dict[str, dict[str, Any]] = {
    "tiny-clip": {
        "name": "Loupe reference CLIP",
        "purpose": "Zero-shot recognition of coloured shapes in synthetic scenes (a reference model with known "
                   "ground truth, used to validate Loupe's probes).",
        "title": "Grounding, robustness and attention audit of the reference CLIP",
        "plan": [
            {"kind": "grounding", "params": {"methods": "all", "limit": 48, "batch_size": 24, "steps": 16},
             "dataset": "zoo:heldout"},
            {"kind": "sanity", "params": {"method": "chefer", "limit": 32}, "dataset": "zoo:heldout-decoys"},
            {"kind": "robustness", "params": {"limit": 24, "severities": [1, 3, 5]}, "dataset": "zoo:heldout"},
            {"kind": "attention", "params": {"limit": 24}, "dataset": "zoo:heldout"},
            {"kind": "intervention", "params": {"kind": "head-ablation", "limit": 24}, "dataset": "zoo:heldout"},
        ],
    },
    "shortcut-clip": {
        "name": "Loupe shortcut CLIP",
        "purpose": "A deliberately flawed reference model: trained where a corner watermark almost always "
                   "accompanies red circles (after DeGrave et al. 2021). The audit must catch it.",
        "title": "Shortcut audit of the watermarked-data CLIP",
        "plan": [{"kind": "shortcut", "params": {"random_runs": 20}}],
    },
    "tiny-llava": {
        "name": "Loupe reference captioner",
        "purpose": "Describing synthetic scenes of coloured shapes in words (a LLaVA-style reference model).",
        "title": "Token attribution and intervention audit of the reference captioner",
        "plan": [
            {"kind": "token_attribution", "params": {"limit": 24}},
            {"kind": "attention", "params": {"limit": 16}},
            {"kind": "intervention", "params": {"kind": "feature-swap", "limit": 24}},
        ],
    },
}

CAST = {"provider": "submitter", "reviewer-1": "reviewer", "reviewer-2": "reviewer", "operator": "admin"}


class Command(BaseCommand):
    help = "Run Loupe's demo audit end to end: reference models, probes, sign-offs, reports."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--models", default=",".join(DEMO_MODELS),
                            help=f"comma-separated zoo models to audit (default: {','.join(DEMO_MODELS)})")
        parser.add_argument("--rebuild-zoo", action="store_true", help="retrain the reference models first")
        parser.add_argument("--no-report", action="store_true", help="skip the PDF reports")

    def handle(self, *args, **options) -> None:
        started = time.perf_counter()
        names = [n.strip() for n in options["models"].split(",") if n.strip()]
        unknown = sorted(set(names) - set(DEMO_MODELS))
        if unknown:
            raise CommandError(f"unknown demo models {unknown}; choose from {', '.join(DEMO_MODELS)}")
        self.say("1/4 database and demo cast")
        call_command("migrate", interactive=False, verbosity=0)
        self.credentials: list[tuple[str, str, str]] = []
        cast = self.cast()

        self.say("2/4 reference models")
        if options["rebuild_zoo"]:
            call_command_zoo_build()
        versions = {name: self.register(name, cast) for name in names}

        if not options["no_report"]:
            self.signing_keys()

        self.say("3/4 probe runs")
        summary = []
        for name, version in versions.items():
            spec = DEMO_MODELS[name]
            case = registration.create_case(version, submitter=cast["provider"], title=spec["title"],
                                            plan=spec["plan"], reviewers=[cast["reviewer-1"], cast["reviewer-2"]],
                                            assigned_by=cast["operator"],
                                            scope="Demo audit on the synthetic reference world.")
            workflow.submit(case, by=cast["provider"])
            self.stdout.write(f"case #{case.pk}: {case.title}")
            with RunBars(case.pk, self.stderr._out) as bars:
                pipeline.start_case(case.pk, by=cast["provider"])
                if not pipeline.broker_is_eager():
                    bars.poll_until_done()
            case.refresh_from_db()
            summary.append(self.review_and_report(case, cast, with_report=not options["no_report"]))

        self.say("4/4 summary")
        seconds = time.perf_counter() - started
        for item in summary:
            self.stdout.write(f"  case #{item['case']} [{item['state']}] {item['title']}")
            self.stdout.write(f"    runs: {item['succeeded']} succeeded, {item['failed']} failed; "
                              f"findings: {item['findings'] or 'none'}")
            for failure in item["failures"]:
                self.stdout.write(f"    FAILED run #{failure['run']} {failure['kind']}: {failure['error'][:200]}")
            if item.get("report"):
                self.stdout.write(f"    report v{item['report_version']}: {item['report']}")
                self.stdout.write(f"    {item['countersigned']}")
        out = Path(settings.VAR_DIR) / "demo-summary.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"seconds": round(seconds, 1), "cases": summary}, indent=2) + "\n")
        self.stdout.write(f"evidence and reports: {settings.MEDIA_ROOT}")
        self.stdout.write(f"summary: {out}")
        self.stdout.write(f"done in {seconds:.0f} s.")
        self.say("Browse it: `make serve`, then open http://127.0.0.1:8000/ and log in as")
        for username, role, password in self.credentials:
            where = "provider portal" if role == "submitter" else "review queue"
            self.stdout.write(f"  {username:<11} password {password}   ({role}; {where})")
        self.stdout.write("  (new passwords on every demo run; accounts of your own: manage.py create_user)")

    def say(self, text: str) -> None:
        self.stdout.write(self.style.MIGRATE_HEADING(text))

    # ----------------------------------------------------------------------------------------------

    @transaction.atomic
    def cast(self) -> dict[str, Any]:
        organisation, _ = Organisation.objects.get_or_create(
            slug="loupe-reference-lab", defaults={"name": "Loupe Reference Lab", "contact_email": "lab@loupe.invalid"})
        users: dict[str, Any] = {"organisation": organisation}
        for username, role in CAST.items():
            user, created = User.objects.get_or_create(username=username,
                                                       defaults={"email": f"{username}@loupe.invalid",
                                                                 "is_staff": role in ("admin", "reviewer", "auditor")})
            if created:
                user.groups.add(Group.objects.get(name=role))
                if role == "submitter":
                    Membership.objects.create(user=user, organisation=organisation)
            # A fresh password on every demo run, printed at the end: the demo's accounts are for
            # trying Loupe in a browser, and nobody can recover a password printed by an earlier run.
            password = new_password()
            user.set_password(password)
            user.save(update_fields=["password"])
            self.credentials.append((username, role, password))
            users[username] = user
        return users

    def register(self, name: str, cast: dict[str, Any]) -> ModelVersion:
        from workers.probes import zoo

        source = zoo.checkpoint_path(name)  # verifies the committed checksums
        manifest = (source / "SHA256SUMS").read_text(encoding="utf-8") if (source / "SHA256SUMS").is_file() else ""
        label = "zoo-" + _short_hash(manifest)
        spec = DEMO_MODELS[name]
        existing = ModelVersion.objects.filter(ai_model__name=spec["name"], version=label).first()
        if existing is not None:
            self.stdout.write(f"  {name}: already registered as version #{existing.pk}")
            return existing
        # Server-path versions must live below LOUPE_MODEL_ROOTS: copy the checkpoint there.
        target = Path(settings.LOUPE_MODEL_ROOTS[0]) / "zoo" / f"{name}-{label}"
        if not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, target)
        card = (target / "README.md").read_text(encoding="utf-8") if (target / "README.md").is_file() else None
        version = registration.register_directory(
            target, organisation=cast["organisation"], submitter=cast["provider"], name=spec["name"], version=label,
            card_text=card, risk_category=AIModel.RiskCategory.MINIMAL, intended_purpose=spec["purpose"],
            provider_contact="lab@loupe.invalid")
        version.refresh_from_db()
        self.attach_documents(version, spec, cast)
        self.stdout.write(f"  {name}: version #{version.pk} ({version.architecture_family}), "
                          f"manifest {version.manifest_hash[:16]}...")
        return version

    def attach_documents(self, version: ModelVersion, spec: dict[str, Any], cast: dict[str, Any]) -> None:
        """The provider's instructions for use, as a provider document (the other types stay missing,
        so the reports show both "supplied by the provider" and "not covered")."""
        import io

        from governance import provider_documents

        text = (f"# Instructions for use: {spec['name']}\n\n{spec['purpose']}\n\n"
                "Human oversight: every output is shown to an operator beside the image; the operator accepts or "
                "overrides it. The model is a research reference and must not be used for decisions about people.\n")
        provider_documents.attach(version, doc_type="instructions", title=f"Instructions for use ({spec['name']})",
                                  filename="instructions.md", stream=io.BytesIO(text.encode()), by=cast["provider"])

    def review_and_report(self, case: AuditCase, cast: dict[str, Any], *, with_report: bool) -> dict[str, Any]:
        progress = pipeline.case_progress(case)
        findings = sorted({f["severity"] for run in case.runs.all() if hasattr(run, "evidence")
                           for f in run.evidence.findings})
        from governance import acceptance

        flagged = [f["title"] for f in acceptance.open_findings(case) if f["severity"] == "high"]
        if case.state == AuditCase.State.EVIDENCE_READY:
            if flagged:
                workflow.sign_off(case, cast["reviewer-2"], "approve",
                                  "The probes ran as planned; the evidence is complete.",
                                  evidence=case.runs.filter(status="succeeded").earliest("created_at", "pk").evidence)
                workflow.sign_off(case, cast["reviewer-1"], "reject",
                                  "Rejected: " + "; ".join(flagged)[:500])
            else:
                from governance import acceptance

                for reviewer in ("reviewer-1", "reviewer-2"):
                    # Each open high/medium finding is acknowledged with its own reason (the approval
                    # path refuses a blanket "no high-severity finding").
                    reasons = {f["key"]: f"Accepted for the demo scope (a reference model on synthetic data): "
                                         f"{f['title'].lower()}; that result is reported as a limitation and not "
                                         f"relied on." for f in acceptance.open_findings(case)}
                    workflow.sign_off(case, cast[reviewer], "approve",
                                      "The evidence is complete and correct for the stated demo scope; each open "
                                      "finding is acknowledged individually.", acknowledgements=reasons)
        case.refresh_from_db()
        item: dict[str, Any] = {
            "case": case.pk, "title": case.title, "state": case.state,
            "succeeded": progress["counts"]["succeeded"], "failed": progress["counts"]["failed"],
            "failures": progress["failed"], "findings": ", ".join(findings),
        }
        if with_report:
            from governance.reports import generate_report

            report = generate_report(case, author=cast["operator"])
            item["report"] = str(Path(report.pdf.path))
            item["report_version"] = report.version
            item["countersigned"] = self.countersign(report)
        return item

    def signing_keys(self) -> None:
        """Development keys for the issuer and both reviewers, unless they exist (never in production)."""
        directory = Path(settings.LOUPE_SIGNING_DIR)
        for slug, name in (("issuer", "Loupe report issuer (development)"),
                           ("reviewer-1", "reviewer-1 (development)"), ("reviewer-2", "reviewer-2 (development)")):
            key = Path(settings.LOUPE_SIGNING_KEY) if slug == "issuer" else directory / f"{slug}-key.pem"
            if not key.exists():
                call_command("make_signing_key", slug=slug, name=name, stdout=_Null())
                self.stdout.write(f"  development signing key for {slug}: {key}")

    def countersign(self, report: Any) -> str:
        """A copy of the issued report countersigned by each reviewer who approved the case, in the
        order of their usernames, each countersignature recorded as that reviewer's (so the next one
        signs a file that verifies), then verified. Only approving reviewers may countersign, so a
        case nobody approved (the rejected shortcut case) keeps the issuer's signature alone. A
        reviewer's key is ``<username>-key.pem`` in ``LOUPE_SIGNING_DIR`` (``signing_keys``)."""
        from governance.reports.verification import approving_reviewers

        signers = sorted(approving_reviewers(report.case))
        if not signers:
            return "not countersigned: no reviewer approved this case"
        directory = Path(settings.LOUPE_SIGNING_DIR)
        source = Path(report.pdf.path)
        target = Path(settings.VAR_DIR) / "reports" / source.name.replace(".pdf", "-countersigned.pdf")
        target.parent.mkdir(parents=True, exist_ok=True)
        current = source
        for i, username in enumerate(signers):
            role = ("reviewer", "approver")[i] if i < 2 else f"reviewer{i + 1}"
            call_command("sign_report", str(current), str(target), key=str(directory / f"{username}-key.pem"),
                         cert=str(directory / f"{username}-cert.pem"), role=role, record=username, stdout=_Null())
            current = target
        call_command("verify_report", str(target), stdout=_Null())  # raises CommandError if anything is off
        return f"countersigned by {', '.join(signers)}, verified: {target}"


class _Null:
    def write(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass


def call_command_zoo_build() -> None:
    from workers.probes.zoo.__main__ import main as zoo_main

    if zoo_main(["build"]) != 0:
        raise CommandError("rebuilding the zoo failed")


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]
