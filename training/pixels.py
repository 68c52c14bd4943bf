"""A table's figures as pixels: decoded once (and cached across runs), resampled to one pixel size, each crop once.

Any table may hold pixel-identical crops under two ids (AtNorM-Br does): ``unique_figures`` counts each crop once
and leaves out, by name, the crops filed under both classes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from contracts import resample_to_pixel_size
from training.data import PATCH_SIZE, scanner_pixel_sizes
from training.figure import DataError, Figure

log = logging.getLogger(__name__)


def at_pixel_size(figures: list[Figure], pixels: np.ndarray, target_um: float) -> np.ndarray:
    """Every figure resampled from its scanner's pixel size to ``target_um``, as the served model resamples each
    page from the resolution its file records (``contracts.resample_to_pixel_size`` in both)."""
    sizes = scanner_pixel_sizes(figures)
    if unknown := sorted({f.scanner for f, size in zip(figures, sizes, strict=True) if size is None}):
        raise DataError(
            f"no known pixel size for scanner(s) {', '.join(unknown)}: add them to "
            "training.data.SCANNER_PIXEL_SIZE_UM, or train without pixel_size_um"
        )
    out = pixels.copy()
    for size in sorted(set(sizes)):
        chosen = np.array([s == size for s in sizes])
        out[chosen] = resample_to_pixel_size(pixels[chosen], size, target_um)
    return out


def _cache_path(figures: list[Figure], cache_dir: Path) -> Path:
    digest = hashlib.sha256()
    for f in figures:
        stat = f.path.stat()
        digest.update(f"{f.path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return cache_dir / f"patches-{digest.hexdigest()[:20]}.npy"


def decode_figures(figures: list[Figure], cache_dir: Path | None = None) -> np.ndarray:
    """Decode every patch once into a uint8 [N, 128, 128, 3] array, so epochs never touch PNGs again.

    With ``cache_dir``, the array is kept there, keyed by the files' paths, sizes and modification times.
    """
    cached = None
    if cache_dir is not None and all(f.path.is_file() for f in figures):
        cached = _cache_path(figures, cache_dir)
        if cached.is_file():
            log.info("decoded patches from cache %s", cached)
            return np.load(cached)
    pixels = np.empty((len(figures), PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
    problems = []
    for i, fig in enumerate(tqdm(figures, desc="decoding patches", unit="img", leave=False, disable=None)):
        try:
            with Image.open(fig.path) as im:
                mode, size = im.mode, im.size
                rgb = im.convert("RGB")
        except (OSError, ValueError) as err:
            problems.append(f"{fig.path.name}: unreadable ({err.__class__.__name__})")
            continue
        if mode not in ("RGB", "RGBA"):
            problems.append(f"{fig.path.name}: mode {mode}, expected RGB")
        elif size != (PATCH_SIZE, PATCH_SIZE):
            problems.append(f"{fig.path.name}: size {size}, expected {PATCH_SIZE}x{PATCH_SIZE}")
        else:
            pixels[i] = np.asarray(rgb)
    if problems:
        raise DataError(f"{len(problems)} bad image(s): {'; '.join(problems[:5])}")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, pixels)
        os.replace(tmp, cached)
    return pixels


@dataclass(frozen=True)
class Duplicates:
    """Pixel-identical crops in one table: ``copies``, the extra ids of crops whose ids agree on the label (each
    such crop is counted once); ``conflicting``, the ids of each crop filed under both classes (left out: no
    label is right)."""

    copies: list[str]
    conflicting: list[list[str]]

    @property
    def left_out(self) -> int:
        return sum(len(ids) for ids in self.conflicting)

    def describe(self) -> str:
        named = "; ".join(" = ".join(ids) for ids in self.conflicting[:3])
        return (
            f"{len(self.copies)} pixel-identical copies counted once; {len(self.conflicting)} crop(s) filed under "
            f"both classes, their {self.left_out} ids left out{': ' + named if named else ''}"
        )


def unique_figures(figures: list[Figure], pixels: np.ndarray) -> tuple[list[Figure], np.ndarray, Duplicates]:
    """Each distinct crop once, in table order: the first of its ids where all its ids agree on the label, none of
    them where they do not. Crops are compared by their decoded pixels (a PNG re-encoded is still the same crop)."""
    groups: dict[bytes, list[int]] = {}
    for i in range(len(figures)):
        groups.setdefault(hashlib.sha256(pixels[i].tobytes()).digest(), []).append(i)
    keep, copies, conflicting = [], [], []
    for members in groups.values():
        if len({figures[i].label for i in members}) > 1:
            conflicting.append([figures[i].image_id for i in members])
        else:
            keep.append(members[0])
            copies += [figures[i].image_id for i in members[1:]]
    keep.sort()
    duplicates = Duplicates(copies, conflicting)
    if copies or conflicting:
        log.info("%s", duplicates.describe())
    return [figures[i] for i in keep], pixels[keep], duplicates
