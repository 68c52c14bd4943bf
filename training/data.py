"""The public atypical-mitosis sets, read into one table of figures.

- MIDOG25 (the challenge's training set): ``MIDOG25_Atypical_Classification_Train_Set.csv`` + ``images/<image_id>``;
  label from ``majority`` (AMF = atypical = 1, NMF = 0); slide = ``filename``.
- AMi-Br (human breast, MIDOG21 + TUPAC16 slides): ``AMI-BR.csv`` + ``patches/{normal,atypical}/<dataset>_<uid>.png``;
  label from ``majority_atypical``. Its MIDOG21 figures are MIDOG25's human-breast figures: merged tables drop
  them, matched on (slide, coordinates).
- OMG-Octo: ``OMG-Octo.csv`` (``image_id, filename, majority``) + ``images/<image_id>``.
- AtNorM (the AMi-Br benchmark's external sets): class folders, read by ``training.atnorm``.

Every loader checks its table and names the bad rows; exact duplicate rows (the real OMG-Octo CSV has some) are
dropped with a warning, conflicting ones are an error. The table's pixels: ``training.pixels``.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable
from pathlib import Path

from training.atnorm import ATNORM_CLASSES, read_atnorm
from training.figure import UNKNOWN, DataError, Figure

log = logging.getLogger(__name__)

MIDOG25_CSV = "MIDOG25_Atypical_Classification_Train_Set.csv"
MIDOG25_COLUMNS = (
    "image_id",
    "filename",
    "coordinateX",
    "coordinateY",
    "Tumor",
    "Scanner",
    "Origin",
    "Species",
    "expert1",
    "expert2",
    "expert3",
    "majority",
)
AMIBR_CSV = "AMI-BR.csv"
AMIBR_COLUMNS = (
    "slide",
    "dataset",
    "uid",
    "x",
    "y",
    "expert1_atypical",
    "expert2_atypical",
    "expert3_atypical",
    "majority_atypical",
)
OMG_OCTO_CSV = "OMG-Octo.csv"
OMG_OCTO_COLUMNS = ("image_id", "filename", "majority")
LABELS = {"NMF": 0, "AMF": 1}
BOOLEANS = {"True": 1, "False": 0, "true": 1, "false": 0, "1": 1, "0": 0}
PATCH_SIZE = 128
COORDINATE_TOLERANCE = 3  # pixels
# Micrometres per pixel at 40x, from the MIDOG 2021 challenge's description of its scanners. A scanner missing here
# cannot be trained with ``pixel_size_um`` set (add it, with its source); served pages carry their own.
SCANNER_PIXEL_SIZE_UM = {"Hamamatsu XR": 0.23, "Hamamatsu S360": 0.23, "Aperio CS2": 0.25, "Leica GT450": 0.26}
# MIDOG21 slides by number: 1-50 Hamamatsu XR, 51-100 Hamamatsu S360, 101-150 Aperio CS2 (151-200 unlabeled)
MIDOG21_SCANNERS = ((50, "Hamamatsu XR"), (100, "Hamamatsu S360"), (150, "Aperio CS2"))


def normalize_scanner(name: str) -> str:
    """The official CSV spells one scanner several ways ('Hammamatsu XR', 'Hamammatsu XR')."""
    return re.sub(r"(?i)^ham+am+atsu", "Hamamatsu", name.strip())


def slide_key(slide: str) -> str:
    """'002.tiff', '002' and '2' name the same MIDOG21 slide."""
    stem = Path(slide.strip()).stem
    return str(int(stem)) if stem.isdigit() else stem


def midog25_slide_name(slide: str) -> str:
    """A MIDOG21 slide as MIDOG25's ``filename`` column names it ('002.tiff'), so that both group together."""
    key = slide_key(slide)
    return f"{int(key):03d}.tiff" if key.isdigit() else slide


