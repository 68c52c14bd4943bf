"""Score a dataset folder with an exported model through the container's own inference path (``process.py``)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from contracts import classify
from process import OnnxEnsemble
from training.data import Figure, decode_figures, on_scanners, read_dataset, scanner_pixel_sizes
from training.metrics import PREDICTION_COLUMNS

log = logging.getLogger(__name__)


FiguresToScore = tuple[list[Figure], np.ndarray, list[float | None]]


def figures_to_score(data_root: Path, scanners: list[str] | None = None) -> FiguresToScore:
    """A dataset folder's figures (only the named scanners' if given), their decoded pixels, and each one's pixel
    size as its scanner records it, as a case's file records its own."""
    figures = read_dataset(data_root)
    if scanners:
        figures = [f for f, keep in zip(figures, on_scanners(figures, scanners), strict=True) if keep]
    return figures, decode_figures(figures), scanner_pixel_sizes(figures)


def predict_folder(
    model_dir: Path,
    data_root: Path,
    output: Path,
    device: str = "auto",
    precision: str | None = None,
    scanners: list[str] | None = None,
) -> None:
    """``precision`` None: the graph the manifest serves on the device, as the container runs it. ``scanners``:
    score only their figures (a run's held-out scanners)."""
    figures, pixels, pixel_sizes = figures_to_score(data_root, scanners)
    ensemble = OnnxEnsemble(model_dir, device, precision=precision)
    probs = ensemble.predict(list(pixels), pixel_sizes_um=pixel_sizes)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PREDICTION_COLUMNS)
        preds = classify(probs, ensemble.manifest.threshold)
        for fig, p, pred in zip(figures, probs, preds, strict=True):
            writer.writerow([fig.image_id, fig.label, repr(float(p)), int(pred), fig.scanner])
    log.info(
        "wrote %d predictions to %s (%s on %s, threshold %.4f)",
        len(figures),
        output,
        ensemble.precision,
        ensemble.provider,
        ensemble.manifest.threshold,
    )
