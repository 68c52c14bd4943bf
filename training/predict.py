"""Score a dataset folder with an exported model through the container's own inference path (``process.py``)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np

from contracts import classify
from process import OnnxEnsemble
from training.data import on_scanners, read_dataset, scanner_pixel_sizes
from training.evaluate import evaluate
from training.figure import Figure
from training.metrics import PREDICTION_COLUMNS
from training.pixels import Duplicates, decode_figures, unique_figures

log = logging.getLogger(__name__)


class FiguresToScore(NamedTuple):
    figures: list[Figure]
    pixels: np.ndarray  # uint8 [N, 128, 128, 3]
    pixel_sizes: list[float | None]  # um/px, as a case's file records its own
    duplicates: Duplicates


def figures_to_score(data_root: Path, scanners: list[str] | None = None) -> FiguresToScore:
    """A dataset folder's figures (only the named scanners' if given), each distinct crop once and none filed
    under both classes (``pixels.unique_figures``), their decoded pixels and each one's pixel size."""
    figures = read_dataset(data_root)
    if scanners:
        figures = [f for f, keep in zip(figures, on_scanners(figures, scanners), strict=True) if keep]
    figures, pixels, duplicates = unique_figures(figures, decode_figures(figures))
    return FiguresToScore(figures, pixels, scanner_pixel_sizes(figures), duplicates)


def predict_folder(
    model_dir: Path,
    data_root: Path,
    output: Path,
    device: str = "auto",
    precision: str | None = None,
    scanners: list[str] | None = None,
) -> dict:
    """Write the predictions CSV (``training.metrics``' columns, each expert's vote where known as ``votes``, e.g.
    ``101``, and each crop's ``path``) and return
    ``evaluate``'s metrics at the manifest's threshold, with the duplicates found (``copies``, ``left_out``).
    ``precision`` None: the graph the manifest serves on the device, as the container runs it. ``scanners``:
    score only their figures (a run's held-out scanners)."""
    ensemble = OnnxEnsemble(model_dir, device, precision=precision)  # a missing model is said before any decoding
    figures, pixels, pixel_sizes, duplicates = figures_to_score(data_root, scanners)
    probs = ensemble.predict(list(pixels), pixel_sizes_um=pixel_sizes)
    preds = classify(probs, ensemble.manifest.threshold).astype(int)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*PREDICTION_COLUMNS, "votes", "path"])
        for fig, p, pred in zip(figures, probs, preds, strict=True):
            votes = "".join(map(str, fig.votes))
            writer.writerow([fig.image_id, fig.label, repr(float(p)), pred, fig.domain, votes, fig.path.resolve()])
    log.info(
        "wrote %d predictions to %s (%s on %s, threshold %.4f)",
        len(figures),
        output,
        ensemble.precision,
        ensemble.provider,
        ensemble.manifest.threshold,
    )
    domains = np.array([f.domain for f in figures])
    labels = np.array([f.label for f in figures])
    result = evaluate({"label": labels, "pred": preds, "prob": probs, "domain": domains})
    result["threshold"] = ensemble.manifest.threshold
    result["duplicates"] = {"copies": len(duplicates.copies), "left_out": duplicates.conflicting}
    return result
