"""The MIDOG25 atypical-figure layout: ``<root>/<CSV>`` + ``<root>/images/<image_id>`` (128x128 RGB PNGs).

Label: ``majority`` column, AMF (atypical mitotic figure) = 1, NMF (normal) = 0. Slides are the ``filename``
column: the unit that must never straddle folds.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

MIDOG25_CSV = "MIDOG25_Atypical_Classification_Train_Set.csv"
MIDOG25_COLUMNS = (
    "image_id", "filename", "coordinateX", "coordinateY", "Tumor", "Scanner", "Origin", "Species",
    "expert1", "expert2", "expert3", "majority",
)  # fmt: skip
LABELS = {"NMF": 0, "AMF": 1}
PATCH_SIZE = 128


class DataError(ValueError):
    """A dataset folder that does not follow the layout, with the offending rows named."""


@dataclass(frozen=True)
class Figure:
    image_id: str
    path: Path
    label: int  # 1 = atypical
    slide: str
    tumor: str
    scanner: str


def normalize_scanner(name: str) -> str:
    """The official CSV spells one scanner several ways ('Hammamatsu XR', 'Hamammatsu XR')."""
    return re.sub(r"(?i)^ham+am+atsu", "Hamamatsu", name.strip())


def read_midog25(root: Path) -> list[Figure]:
    """Parse and check the CSV; images are checked when decoded."""
    csv_path = root / MIDOG25_CSV
    if not csv_path.is_file():
        raise DataError(f"{root}: no {MIDOG25_CSV} (expected the MIDOG25 layout: CSV + images/)")
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MIDOG25_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{csv_path}: missing columns {missing}")
        rows = list(reader)
    bad_labels = [f"row {i + 2}: {r['majority']!r}" for i, r in enumerate(rows) if r["majority"] not in LABELS]
    if bad_labels:
        raise DataError(f"{csv_path}: unknown labels (want NMF/AMF) at {', '.join(bad_labels[:5])}")
    seen: dict[str, int] = {}
    dupes = []
    for i, r in enumerate(rows):
        if r["image_id"] in seen:
            dupes.append(f"{r['image_id']} (rows {seen[r['image_id']] + 2} and {i + 2})")
        seen[r["image_id"]] = i
    if dupes:
        raise DataError(f"{csv_path}: duplicate image_id: {', '.join(dupes[:5])}")
    return [
        Figure(
            image_id=r["image_id"],
            path=root / "images" / r["image_id"],
            label=LABELS[r["majority"]],
            slide=r["filename"],
            tumor=r["Tumor"],
            scanner=normalize_scanner(r["Scanner"]),
        )
        for r in rows
    ]


def decode_figures(figures: list[Figure]) -> np.ndarray:
    """Decode every patch once into a uint8 [N, 128, 128, 3] array, so epochs never touch PNGs again."""
    pixels = np.empty((len(figures), PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
    problems = []
    for i, fig in enumerate(tqdm(figures, desc="decoding patches", unit="img", leave=False, disable=None)):
        try:
            with Image.open(fig.path) as im:
                rgb = im.convert("RGB")
        except (OSError, ValueError) as err:
            problems.append(f"{fig.path.name}: unreadable ({err.__class__.__name__})")
            continue
        if rgb.size != (PATCH_SIZE, PATCH_SIZE):
            problems.append(f"{fig.path.name}: size {rgb.size}, expected {PATCH_SIZE}x{PATCH_SIZE}")
            continue
        pixels[i] = np.asarray(rgb)
    if problems:
        raise DataError(f"{len(problems)} bad image(s): {'; '.join(problems[:5])}")
    return pixels
