"""The challenge's metrics and the one predictions CSV shape that train, predict, evaluate and the lab share.

Metrics, defined once here with the official evaluation's conventions (DeepMicroscopy/MIDOG25_T2_evaluation_docker:
sklearn's ``recall_score``, so a class with no figures has sensitivity or specificity 0.0): balanced accuracy
from classes, AUC from P(atypical) (NaN with one class), classes always by ``contracts.classify``.

The predictions CSV, one row per figure: ``image_id``, ``label`` (1 = atypical), ``prob_atypical`` and ``domain``
(the scanner), then any of ``pred`` (0/1, the class the container answered: ``predict``), ``fold``, ``tumor``,
``prob_atypical_no_tta`` (a run's ``val.csv`` and ``oof.csv``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from contracts import classify

PREDICTION_COLUMNS = ("image_id", "label", "prob_atypical", "pred", "domain")  # what predict writes
REQUIRED_COLUMNS = ("image_id", "label", "prob_atypical", "domain")


def class_rates(labels: np.ndarray, preds: np.ndarray) -> tuple[float, float]:
    """(sensitivity, specificity), atypical = 1 the positive class; 0.0 for a class with no figures."""
    labels = np.asarray(labels).astype(bool)
    preds = np.asarray(preds).astype(bool)
    sensitivity = float(preds[labels].mean()) if labels.any() else 0.0
    specificity = float((~preds[~labels]).mean()) if (~labels).any() else 0.0
    return sensitivity, specificity


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """(sensitivity + specificity) / 2, the challenge's ranking metric."""
    return float(np.mean(class_rates(labels, preds)))


def scores(labels: np.ndarray, preds: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, sensitivity, specificity and accuracy of the classes ``preds``; ROC AUC of ``probs``
    (NaN with one class or a probability that is not finite); n."""
    labels, preds, probs = np.asarray(labels).astype(int), np.asarray(preds).astype(int), np.asarray(probs)
    sensitivity, specificity = class_rates(labels, preds)
    auc_defined = len(np.unique(labels)) == 2 and np.isfinite(probs).all()
    return {
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "accuracy": float((preds == labels).mean()) if len(labels) else float("nan"),
        "roc_auc": float(roc_auc_score(labels, probs)) if auc_defined else float("nan"),
        "n": len(labels),
    }


def summarize(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """``scores`` at ``threshold``, with the threshold."""
    return {**scores(labels, classify(probs, threshold), probs), "threshold": float(threshold)}


def choose_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold that maximizes balanced accuracy under ``contracts.classify``. Candidates are midpoints
    between consecutive distinct probabilities, so the cut sits in a gap rather than on an example. Ties go to the
    candidate closest to 0.5."""
    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    values = np.unique(probs)
    candidates = np.concatenate([[0.0], (values[:-1] + values[1:]) / 2, [np.nextafter(values[-1], 2.0)]])
    candidates = np.clip(candidates, 0.0, 1.0)
    scores = np.array([balanced_accuracy(labels, classify(probs, t)) for t in candidates])
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict]) -> None:
    """``rows`` as a CSV, columns in the first row's key order."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_predictions(path: Path, threshold: float | None = None, column: str = "prob_atypical") -> dict:
    """A predictions CSV as arrays: ``label``, ``prob`` (from ``column``, e.g. ``prob_atypical_no_tta``),
    ``domain``, ``pred`` (the file's, or with ``threshold`` ``contracts.classify``'s: a run's ``oof.csv`` with its
    ``summary.json`` threshold), and ``fold`` and ``tumor`` where the file has them.

    Raises ValueError naming the file for missing columns, no rows, or a label or pred other than 0 or 1.
    """
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        wanted = [column if c == "prob_atypical" else c for c in REQUIRED_COLUMNS]
        wanted += ["pred"] if threshold is None else []
        missing = [c for c in wanted if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (want {', '.join(PREDICTION_COLUMNS)})")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no predictions")
    prob = np.array([float(r[column]) for r in rows])
    if threshold is not None:
        rows = [{**r, "pred": str(int(a))} for r, a in zip(rows, classify(prob, threshold), strict=True)]
    bad = [f"row {i + 2}" for i, r in enumerate(rows) if r["label"] not in ("0", "1") or r["pred"] not in ("0", "1")]
    if bad:
        raise ValueError(f"{path}: label and pred must be 0 or 1 ({', '.join(bad[:5])})")
    arrays = {
        "label": np.array([int(r["label"]) for r in rows]),
        "pred": np.array([int(r["pred"]) for r in rows]),
        "prob": prob,
        "domain": np.array([r["domain"] for r in rows]),
    }
    if "fold" in rows[0]:
        arrays["fold"] = np.array([int(r["fold"]) for r in rows])
    if "tumor" in rows[0]:
        arrays["tumor"] = np.array([r["tumor"] for r in rows])
    return arrays


def pool_out_of_fold(val_files: list[Path], oof_file: Path) -> dict:
    """Concatenate the folds' held-out predictions (``val_files``) into ``oof_file``, choose the threshold there
    and return it with its figures (pooled, per scanner,
    at 0.5, and without TTA where the files have it).

    The threshold is chosen on single-fold probabilities and applied to the mean over folds, whose probabilities
    are a little less extreme; with a BA-maximizing cut between classes this costs little, and it is the only
    unbiased choice (no figure is scored by a fold that trained on it).
    """
    rows = [row for path in val_files for row in read_rows(path)]
    write_rows(oof_file, rows)
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([float(r["prob_atypical"]) for r in rows])
    scanners = np.array([r["domain"] for r in rows])
    threshold = choose_threshold(labels, probs)
    summary = {"threshold": threshold, "oof": summarize(labels, probs, threshold)}
    summary["oof_at_0.5"] = summarize(labels, probs, 0.5)
    if "prob_atypical_no_tta" in rows[0]:  # the same folds without test-time augmentation, at their own threshold
        single = np.array([float(r["prob_atypical_no_tta"]) for r in rows])
        summary["oof_no_tta"] = summarize(labels, single, choose_threshold(labels, single))
    summary["oof_by_scanner"] = {
        str(s): summarize(labels[scanners == s], probs[scanners == s], threshold) for s in np.unique(scanners)
    }
    return summary


def read_mean_predictions(paths: list[Path], threshold: float | None = None, column: str = "prob_atypical") -> dict:
    """``read_predictions`` of one file; of several (the same figures scored by several models, e.g. each run's
    ``oof.csv`` or its ``external/<name>.csv``), the mean probability per ``image_id``, every file weighing the
    same (an ensemble of runs with as many folds each), classes at ``threshold``, which several files require.
    ValueError naming the file whose figures or labels differ from the first's."""
    if len(paths) == 1:
        return read_predictions(paths[0], threshold, column)
    if threshold is None:
        raise ValueError("several predictions files are averaged, then classed: give --threshold")
    first = read_predictions(paths[0], threshold, column)
    ids = [r["image_id"] for r in read_rows(paths[0])]
    probs = [first["prob"]]
    for path in paths[1:]:
        other = read_predictions(path, threshold, column)
        where = {r["image_id"]: i for i, r in enumerate(read_rows(path))}
        if set(where) != set(ids):
            raise ValueError(f"{path}: scores other figures than {paths[0]}")
        order = np.array([where[i] for i in ids])
        if not np.array_equal(other["label"][order], first["label"]):
            raise ValueError(f"{path}: labels differ from {paths[0]}'s")
        probs.append(other["prob"][order])
    mean = np.mean(probs, axis=0)
    return {**first, "prob": mean, "pred": classify(mean, threshold).astype(int)}
