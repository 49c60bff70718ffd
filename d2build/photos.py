"""Real photographs that need no download: the ones scikit-image ships inside its wheel.

Verify, the export check and random-weight calibration all need real images (a model fed noise
proves nothing). `bundled` means these; a folder of the user's own images works everywhere too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Colour photographs bundled in scikit-image's wheel (loaded offline), in the order used.
BUNDLED = ("astronaut", "coffee", "rocket", "chelsea", "hubble_deep_field", "immunohistochemistry")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class Photo:
    name: str
    bgr: np.ndarray  # uint8 [h, w, 3]

    @property
    def digest(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.bgr).tobytes()).hexdigest()


def bundled(name: str) -> Photo:
    import skimage.data

    rgb = getattr(skimage.data, name)()
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, axis=-1)
    return Photo(name, np.ascontiguousarray(rgb[:, :, :3][:, :, ::-1]))


def list_images(source: str, count: int) -> list[str]:
    """Names (bundled) or paths (folder) of the first `count` images of a source; no pixels read."""
    if source == "bundled":
        if count > len(BUNDLED):
            raise ValueError(f"only {len(BUNDLED)} bundled photographs exist; lower the count or use a folder")
        return list(BUNDLED[:count])
    folder = Path(source).expanduser()
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [str(p) for p in files[:count]]


def load(ref: str) -> Photo:
    """A bundled name or an image path."""
    if ref in BUNDLED:
        return bundled(ref)
    from d2build.processing import load_image_bgr

    return Photo(Path(ref).name, load_image_bgr(ref))


def source_digest(source: str, count: int) -> tuple[tuple[str, str], ...]:
    """What a cache key needs to know about an image source: names and pixel digests."""
    return tuple((Path(r).name, load(r).digest) for r in list_images(source, count))


def image_sizes(refs: list[str]) -> dict[str, tuple[int, int]]:
    """Name -> [h, w] as the model will be given each image (bundled photographs or files; file headers
    only). ValueError naming the image that cannot be read."""
    from d2build.processing import image_file_hw

    out = {}
    for ref in refs:
        if ref in BUNDLED:
            out[ref] = tuple(bundled(ref).bgr.shape[:2])
            continue
        try:
            out[ref] = image_file_hw(ref)
        except (OSError, ValueError) as e:  # missing, unreadable, or not an image Pillow knows
            raise ValueError(f"{ref}: cannot be read as an image ({type(e).__name__}: {e})") from None
    return out  # type: ignore[return-value]
