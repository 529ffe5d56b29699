"""Image corruptions of ImageNet-C (Hendrycks & Dietterich 2019) at severities 1-5: Gaussian noise,
Gaussian blur, JPEG compression, brightness, contrast.

Parameters are ImageNet-C's (``make_imagenet_c.py``), the blur radius scaled to the image size; noise
is seeded per image, so runs repeat. The robustness probe measures decisions and explanations under
them; the grounding and token-attribution probes measure the stability of their maps under them.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from workers.probes.errors import ProbeInputError

SEVERITIES = (1, 2, 3, 4, 5)
# By severity 1..5.
NOISE_SIGMA = (0.08, 0.12, 0.18, 0.26, 0.38)  # on [0, 1] pixels
BLUR_SIGMA = (1.0, 2.0, 3.0, 4.0, 6.0)  # pixels at 224 px, scaled to the image size
JPEG_QUALITY = (25, 18, 15, 10, 7)
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to HSV value
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # factor towards the mean
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "jpeg", "brightness", "contrast")


def to_float(image: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` float32 RGB in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def to_image(array: np.ndarray) -> Image.Image:
    """The RGB image of a float array in [0, 1] (clipped, rounded)."""
    return Image.fromarray((np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8))


def corrupt(image: Image.Image, kind: str, severity: int, *, seed: int = 0) -> Image.Image:
    """``image`` with corruption ``kind`` at ``severity`` (1..5), deterministic in ``seed``."""
    if severity not in SEVERITIES:
        raise ProbeInputError(f"severity must be 1..5, got {severity}")
    i = severity - 1
    if kind == "gaussian_noise":
        x = to_float(image)
        noise = np.random.default_rng([seed, severity]).normal(0.0, NOISE_SIGMA[i], size=x.shape)
        return to_image(x + noise.astype(np.float32))
    if kind == "gaussian_blur":
        radius = BLUR_SIGMA[i] * max(image.size) / 224
        return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius))
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY[i])
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return decoded.convert("RGB")
    if kind == "brightness":
        hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float32) / 255.0
        hsv[..., 2] = np.clip(hsv[..., 2] + BRIGHTNESS[i], 0, 1)
        return Image.fromarray((hsv * 255 + 0.5).astype(np.uint8), mode="HSV").convert("RGB")
    if kind == "contrast":
        x = to_float(image)
        mean = x.mean(axis=(0, 1), keepdims=True)
        return to_image((x - mean) * CONTRAST[i] + mean)
    raise ProbeInputError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
