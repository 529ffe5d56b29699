"""Hugging Face model cards in and out: ``README.md`` with YAML metadata front matter.

- :func:`parse` reads a card: the YAML block (parsed by ``huggingface_hub.ModelCard`` with
  ``yaml.safe_load``, so no YAML tags run code) and the Markdown sections, mapped to Loupe's card
  fields by their headings (the names of the Hugging Face template and common variants).
- :func:`import_card` stores a parsed card on a :class:`~governance.models.ModelVersion` and logs it.
- :func:`export_card` writes a version back out as a card; ``parse(export_card(v))`` gives back the
  same fields and metadata. Loupe's own facts (organisation, risk category, manifest hash...) go into
  a ``loupe:`` metadata block on export and are never read back from an imported card: a provider's
  README cannot set its own risk category or fingerprint.

Errors are :class:`ModelCardError` (a ``ValueError``) with one sentence saying what is wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from django.db import transaction

from governance.models import ModelVersion

MAX_CARD_BYTES = 1024 * 1024
LOUPE_KEY = "loupe"

# Loupe field -> (heading written on export, headings recognised on import).
SECTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "model_details": ("Model Details", ("model details", "model description", "model summary", "model")),
    "intended_uses": ("Intended Uses", ("intended uses", "intended use", "uses", "direct use", "downstream use",
                                        "intended uses & limitations", "how to use", "use cases")),
    "out_of_scope_uses": ("Out-of-Scope Uses", ("out-of-scope use", "out-of-scope uses", "out of scope use",
                                                "out of scope uses", "misuse", "misuse and out-of-scope use")),
    "training_data": ("Training Data", ("training data", "training dataset", "training details", "training")),
    "evaluation_data": ("Evaluation Data", ("evaluation data", "testing data", "evaluation dataset",
                                            "evaluation", "testing data, factors & metrics")),
    "metrics": ("Metrics", ("metrics", "results", "evaluation results", "performance")),
    "limitations": ("Limitations", ("limitations", "bias, risks, and limitations", "bias, risks and limitations",
                                    "risks and limitations", "known limitations")),
    "ethical_considerations": ("Ethical Considerations", ("ethical considerations", "ethics", "ethical concerns")),
    "caveats": ("Caveats and Recommendations", ("caveats and recommendations", "caveats", "recommendations")),
}
_HEADING_TO_FIELD = {alias: name for name, (_, aliases) in SECTIONS.items() for alias in aliases}
_PLACEHOLDERS = {"[more information needed]", "more information needed", "n/a", "tbd"}
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^[ \t]{0,3}(```|~~~)")


class ModelCardError(ValueError):
    """A model card that cannot be read."""


@dataclass
class ParsedCard:
    metadata: dict[str, Any] = field(default_factory=dict)  # YAML metadata without the loupe block
    fields: dict[str, str] = field(default_factory=dict)  # Loupe card field -> Markdown text
    title: str = ""
    loupe: dict[str, Any] = field(default_factory=dict)  # the loupe block, if any (informational only)


def _plain_json(value: Any) -> Any:
    # YAML turns ``2024-01-01`` into a date; metadata is stored as JSON, so dates become ISO strings.
    return json.loads(json.dumps(value, default=str, allow_nan=False))


def _normalise(heading: str) -> str:
    heading = re.sub(r"[*_`]", "", heading).strip().lower()
    return re.sub(r"\s+", " ", heading.rstrip(":").strip())


def _refuse_yaml_aliases(front_matter: str) -> None:
    # Anchors and aliases let a few hundred bytes expand into gigabytes once the metadata is turned
    # into JSON ("billion laughs"); model cards have no need for them.
    try:
        for event in yaml.parse(front_matter, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ModelCardError("the model card's YAML metadata uses aliases (*name); write the values out")
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelCardError(f"the model card's YAML metadata is not valid YAML: {first}") from None


def _split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    from huggingface_hub import ModelCard

    text = text.lstrip("\ufeff")
    if not text.startswith("---"):
        return {}, text
    lines = text.splitlines()
    closing = next((i for i, line in enumerate(lines[1:], start=1) if line.rstrip() == "---"), None)
    if lines[0].rstrip() != "---" or closing is None:
        raise ModelCardError("the model card opens a YAML metadata block with '---' but never closes it")
    _refuse_yaml_aliases("\n".join(lines[1:closing]))
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelCardError(f"the model card's YAML metadata is not valid YAML: {first}") from None
    except ValueError as exc:
        raise ModelCardError(f"the model card's metadata is invalid: {exc}") from None
    try:
        metadata = _plain_json(card.data.to_dict())
    except ValueError as exc:
        raise ModelCardError(f"the model card's metadata holds values JSON cannot express: {exc}") from None
    return metadata, card.text


def _sections(body: str) -> tuple[str, dict[str, str]]:
    """Assign Markdown lines to card fields by heading. A matched heading starts (or continues) its
    field; unmatched deeper headings stay inside the current field; an unmatched heading at the same
    or a higher level ends it. Headings inside fenced code blocks are text."""
    collected: dict[str, list[str]] = {}
    title = ""
    current: str | None = None
    current_level = 0
    in_fence = False
    for line in body.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        match = None if in_fence else _HEADING.match(line)
        if match:
            level, text = len(match.group(1)), match.group(2)
            name = _HEADING_TO_FIELD.get(_normalise(text))
            if level == 1 and not title and name is None:
                title = text.strip()
                current = None
                continue
            if name is not None:
                current, current_level = name, level
                collected.setdefault(name, [])
                continue
            if current is not None and level <= current_level:
                current = None
        if current is not None:
            collected[current].append(line)
    fields = {}
    for name, lines in collected.items():
        text = "\n".join(lines).strip()
        fields[name] = "" if _normalise(text) in _PLACEHOLDERS else text
    return title, fields


def parse(text: str | bytes) -> ParsedCard:
    """Parse a model card (``README.md`` text or bytes)."""
    if isinstance(text, bytes):
        if len(text) > MAX_CARD_BYTES:
            raise ModelCardError(f"the model card is {len(text)} bytes; at most {MAX_CARD_BYTES} are accepted")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelCardError(f"the model card is not UTF-8 text (byte {exc.start})") from None
    elif len(text.encode("utf-8")) > MAX_CARD_BYTES:
        raise ModelCardError(f"the model card is larger than {MAX_CARD_BYTES} bytes")
    if "\x00" in text:
        raise ModelCardError("the model card contains NUL bytes; it is not a text file")
    metadata, body = _split_front_matter(text)
    loupe = metadata.pop(LOUPE_KEY, None)
    title, fields = _sections(body)
    return ParsedCard(metadata=metadata, fields=fields, title=title, loupe=loupe if isinstance(loupe, dict) else {})


def import_card(version: ModelVersion, text: str | bytes, by=None) -> ParsedCard:
    """Parse ``text`` and store its fields and metadata on ``version`` (saved and audit-logged in one
    transaction). Sections the card lacks are cleared, so the version matches the card exactly."""
    from governance import audit_log

    card = parse(text)
    with transaction.atomic():
        for name in ModelVersion.CARD_FIELDS:
            setattr(version, name, card.fields.get(name, ""))
        version.card_metadata = card.metadata
        version.save()
        audit_log.record(by, "model_version.card_imported", version, {
            "fields": sorted(n for n in ModelVersion.CARD_FIELDS if card.fields.get(n)),
            "metadata_keys": sorted(card.metadata)})
    return card


def loupe_block(version: ModelVersion) -> dict[str, Any]:
    """What Loupe knows about the version, written under ``loupe:`` in exported cards."""
    model = version.ai_model
    block = {
        "model": model.name, "version": version.version, "organisation": model.organisation.name,
        "provider": {"name": model.provider_name, "contact": model.provider_contact},
        "intended_purpose": model.intended_purpose, "modality": model.modality,
        "ai_act_risk_category": model.risk_category, "high_risk_area": model.annex_iii_area or None,
        "architecture_family": version.architecture_family, "manifest_sha256": version.manifest_hash or None,
    }
    if version.hub_id:
        block["hub"] = {"id": version.hub_id, "revision": version.hub_revision}
    return block


def export_card(version: ModelVersion) -> str:
    """The version as a Hugging Face model card (``README.md``)."""
    from huggingface_hub import ModelCardData

    metadata: dict[str, Any] = {k: v for k, v in (version.card_metadata or {}).items() if k != LOUPE_KEY}
    metadata[LOUPE_KEY] = loupe_block(version)
    try:
        front_matter = ModelCardData(**metadata).to_yaml()
    except (TypeError, ValueError, KeyError):
        # Metadata that huggingface_hub's card data rejects (e.g. odd model-index) is still written out.
        front_matter = yaml.safe_dump(metadata, sort_keys=False,
                                      allow_unicode=True).rstrip("\n")
    parts = [f"---\n{front_matter}\n---", f"# Model Card for {version.ai_model.name} {version.version}"]
    for name in ModelVersion.CARD_FIELDS:
        text = (getattr(version, name) or "").strip()
        if text:
            parts.append(f"## {SECTIONS[name][0]}\n\n{text}")
    return "\n\n".join(parts) + "\n"
