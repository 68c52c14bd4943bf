"""Cross-validation folds, persisted as ``splits.json`` in the run, and each fold's figures (``fold_data``).

Strategies:
- ``slide`` (default): stratified by label, grouped by slide: no slide's figures are both trained on and validated.
- ``random``: stratified image-level folds, as the organizers' guide does; figures of one slide land in several
  folds, so validation figures share slides (and their stain and scanner) with training: optimistic.
- ``domain``: leave-one-domain-out, one fold per tumor type or scanner, for generalization to unseen domains.

Folds are built from image ids sorted first and a fixed seed (nnU-Net style), so the same data and seed give the
same folds on any machine; a run that finds ``splits.json`` reuses it instead of re-drawing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from training.config import TrainConfig
from training.figure import Figure
from training.run import RunFolder

log = logging.getLogger(__name__)


def _sorted(figures: list[Figure]) -> tuple[list[Figure], np.ndarray]:
    ordered = sorted(figures, key=lambda f: f.image_id)
    return ordered, np.array([f.label for f in ordered])


def slide_grouped_folds(figures: list[Figure], n_folds: int, seed: int) -> list[list[str]]:
    """Validation image ids of each fold; every slide's figures land in exactly one fold."""
    ordered, labels = _sorted(figures)
    n_slides = len({f.slide for f in ordered})
    if n_slides < n_folds:
        raise ValueError(f"{n_slides} slides cannot fill {n_folds} slide-grouped folds")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    groups = np.array([f.slide for f in ordered])
    return [
        sorted(ordered[i].image_id for i in val_idx)
        for _, val_idx in splitter.split(np.zeros(len(ordered)), labels, groups)
    ]


def random_folds(figures: list[Figure], n_folds: int, seed: int) -> list[list[str]]:
    ordered, labels = _sorted(figures)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [sorted(ordered[i].image_id for i in val_idx) for _, val_idx in splitter.split(labels, labels)]


def domain_folds(figures: list[Figure], domain: str, n_folds: int) -> list[list[str]]:
    """One fold per value of ``domain`` ('tumor' or 'scanner'), in sorted order."""
    values = sorted({getattr(f, domain) for f in figures})
    if len(values) != n_folds:
        raise ValueError(
            f"leave-one-{domain}-out on this data has {len(values)} domains {values}: set folds: {len(values)}"
        )
    return [sorted(f.image_id for f in figures if getattr(f, domain) == value) for value in values]


def make_folds(figures: list[Figure], cfg: TrainConfig) -> list[list[str]]:
    if cfg.split == "slide":
        return slide_grouped_folds(figures, cfg.folds, cfg.seed)
    if cfg.split == "random":
        return random_folds(figures, cfg.folds, cfg.seed)
    return domain_folds(figures, cfg.domain, cfg.folds)


def training_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the training figures a data-scaling run keeps: per class, ``fraction`` of its figures
    (at least one), drawn by a seeded permutation. Smaller amounts are subsets of larger
    ones (the same permutation's first figures), so a scaling curve adds data rather than swapping it.
    """
    rng = np.random.default_rng(seed)
    keep = []
    for value in (0, 1):
        members = np.flatnonzero(np.asarray(labels) == value)
        n = max(1, round(fraction * len(members))) if len(members) else 0
        keep.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(keep))


def load_or_create_splits(run: RunFolder, figures: list[Figure], cfg: TrainConfig) -> list[list[str]]:
    """The run's ``splits.json`` (validation image ids per fold), made on the first call and reused after;
    ValueError if it was made for other figures or another fold count."""
    path = run.splits
    ids = {f.image_id for f in figures}
    if path.is_file():
        saved = json.loads(path.read_text())
        folds = saved["val_ids"]
        if len(folds) != cfg.folds or {i for fold in folds for i in fold} != ids:
            raise ValueError(f"{path} was made for other data or fold count; use a new run folder")
        log.info("reusing %s", path)
        return folds
    folds = make_folds(figures, cfg)
    strategy = {"split": cfg.split, "seed": cfg.seed, **({"domain": cfg.domain} if cfg.split == "domain" else {})}
    path.write_text(json.dumps({**strategy, "val_ids": folds}, indent=1))
    return folds


@dataclass(frozen=True)
class FoldData:
    """A fold's figures: training pixels [N, H, W, 3] (or embeddings) and targets (soft with ``soft_labels``),
    validation pixels and hard labels, and the validation figures in that order."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    val_figures: list[Figure]
    n_train: int


def fold_data(cfg: TrainConfig, fold: int, figures: list[Figure], pixels: np.ndarray, val_ids: set[str]) -> FoldData:
    is_val = np.array([f.image_id in val_ids for f in figures])
    labels = np.array([f.label for f in figures], dtype=np.float32)
    train_idx = np.flatnonzero(~is_val)
    if cfg.train_fraction < 1:
        keep = training_subset(labels[train_idx], cfg.train_fraction, cfg.seed + fold)
        log.info("fold %d: training on %d of %d figures", fold, len(keep), len(train_idx))
        train_idx = train_idx[keep]
    train_y = labels[train_idx]
    if cfg.soft_labels:
        train_y = np.array([figures[i].soft_label for i in train_idx], dtype=np.float32)
    val_figures = [f for f, v in zip(figures, is_val, strict=True) if v]
    return FoldData(pixels[train_idx], train_y, pixels[is_val], labels[is_val], val_figures, len(train_idx))
