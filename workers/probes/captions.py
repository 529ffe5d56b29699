"""What a probe figure shows, in words, carried with the figure into its stored PNG.

The probe that draws a figure is the only code that knows what its rows, columns and colours are;
the report that prints the figure only has the file. So the probe attaches a description to the
figure (:func:`describe`), the evidence store writes it into the PNG as the standard ``Description``
text chunk, and the report reads it back (:func:`png_description`) for the caption. Plain module:
no torch, no Django, no pyplot (the report side imports it).
"""

from __future__ import annotations

import io
from typing import Any

#: The PNG text keyword (a registered one, so other viewers show it too).
PNG_KEY = "Description"
_ATTRIBUTE = "loupe_description"


def compose(summary: str, *, rows: str | None = None, columns: str | None = None, axes: str | None = None,
            colour: str | None = None, marks: str | None = None) -> str:
    """One caption from its parts: what the figure is, what its rows and its columns (or its axes)
    are, what its colour scale means and what the marks drawn on it (boxes, crosses, dashed lines)
    stand for."""
    parts = [summary.strip().rstrip(".") + "."]
    for label, text in (("Rows", rows), ("Columns", columns), ("Axes", axes), ("Colour", colour),
                        ("Marks", marks)):
        if text:
            parts.append(f"{label}: {text.strip().rstrip('.')}.")
    return " ".join(parts)


def describe(figure: Any, summary: str, *, rows: str | None = None, columns: str | None = None,
             axes: str | None = None, colour: str | None = None, marks: str | None = None) -> Any:
    """Attach the caption :func:`compose` makes to ``figure`` and return the figure."""
    setattr(figure, _ATTRIBUTE, compose(summary, rows=rows, columns=columns, axes=axes, colour=colour, marks=marks))
    return figure


def description(figure: Any) -> str | None:
    """The description attached to ``figure`` by :func:`describe`, or None."""
    text = getattr(figure, _ATTRIBUTE, None)
    return text if isinstance(text, str) and text else None


def png_metadata(figure: Any) -> dict[str, str | None]:
    """``savefig(metadata=...)`` entries that carry the figure's description (empty if it has none)."""
    text = description(figure)
    return {PNG_KEY: text} if text else {}


def png_description(data: bytes) -> str | None:
    """The ``Description`` text chunk of PNG ``data``, or None (not a PNG, or no description)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            text = getattr(image, "text", {}).get(PNG_KEY)
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    return text if isinstance(text, str) and text.strip() else None
