"""The challenge's figures for a predictions file, pooled over all figures and per domain.

Input CSV (``python -m training predict`` writes it): ``image_id, label`` (1 = atypical), ``prob_atypical``,
``pred`` (0/1, the class the container answered) and ``domain``. As the challenge scores: balanced accuracy,
sensitivity (atypical recall), specificity and accuracy from ``pred``; ROC AUC from ``prob_atypical``. Plus a 95%
bootstrap interval of the balanced accuracy, resampling figures with a seeded generator:
``numpy.random.default_rng(seed).integers(0, n, size=(resamples, n))``, percentiles 2.5 and 97.5.

And, pooled and per domain, an oracle: the threshold that would maximize balanced accuracy on those very figures
and the balanced accuracy it reaches. Set against the figures at the threshold fixed in advance, it shows how much
a domain loses to calibration shift (an unseen scanner moving every probability up or down) rather than to
ranking (its AUC); each class's mean probability shows the shift itself.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from training.metrics import balanced_accuracy, choose_threshold

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("image_id", "label", "prob_atypical", "pred", "domain")
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def read_predictions(path: Path, threshold: float | None = None,
                     column: str = "prob_atypical") -> dict[str, np.ndarray]:  # fmt: skip
    """The predictions file; with ``threshold``, classes come from ``prob_atypical >= threshold`` instead of a
    ``pred`` column (a run's ``oof.csv`` with its ``summary.json`` threshold). ``column`` names another
    probability column to score (``prob_atypical_no_tta`` of a run trained with tta)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        wanted = [column if c == "prob_atypical" else c for c in PREDICTION_COLUMNS]
        wanted = [c for c in wanted if not (c == "pred" and threshold is not None)]
        missing = [c for c in wanted if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (want {', '.join(PREDICTION_COLUMNS)})")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no predictions")
    if threshold is not None:
        rows = [{**r, "pred": str(int(float(r[column]) >= threshold))} for r in rows]
    bad = [f"row {i + 2}" for i, r in enumerate(rows) if r["label"] not in ("0", "1") or r["pred"] not in ("0", "1")]
    if bad:
        raise ValueError(f"{path}: label and pred must be 0 or 1 ({', '.join(bad[:5])})")
    return {
        "label": np.array([int(r["label"]) for r in rows]),
        "pred": np.array([int(r["pred"]) for r in rows]),
        "prob": np.array([float(r[column]) for r in rows]),
        "domain": np.array([r["domain"] for r in rows]),
    }


def _mean_where(values: np.ndarray, mask: np.ndarray) -> float:
    """The mean of ``values`` where ``mask`` holds (NaN where it never does)."""
    return float(values[mask].mean()) if mask.any() else math.nan


def figures(label: np.ndarray, pred: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    positive = label == 1
    sensitivity = _mean_where(pred == 1, positive)
    specificity = _mean_where(pred == 0, ~positive)
    both_classes = 0 < positive.sum() < len(label)
    oracle = choose_threshold(label, prob) if both_classes else math.nan
    return {
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "accuracy": float((pred == label).mean()),
        "roc_auc": float(roc_auc_score(label, prob)) if both_classes else math.nan,
        "oracle_threshold": oracle,
        "oracle_balanced_accuracy": balanced_accuracy(label, prob >= oracle) if both_classes else math.nan,
        # each class's mean probability: a domain whose figures of both classes score higher than elsewhere is
        # miscalibrated, not misranked
        "mean_prob_normal": _mean_where(prob, ~positive),
        "mean_prob_atypical": _mean_where(prob, positive),
        "n": len(label),
    }


def bootstrap_ci(label: np.ndarray, pred: np.ndarray, resamples: int, seed: int) -> list[float]:
    """95% percentile interval of the balanced accuracy over figure resamples (those lacking a class are skipped)."""
    idx = np.random.default_rng(seed).integers(0, len(label), size=(resamples, len(label)))
    lab, hit = label[idx] == 1, pred[idx] == label[idx]
    n_pos, n_neg = lab.sum(axis=1), (~lab).sum(axis=1)
    ok = (n_pos > 0) & (n_neg > 0)
    sens = (hit & lab).sum(axis=1)[ok] / n_pos[ok]
    spec = (hit & ~lab).sum(axis=1)[ok] / n_neg[ok]
    lo, hi = np.percentile((sens + spec) / 2, [2.5, 97.5])
    return [float(lo), float(hi)]


def evaluate(preds: dict[str, np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    result = figures(preds["label"], preds["pred"], preds["prob"])
    result["balanced_accuracy_ci"] = bootstrap_ci(preds["label"], preds["pred"], resamples, seed)
    result["domains"] = {
        str(d): figures(preds["label"][m], preds["pred"][m], preds["prob"][m])
        for d in np.unique(preds["domain"])
        for m in [preds["domain"] == d]
    }
    return result


def table(result: dict) -> str:
    keys = ("balanced_accuracy", "sensitivity", "specificity", "accuracy", "roc_auc", "oracle_threshold",
            "oracle_balanced_accuracy", "mean_prob_normal", "mean_prob_atypical", "n")  # fmt: skip
    header = {"oracle_balanced_accuracy": "oracle_BA", "mean_prob_normal": "meanP_normal",
              "mean_prob_atypical": "meanP_atypical"}  # fmt: skip
    lines = [f"{'':24}" + "".join(f"{header.get(k, k)[:17]:>18}" for k in keys)]
    for name, figs in [("all", result), *result["domains"].items()]:
        lines.append(f"{name[:24]:24}" + "".join(f"{figs[k]:>18.4f}" if k != "n" else f"{figs[k]:>18d}" for k in keys))
    lo, hi = result["balanced_accuracy_ci"]
    lines.append(f"balanced accuracy 95% bootstrap interval: [{lo:.4f}, {hi:.4f}]")
    return "\n".join(lines)


def evaluate_file(path: Path, json_out: Path | None = None, threshold: float | None = None,
                  column: str = "prob_atypical") -> dict:  # fmt: skip
    result = evaluate(read_predictions(path, threshold, column))
    print(table(result))  # the report is this command's output
    if json_out is not None:
        json_out.write_text(json.dumps(nan_as_null(result), indent=1, allow_nan=False) + "\n")
        log.info("wrote %s", json_out)
    return result


def nan_as_null(value):
    """NaN (the AUC of a domain with one class) is not JSON: null instead."""
    if isinstance(value, dict):
        return {k: nan_as_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_as_null(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value
