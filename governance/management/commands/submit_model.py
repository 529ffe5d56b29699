"""``manage.py submit_model --model DIR --card README.md``: register a server-side model directory.

Creates (or reuses) the inventory entry, a new version with the card's fields, computes the SHA-256
manifest, and optionally a draft case with the architecture's default probe plan (``--case``).
"""

from __future__ import annotations

import json
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from governance import registration
from governance.modelcard import ModelCardError
from governance.models import AIModel, Organisation


class Command(BaseCommand):
    help = "Register a Hugging Face-format model directory (safetensors only) for audit."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--model", required=True, help="model directory below LOUPE_MODEL_ROOTS")
        parser.add_argument("--card", help="model card (README.md with YAML metadata); default: DIR/README.md")
        parser.add_argument("--name", help="inventory name (default: the directory name)")
        # Not --version: Django's own option prints Django's version.
        parser.add_argument("--model-version", default="1", help="version label (default: 1)")
        parser.add_argument("--organisation", required=True, help="provider organisation slug")
        parser.add_argument("--submitter", required=True, help="username of the submitter (a member)")
        parser.add_argument("--risk", default=AIModel.RiskCategory.MINIMAL, choices=AIModel.RiskCategory.values)
        parser.add_argument("--case", metavar="TITLE", help="also create a draft case with this title")
        parser.add_argument("--plan", help="JSON file with the case's probe plan (default: by architecture)")
        parser.add_argument("--json", action="store_true", help="print the result as JSON")

    def handle(self, *args, **options) -> None:
        directory = Path(options["model"])
        card_path = Path(options["card"]) if options["card"] else directory / "README.md"
        try:
            organisation = Organisation.objects.get(slug=options["organisation"])
        except Organisation.DoesNotExist:
            raise CommandError(f"no organisation with slug {options['organisation']!r}") from None
        try:
            submitter = get_user_model().objects.get(username=options["submitter"])
        except get_user_model().DoesNotExist:
            raise CommandError(f"no user {options['submitter']!r}") from None
        card_text = card_path.read_text(encoding="utf-8") if card_path.is_file() else None
        if options["card"] and card_text is None:
            raise CommandError(f"model card {card_path} does not exist")
        plan = None
        if options["plan"]:
            try:
                plan = json.loads(Path(options["plan"]).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise CommandError(f"cannot read the plan {options['plan']}: {exc}") from exc
        try:
            version = registration.register_directory(
                directory, organisation=organisation, submitter=submitter,
                name=options["name"] or directory.resolve().name, version=options["model_version"],
                card_text=card_text, risk_category=options["risk"])
            version.refresh_from_db()
            case = None
            if options["case"]:
                case = registration.create_case(version, submitter=submitter, title=options["case"], plan=plan)
        except (registration.RegistrationError, ModelCardError) as exc:
            raise CommandError(str(exc)) from exc
        except Exception as exc:  # ValidationError from full_clean
            if exc.__class__.__name__ == "ValidationError":
                raise CommandError("; ".join(getattr(exc, "messages", [str(exc)]))) from exc
            raise
        result = {"model": version.ai_model_id, "version": version.pk, "manifest_hash": version.manifest_hash,
                  "architecture": version.architecture_family, "case": case.pk if case else None}
        if options["json"]:
            self.stdout.write(json.dumps(result))
        else:
            self.stdout.write(f"registered {version} (version #{version.pk}, {version.architecture_family}, "
                              f"manifest {version.manifest_hash[:16] or 'pending'}...)")
            if case:
                self.stdout.write(f"draft case #{case.pk}: {case.title}; "
                                  f"run it with: manage.py run_audit {case.pk} --wait")
