"""Runs an experiment grid (``training.lab.grid``): trains its cells, measures blur robustness and cost, and
hands the finished cells to ``training.lab.report``."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from contracts import classify
from training.adapt import classifier_of, load_fold_model
from training.config import TrainConfig
from training.data import read_datasets
from training.evaluate import domain_scores
from training.figure import Figure
from training.lab.grid import BLUR_FILE, COST_FILE, STACK, Cell, GridConfig, expand, load_grid
from training.lab.report import collect, write_report
from training.model import classifier_for, preprocess_for
from training.pixels import decode_figures
from training.preprocess import Preprocess, mean_over_views, model_input
from training.run import RunFolder
from training.train import train_run

log = logging.getLogger(__name__)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of float [N, C, H, W], reflected borders, radius 3 sigma; sigma 0 = unchanged."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype) / sigma) ** 2)
    taps = taps / taps.sum()
    channels = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


@torch.no_grad()
def blurred_probs(
    model: torch.nn.Module,
    preprocess: Preprocess,
    pixels: np.ndarray,
    sigma: float,
    where: str,
    tta: bool,
    batch_size: int = 128,
) -> np.ndarray:
    """P(atypical) with the figures blurred ``pre`` the resize (on the 128 px crop-out, as a blurry scan would be)
    or ``post`` it (on the model's input); the two differ by the resize factor, and not at all at native size.
    Otherwise as served: ``Preprocess`` and, with ``tta``, the mean over the 8 D4 views."""
    device = next(model.parameters()).device
    post = (lambda x: gaussian_blur(x, sigma)) if where == "post" else None
    probs = []
    for start in range(0, len(pixels), batch_size):
        x = torch.from_numpy(pixels[start : start + batch_size]).to(device).float()
        if where == "pre":  # NHWC -> NCHW for the blur, and back
            x = gaussian_blur(x.permute(0, 3, 1, 2), sigma).permute(0, 2, 3, 1)
        p = torch.sigmoid(model(model_input(preprocess, x, tta, post)).float())
        probs.append(mean_over_views(p, 8 if tta else 1).cpu().numpy())
    return np.concatenate(probs)


def measure_blur(cell: Cell, run_dir: Path, figures: list[Figure], pixels: np.ndarray, sigmas: list[float]) -> dict:
    """Balanced accuracy (at the cell's threshold) and AUC of the out-of-fold predictions under blur."""
    index = {f.image_id: i for i, f in enumerate(figures)}
    run = RunFolder(run_dir)
    val_ids, threshold = run.read_val_ids(), run.read_summary()["threshold"]
    labels = np.array([f.label for f in figures])
    result: dict[str, dict[str, dict[str, float]]] = {"pre": {}, "post": {}}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = cell.config.spec()
    models = [load_fold_model(spec, run.fold(k).path).to(device) for k in range(cell.config.folds)]
    preprocess = preprocess_for(spec, classifier_of(models[0])).to(device)
    for where in result:
        for sigma in [0.0, *sigmas]:
            rows = [np.array([index[i] for i in ids]) for ids in val_ids]
            probs = [
                blurred_probs(m, preprocess, pixels[r], sigma, where, cell.config.tta)
                for m, r in zip(models, rows, strict=True)
            ]
            idx, p = np.concatenate(rows), np.concatenate(probs)
            figs = domain_scores(labels[idx], classify(p, threshold).astype(int), p)
            result[where][str(sigma)] = {k: figs[k] for k in ("balanced_accuracy", "roc_auc")}
    return result


def measure_cost(config: TrainConfig) -> dict[str, float]:
    """Parameters, GFLOPs per 128 px figure (resize included), and the median time of one 16-figure stack."""
    classifier = classifier_for(config.spec()).eval()
    preprocess = preprocess_for(config.spec(), classifier)
    stack = torch.randint(0, 256, (STACK, 128, 128, 3), dtype=torch.uint8)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            classifier(preprocess(stack[:1]))
        classifier(preprocess(stack))  # warm-up
        times = []
        for _ in range(5):
            started = time.perf_counter()
            classifier(preprocess(stack))
            times.append(time.perf_counter() - started)
    return {
        "parameters_m": sum(p.numel() for p in classifier.parameters()) / 1e6,
        "gflops_per_image": counter.get_total_flops() / 1e9,
        "cpu_s_per_stack": float(np.median(times)),
    }


def _parse_shard(shard: str | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    match = re.fullmatch(r"(\d+)/(\d+)", shard)
    if not match or not int(match[1]) < int(match[2]):
        raise ValueError(f"--shard {shard!r}: write K/N with 0 <= K < N")
    return int(match[1]), int(match[2])


def run_grid(
    grid_path: Path,
    data_roots: list[Path],
    output: Path,
    report_dir: Path | None = None,
    shard: str | None = None,
    report_only: bool = False,
) -> list[dict]:
    """Train this shard's unfinished cells, measure them, and write the report of every finished cell."""
    grid = load_grid(grid_path)
    k, n = _parse_shard(shard)
    figures = read_datasets(data_roots)
    cells = expand(grid, figures)
    cache = output / "decoded"
    pixels = decode_figures(figures, cache)
    log.info("grid %s: %d cells%s", grid.name, len(cells), f", shard {k}/{n}" if n > 1 else "")
    blur_methods = set(grid.blur.methods or grid.methods) if grid.blur else set()
    for i, cell in enumerate(tqdm(cells, desc="cells", unit="cell", disable=None)):
        run_dir = output / "cells" / cell.name
        if report_only or i % n != k:
            continue
        if not RunFolder(run_dir).finished:
            log.info("cell %d/%d: %s", i + 1, len(cells), cell.name)
            train_run(cell.config, data_roots, run_dir, cache_dir=cache)
        wants_blur = cell.method in blur_methods and cell.split == "slide" and cell.data == "100%"
        if grid.blur and wants_blur and RunFolder(run_dir).finished and not (run_dir / BLUR_FILE).is_file():
            blur = measure_blur(cell, run_dir, figures, pixels, grid.blur.sigmas)
            (run_dir / BLUR_FILE).write_text(json.dumps(blur, indent=1))
    costs = _costs(grid, cells, output) if grid.cost else {}
    rows = collect(cells, output / "cells", costs)
    unfinished = [c.name for c in cells if not RunFolder(output / "cells" / c.name).finished]
    write_report(grid_path, grid, rows, output, report_dir or output, data_roots, unfinished, shard)
    return rows


def _costs(grid: GridConfig, cells: list[Cell], output: Path) -> dict[str, dict[str, float]]:
    """Cost per method, measured once and kept in ``OUT/cost.json``."""
    path = output / COST_FILE
    costs = json.loads(path.read_text()) if path.is_file() else {}
    for cell in cells:
        if cell.method not in costs:
            log.info("measuring the cost of %s", cell.method)
            costs[cell.method] = measure_cost(cell.config)
            output.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(costs, indent=1))
    return costs