def _read_table(csv_path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    if not csv_path.is_file():
        raise DataError(f"{csv_path.parent}: no {csv_path.name}")
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{csv_path}: missing columns {missing}")
        return list(reader)


def _labels(csv_path: Path, rows: list[dict], column: str, mapping: dict[str, int]) -> list[int]:
    bad = [f"row {i + 2}: {r[column]!r}" for i, r in enumerate(rows) if r[column] not in mapping]
    if bad:
        raise DataError(f"{csv_path}: unknown {column} values (want {sorted(mapping)}) at {', '.join(bad[:5])}")
    return [mapping[r[column]] for r in rows]


def _drop_duplicates(csv_path: Path, rows: list[dict], key: Callable[[dict], str]) -> list[dict]:
    """Identical repeated rows are dropped with a warning; the same id with different content is an error."""
    first: dict[str, int] = {}
    kept, repeated, conflicting = [], [], []
    for i, row in enumerate(rows):
        k = key(row)
        if k not in first:
            first[k] = i
            kept.append(row)
        elif rows[first[k]] == row:
            repeated.append(f"row {i + 2} repeats row {first[k] + 2}")
        else:
            conflicting.append(f"{k} (rows {first[k] + 2} and {i + 2})")
    if conflicting:
        raise DataError(f"{csv_path}: duplicate image ids with different content: {', '.join(conflicting[:5])}")
    if repeated:
        log.warning("%s: dropped %d repeated row(s): %s", csv_path.name, len(repeated), ", ".join(repeated[:5]))
    return kept


def read_midog25(root: Path) -> list[Figure]:
    csv_path = root / MIDOG25_CSV
    if not csv_path.is_file():
        raise DataError(f"{root}: no {MIDOG25_CSV} (expected the MIDOG25 layout: CSV + images/)")
    rows = _drop_duplicates(csv_path, _read_table(csv_path, MIDOG25_COLUMNS), lambda r: r["image_id"])
    labels = _labels(csv_path, rows, "majority", LABELS)
    return [
        Figure(
            image_id=r["image_id"],
            path=root / "images" / r["image_id"],
            label=label,
            slide=r["filename"],
            tumor=r["Tumor"],
            scanner=normalize_scanner(r["Scanner"]),
            origin=r["Origin"],
            species=r["Species"],
            votes=tuple(LABELS[r[e]] for e in ("expert1", "expert2", "expert3") if r[e] in LABELS),
            coordinates=(int(float(r["coordinateX"])), int(float(r["coordinateY"]))),
        )
        for r, label in zip(rows, labels, strict=True)
    ]


def _midog21_scanner(slide: str) -> str:
    key = slide_key(slide)
    if key.isdigit():
        for last, scanner in MIDOG21_SCANNERS:
            if int(key) <= last:
                return scanner
    return UNKNOWN


def read_amibr(root: Path) -> list[Figure]:
    csv_path = root / AMIBR_CSV
    rows = _read_table(csv_path, AMIBR_COLUMNS)
    rows = _drop_duplicates(csv_path, rows, lambda r: f"{r['dataset']}_{r['uid']}")
    labels = _labels(csv_path, rows, "majority_atypical", BOOLEANS)
    figures = []
    for r, label in zip(rows, labels, strict=True):
        name = f"{r['dataset']}_{r['uid']}.png"
        votes = tuple(
            BOOLEANS[r[e]] for e in ("expert1_atypical", "expert2_atypical", "expert3_atypical") if r[e] in BOOLEANS
        )
        figures.append(
            Figure(
                image_id=f"AMi-Br:{name}",
                path=root / "patches" / ("atypical" if label else "normal") / name,
                label=label,
                slide=midog25_slide_name(r["slide"]) if r["dataset"] == "MIDOG21" else f"{r['dataset']}:{r['slide']}",
                tumor="human breast cancer",
                scanner=_midog21_scanner(r["slide"]) if r["dataset"] == "MIDOG21" else UNKNOWN,
                origin=r["dataset"],
                species="Human",
                votes=votes,
                source="AMi-Br",
                coordinates=(int(float(r["x"])), int(float(r["y"]))),
            )
        )
    return figures


def read_omg_octo(root: Path) -> list[Figure]:
    csv_path = root / OMG_OCTO_CSV
    rows = _drop_duplicates(csv_path, _read_table(csv_path, OMG_OCTO_COLUMNS), lambda r: r["image_id"])
    labels = _labels(csv_path, rows, "majority", LABELS)
    return [
        Figure(
            image_id=f"OMG-Octo:{r['image_id']}",
            path=root / "images" / r["image_id"],
            label=label,
            slide=f"OMG-Octo:{r['filename']}",
            tumor=UNKNOWN,
            scanner=UNKNOWN,
            source="OMG-Octo",
        )
        for r, label in zip(rows, labels, strict=True)
    ]


READERS: dict[str, tuple[str, Callable[[Path], list[Figure]]]] = {
    "MIDOG25": (MIDOG25_CSV, read_midog25),
    "AMi-Br": (AMIBR_CSV, read_amibr),
    "OMG-Octo": (OMG_OCTO_CSV, read_omg_octo),
}


def read_dataset(root: Path) -> list[Figure]:
    """Any one of the layouts: the three tables recognized by their CSV, AtNorM by its class folders."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    for csv_name, reader in READERS.values():
        if (root / csv_name).is_file():
            return reader(root)
    if all((root / name).is_dir() for name in ATNORM_CLASSES):
        return read_atnorm(root)
    names = ", ".join(csv_name for csv_name, _ in READERS.values())
    folders = " and ".join(f"{c}/" for c in ATNORM_CLASSES)
    raise DataError(f"{root}: no dataset table here (looked for {names}, or AtNorM's {folders})")


def read_datasets(roots: list[Path]) -> list[Figure]:
    return merge_datasets([read_dataset(root) for root in roots])


def on_scanners(figures: list[Figure], scanners: list[str]) -> list[bool]:
    """Which figures come from the named scanners (any spelling the CSVs use); a name no figure has is an error,
    so a typo cannot silently hold out nothing."""
    wanted = {normalize_scanner(s) for s in scanners}
    missing = wanted - {f.scanner for f in figures}
    if missing:
        known = ", ".join(sorted({f.scanner for f in figures}))
        raise DataError(f"no figures from scanner(s) {', '.join(sorted(missing))} (the data has: {known})")
    return [f.scanner in wanted for f in figures]


def scanner_pixel_sizes(figures: list[Figure]) -> list[float | None]:
    """Each figure's micrometres per pixel: its own where the source states it, else its scanner's (None for a
    scanner SCANNER_PIXEL_SIZE_UM lacks)."""
    return [f.pixel_size_um or SCANNER_PIXEL_SIZE_UM.get(f.scanner) for f in figures]


def merge_datasets(tables: list[list[Figure]]) -> list[Figure]:
    """One table; AMi-Br's MIDOG21 figures that MIDOG25 already holds (same slide and coordinates) are dropped."""
    midog25: dict[str, list[tuple[int, int]]] = {}
    for f in (f for t in tables for f in t if f.source == "MIDOG25" and f.coordinates):
        midog25.setdefault(slide_key(f.slide), []).append(f.coordinates)

    def in_midog25(f: Figure) -> bool:
        if not (f.source == "AMi-Br" and f.origin == "MIDOG21" and f.coordinates):
            return False
        x, y = f.coordinates  # the two tables round coordinates differently: a few pixels apart is the same figure
        near = COORDINATE_TOLERANCE
        return any(abs(x - u) <= near and abs(y - v) <= near for u, v in midog25.get(slide_key(f.slide), ()))

    merged = [f for t in tables for f in t if not in_midog25(f)]
    dropped = sum(len(t) for t in tables) - len(merged)
    if dropped:
        log.info("dropped %d AMi-Br figure(s) already in MIDOG25", dropped)
    ids = [f.image_id for f in merged]
    if len(set(ids)) != len(ids):
        raise DataError("the same image id appears in two datasets")
    return merged
