"""Hugging Face model cards: import, export, round trip, and cards that must be refused."""

from __future__ import annotations

import pytest

from governance import modelcard
from governance.models import AuditEvent, ModelVersion

HF_TEMPLATE_CARD = """---
license: apache-2.0
language:
- en
tags:
- clip
- zero-shot-image-classification
datasets:
- acme/shapes
date: 2024-05-01
loupe:
  ai_act_risk_category: minimal
---

# Model Card for Acme CLIP

A tiny dual encoder.

## Model Details

### Model Description

Dual encoder trained contrastively on synthetic shapes.

- **Developed by:** Acme Vision

## Uses

### Direct Use

Tagging product photos by colour and shape.

### Out-of-Scope Use

Identifying people. Medical images.

## Bias, Risks, and Limitations

Colour words dominate shape words.

```python
# Not a heading, just code:
## Limitations
```

### Recommendations

Check colour-only shortcuts before use.

## Training Details

### Training Data

[More Information Needed]

## Evaluation

### Testing Data, Factors & Metrics

#### Testing Data

Held-out synthetic scenes.

#### Metrics

Zero-shot accuracy, pointing game.

## Environmental Impact

Carbon emitted: negligible.
"""


def test_it_reads_the_hugging_face_template_sections():
    card = modelcard.parse(HF_TEMPLATE_CARD)
    assert card.title == "Model Card for Acme CLIP"
    assert card.metadata["license"] == "apache-2.0" and card.metadata["date"] == "2024-05-01"
    fields = card.fields
    assert "Dual encoder trained contrastively" in fields["model_details"]
    assert "**Developed by:** Acme Vision" in fields["model_details"]
    assert fields["intended_uses"] == "Tagging product photos by colour and shape."
    assert fields["out_of_scope_uses"] == "Identifying people. Medical images."
    assert fields["limitations"].startswith("Colour words dominate shape words.")
    assert "## Limitations" in fields["limitations"], "headings inside code fences are text"
    assert fields["caveats"] == "Check colour-only shortcuts before use."
    assert fields["training_data"] == "", "template placeholders are not content"
    assert fields["evaluation_data"] == "Held-out synthetic scenes."
    assert fields["metrics"] == "Zero-shot accuracy, pointing game."
    assert "Carbon" not in " ".join(fields.values()), "unmapped sections are not swallowed"


def test_it_never_takes_loupe_facts_from_an_imported_card(acme_version, alice):
    card = modelcard.import_card(acme_version, HF_TEMPLATE_CARD, by=alice)
    acme_version.refresh_from_db()
    assert "loupe" not in acme_version.card_metadata
    assert card.loupe == {"ai_act_risk_category": "minimal"}
    assert acme_version.ai_model.risk_category == "limited"
    assert acme_version.intended_uses == "Tagging product photos by colour and shape."
    assert acme_version.training_data == ""
    event = AuditEvent.objects.get(action="model_version.card_imported")
    assert event.actor == alice and "intended_uses" in event.data["fields"]


def test_it_round_trips_a_version_through_export_and_import(acme_version, alice):
    modelcard.import_card(acme_version, HF_TEMPLATE_CARD, by=alice)
    acme_version.refresh_from_db()
    exported = modelcard.export_card(acme_version)
    assert exported.startswith("---\n") and "# Model Card for Acme CLIP 1.0" in exported
    assert f"manifest_sha256: {acme_version.manifest_hash}" in exported
    assert "ai_act_risk_category: limited" in exported

    again = modelcard.parse(exported)
    assert again.metadata == acme_version.card_metadata
    for name in ModelVersion.CARD_FIELDS:
        assert again.fields.get(name, "") == getattr(acme_version, name), name
    assert again.loupe["hub"] == {"id": "acme/clip-tiny", "revision": "a" * 40}


def test_it_reads_a_card_without_metadata():
    card = modelcard.parse("# My model\n\n## Limitations\n\nSmall.\n")
    assert card.metadata == {} and card.fields == {"limitations": "Small."}


@pytest.mark.parametrize(("text", "message"), [
    ("---\nlicense: [unclosed\n---\n# x\n", "not valid YAML"),
    ("---\n!!python/object/apply:os.system ['echo pwned']\n---\n# x\n", "not valid YAML"),
    (b"---\nlicense: mit\n---\n\xff\xfe", "not UTF-8"),
    ("# x\n\x00", "NUL bytes"),
    ("x" * (modelcard.MAX_CARD_BYTES + 1), "larger than"),
    ("---\nlicense: mit\n# Model\n", "never closes it"),
    ("---\n- a list\n---\n# x\n", "should be a dict"),
    ("---\na: &a [1, 2]\nb: [*a, *a, *a]\n---\n# x\n", "uses aliases"),
])
def test_it_refuses_cards_it_cannot_read(text, message):
    with pytest.raises(modelcard.ModelCardError, match=message):
        modelcard.parse(text)


def test_it_keeps_hostile_text_as_text(acme_version):
    hostile = '<img src="file:///etc/passwd"> <script>alert(1)</script>'
    card = modelcard.parse(f"## Limitations\n\n{hostile}\n")
    assert card.fields["limitations"] == hostile  # stored verbatim; templates escape it
