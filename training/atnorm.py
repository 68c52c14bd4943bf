"""The AtNorM layout (the AMi-Br benchmark's external sets, AtNorM-Br and others): ``Atypical/*.png`` and
``Normal/*.png``, the label from the folder, and optionally one CSV of expert votes (``Filename, Expert_1..Expert_N,
Majority``) beside them. No slide, scanner or pixel size is given: each crop is its own group, its pixel size
``ATNORM_PIXEL_SIZE_UM``."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

from training.figure import UNKNOWN, DataError, Figure

ATNORM_CLASSES = {"Atypical": 1, "Normal": 0}  # folder -> label
# Votes as the AtNorM CSV may write them: a class name, AMF/NMF or a 0/1 flag
ATNORM_VOTES = {"atypical": 1, "normal": 0, "amf": 1, "nmf": 0, "1": 1, "0": 0, "true": 1, "false": 0}
# AtNorM states no pixel size. Its crops come from TCGA's 40x scans (Aperio scanners, 0.246-0.253 um/px), and
# the unseen-lab protocol serves them as cases that record 0.25 um/px.
ATNORM_PIXEL_SIZE_UM = 0.25


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
