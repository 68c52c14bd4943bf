"""The public atypical-mitosis sets, read into one table of figures.

- MIDOG25 (the challenge's training set): ``MIDOG25_Atypical_Classification_Train_Set.csv`` + ``images/<image_id>``;
  label from ``majority`` (AMF = atypical = 1, NMF = 0); slide = ``filename``.
- AMi-Br (human breast, MIDOG21 + TUPAC16 slides): ``AMI-BR.csv`` + ``patches/{normal,atypical}/<dataset>_<uid>.png``;
  label from ``majority_atypical``. Its MIDOG21 figures are MIDOG25's human-breast figures: merged tables drop
  them, matched on (slide, coordinates).
- OMG-Octo: ``OMG-Octo.csv`` (``image_id, filename, majority``) + ``images/<image_id>``.
- AtNorM (the AMi-Br benchmark's external sets, AtNorM-Br and others): ``Atypical/*.png`` and ``Normal/*.png``,
  the label from the folder, and optionally one CSV of expert votes (``Filename, Expert_1..Expert_N, Majority``)
  beside them. No slide, scanner or pixel size is given: each crop is its own group, its pixel size
  ``ATNORM_PIXEL_SIZE_UM``.

Any table may hold pixel-identical crops under two ids (AtNorM-Br does): ``unique_figures`` counts each crop once
and leaves out, by name, the crops filed under both classes.

Every loader checks its table and names the bad rows; exact duplicate rows (the real OMG-Octo CSV has some) are
dropped with a warning, conflicting ones are an error. Patches are decoded once into one uint8 array.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from contracts import resample_to_pixel_size

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
ATNORM_CLASSES = {"Atypical": 1, "Normal": 0}  # folder -> label
# Votes as the AtNorM CSV may write them: a class name, AMF/NMF or a 0/1 flag
ATNORM_VOTES = {"atypical": 1, "normal": 0, "amf": 1, "nmf": 0, "1": 1, "0": 0, "true": 1, "false": 0}
# AtNorM states no pixel size. Its crops come from TCGA's 40x scans (Aperio scanners, 0.246-0.253 um/px), and
# the unseen-lab protocol serves them as cases that record 0.25 um/px.
ATNORM_PIXEL_SIZE_UM = 0.25
LABELS = {"NMF": 0, "AMF": 1}
BOOLEANS = {"True": 1, "False": 0, "true": 1, "false": 0, "1": 1, "0": 0}
PATCH_SIZE = 128
UNKNOWN = "unknown"
COORDINATE_TOLERANCE = 3  # pixels
# Micrometres per pixel at 40x, from the MIDOG 2021 challenge's description of its scanners. A scanner missing here
# cannot be trained with ``pixel_size_um`` set (add it, with its source); served pages carry their own.
SCANNER_PIXEL_SIZE_UM = {"Hamamatsu XR": 0.23, "Hamamatsu S360": 0.23, "Aperio CS2": 0.25, "Leica GT450": 0.26}
# MIDOG21 slides by number: 1-50 Hamamatsu XR, 51-100 Hamamatsu S360, 101-150 Aperio CS2 (151-200 unlabeled)
MIDOG21_SCANNERS = ((50, "Hamamatsu XR"), (100, "Hamamatsu S360"), (150, "Aperio CS2"))


class DataError(ValueError):
    """A dataset folder that does not follow its layout, with the offending rows named."""


@dataclass(frozen=True)
class Figure:
    image_id: str  # unique in a merged table: sources other than MIDOG25 are prefixed "<source>:"
    path: Path
    label: int  # 1 = atypical (majority of experts)
    slide: str
    tumor: str
    scanner: str
    origin: str = UNKNOWN
    species: str = UNKNOWN
    votes: tuple[int, ...] = ()  # each expert's call, 1 = atypical; empty where the source gives none
    source: str = "MIDOG25"
    coordinates: tuple[int, int] | None = None
    pixel_size_um: float | None = None  # where the source states it per figure; else its scanner's

    @property
    def domain(self) -> str:
        """What a figure's scores are grouped by: its scanner where known, else its origin (an AtNorM lab)."""
        return self.scanner if self.scanner != UNKNOWN else self.origin

    @property
    def soft_label(self) -> float:
        """Fraction of experts who called it atypical; the majority label where votes are not given."""
        return sum(self.votes) / len(self.votes) if self.votes else float(self.label)


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


def _atnorm_votes(root: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """The optional votes CSV: ``Class/file.png`` (or the bare file name, where it names one crop) -> (each
    expert's vote, the majority). Empty without a CSV; more than one CSV is an error."""
    tables = sorted(root.glob("*.csv"))
    if not tables:
        return {}
    if len(tables) > 1:
        raise DataError(f"{root}: more than one CSV ({', '.join(t.name for t in tables)}); keep the votes table only")
    with tables[0].open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        experts = [c for c in columns if re.fullmatch(r"Expert_\d+", c)]
        if "Filename" not in columns or "Majority" not in columns or not experts:
            raise DataError(f"{tables[0]}: want columns Filename, Expert_1..Expert_N, Majority (got {columns})")
        rows = list(reader)
    votes, bad = {}, []
    for i, row in enumerate(rows):
        calls = [ATNORM_VOTES.get(row[e].strip().lower()) for e in experts if row[e].strip()]
        majority = ATNORM_VOTES.get(row["Majority"].strip().lower())
        if majority is None or None in calls:
            bad.append(f"row {i + 2}")
        else:
            votes[row["Filename"].strip()] = (tuple(calls), majority)
    if bad:
        raise DataError(f"{tables[0]}: votes other than {sorted(ATNORM_VOTES)} at {', '.join(bad[:5])}")
    return votes


def read_atnorm(root: Path) -> list[Figure]:
    """An AtNorM folder: the label from the class folder, the votes (where a CSV gives them) checked against it."""
    votes = _atnorm_votes(root)
    files = [
        (name, label, path) for name, label in ATNORM_CLASSES.items() for path in sorted((root / name).glob("*.png"))
    ]
    bare = Counter(path.name for _, _, path in files)  # a bare file name in the CSV must name one crop
    figures, disagree = [], []
    for folder, label, path in files:
        key = f"{folder}/{path.name}"
        calls, majority = votes.get(key) or (votes.get(path.name) if bare[path.name] == 1 else None) or ((), label)
        if majority != label:
            disagree.append(key)
        figures.append(
            Figure(
                image_id=f"{root.name}:{key}",
                path=path,
                label=label,
                slide=f"{root.name}:{key}",  # no slide is given: a crop is its own group
                tumor=UNKNOWN,
                scanner=UNKNOWN,
                origin=root.name,
                votes=calls,
                source="AtNorM",
                pixel_size_um=ATNORM_PIXEL_SIZE_UM,
            )
        )
    if disagree:
        raise DataError(f"{root}: the votes' majority contradicts the class folder for {', '.join(disagree[:5])}")
    if not figures:
        raise DataError(f"{root}: no PNG crops in {' or '.join(f'{c}/' for c in ATNORM_CLASSES)}")
    return figures


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
