"""One colour per explanation method (and per named series) in every figure Loupe draws.

The probes' own figures and the report's summary figures both take colours from here, so chefer is
the same blue in a deletion curve, a bar chart and a legend. Colours are from the colour-blind-safe
Okabe-Ito set; a name not listed gets a stable colour from its hash, never from its position in
one figure (position would give the same method different colours in different figures).
"""

from __future__ import annotations

import hashlib

METHOD_COLOURS: dict[str, str] = {
    "chefer": "#0072B2",     # blue
    "gradcam": "#D55E00",    # vermillion
    "rollout": "#009E73",    # bluish green
    "flow": "#CC79A7",       # reddish purple
    "occlusion": "#E69F00",  # orange
    "random": "#7F7F7F",     # grey: chance baselines
}
REFERENCE = "#000000"  # reference lines (chance, thresholds)
_SPARE = ("#56B4E9", "#F0E442", "#882255", "#44AA99", "#999933", "#AA4499", "#332288", "#117733")


def colour(name: str) -> str:
    """The colour of a method or series name (``"chefer deletion"`` takes chefer's colour)."""
    key = str(name).strip().lower()
    if key in METHOD_COLOURS:
        return METHOD_COLOURS[key]
    for method, value in METHOD_COLOURS.items():
        if key.startswith(method + " ") or key.startswith(method + ":") or key.startswith(method + "_"):
            return value
    digest = hashlib.sha256(key.encode()).digest()
    return _SPARE[digest[0] % len(_SPARE)]
