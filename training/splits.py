"""Cross-validation folds grouped by slide and stratified by label, persisted as ``splits.json`` in the run.

Built from image ids sorted first and a fixed seed (nnU-Net style), so the same data and seed give the same folds
on any machine; a run that finds ``splits.json`` reuses it instead of re-drawing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from training.data import Figure

log = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"


def slide_grouped_folds(figures: list[Figure], n_folds: int, seed: int) -> list[list[str]]:
    """Validation image ids of each fold; every slide's figures land in exactly one fold."""
    ordered = sorted(figures, key=lambda f: f.image_id)
    n_slides = len({f.slide for f in ordered})
    if n_slides < n_folds:
        raise ValueError(f"{n_slides} slides cannot fill {n_folds} slide-grouped folds")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    labels = np.array([f.label for f in ordered])
    groups = np.array([f.slide for f in ordered])
    return [
        sorted(ordered[i].image_id for i in val_idx)
        for _, val_idx in splitter.split(np.zeros(len(ordered)), labels, groups)
    ]


def load_or_create_splits(run_dir: Path, figures: list[Figure], n_folds: int, seed: int) -> list[list[str]]:
    path = run_dir / SPLITS_FILE
    ids = {f.image_id for f in figures}
    if path.is_file():
        saved = json.loads(path.read_text())
        folds = saved["val_ids"]
        if len(folds) != n_folds or {i for fold in folds for i in fold} != ids:
            raise ValueError(f"{path} was made for other data or fold count; use a new run folder")
        log.info("reusing %s", path)
        return folds
    folds = slide_grouped_folds(figures, n_folds, seed)
    path.write_text(json.dumps({"strategy": "slide-grouped-stratified", "seed": seed, "val_ids": folds}, indent=1))
    return folds
