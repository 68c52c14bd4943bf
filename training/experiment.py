"""Experiment grids: many training runs from one YAML file, measured the same way, reported together.

A grid file (``training/configs/experiments/``)::

    name: cpu-grid
    base: ../cpu-small.yaml                # the training config every cell starts from (relative to this file)
    overrides: {epochs: 10}                # changes to the base for the whole grid
    methods:                               # method name -> changes to the base
      efficientnetv2-b0: {}
      custom-vit: {backbone: custom-vit-scratch}
    studies:                               # each a cross product; a cell that two studies share runs once
      - name: data-scaling
        methods: [efficientnetv2-b0]       # default: every method
        data: ["10%", "100%", "256/class"] # share of each class, or a cap per class, of each fold's training set
        split: [slide]                     # slide | random | scanner-out | tumor-out
        seeds: [42]
    blur:                                  # robustness, on each method's slide-split full-data cells
      sigmas: [1.0, 2.0]                   # Gaussian sigma in pixels of the image it is applied to
    cost: true                             # parameters, GFLOPs per image, latency per 16-figure stack

``python -m training experiment --config GRID --data-root DIR --output OUT`` trains every unfinished cell
into ``OUT/cells/<cell>/`` (a run folder like ``train``'s; its ``summary.json`` marks it finished, a killed cell
resumes), measures blur robustness and cost, and writes ``results.csv``, ``domains.csv``, ``report.md`` and the
plots (``training.report``). ``--shard K/N`` trains every N-th cell only, so a grid splits across machines that
share ``OUT``; ``--report-only`` writes the report from the finished cells.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from training.adapt import load_fold_model
from training.config import TrainConfig, layered, load_config, validated
from training.data import Figure, decode_figures, read_datasets
from training.evaluate import figures as figures_of
from training.model import Classifier, Preprocess, classifier_for
from training.train import train_run

log = logging.getLogger(__name__)

SPLITS: dict[str, dict[str, str]] = {
    "slide": {"split": "slide"},
    "random": {"split": "random"},
    "scanner-out": {"split": "domain", "domain": "scanner"},
    "tumor-out": {"split": "domain", "domain": "tumor"},
}
DATA_AMOUNT = re.compile(r"^(?:(?P<percent>\d+(?:\.\d+)?)%|(?P<cap>\d+)/class)$")
SUMMARY = "summary.json"
BLUR_FILE = "blur.json"
COST_FILE = "cost.json"
STACK = 16  # figures per case: the latency the container pays


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Study(_Strict):
    name: str
    methods: list[str] | None = None
    data: list[str] = ["100%"]
    split: list[Literal["slide", "random", "scanner-out", "tumor-out"]] = ["slide"]
    seeds: list[int] = [42]

    @field_validator("data")
    @classmethod
    def _amounts_parse(cls, amounts: list[str]) -> list[str]:
        for amount in amounts:
            parse_amount(amount)
        return amounts


class BlurStudy(_Strict):
    sigmas: list[float] = Field(min_length=1)
    methods: list[str] | None = None


class GridConfig(_Strict):
    name: str
    base: Path
    overrides: dict[str, Any] = {}
    methods: dict[str, dict[str, Any]] = Field(min_length=1)
    studies: list[Study] = Field(min_length=1)
    blur: BlurStudy | None = None
    cost: bool = True


def parse_amount(amount: str) -> dict[str, Any]:
    """'10%' -> a share of each class; '256/class' -> a cap per class (of each fold's training figures)."""
    match = DATA_AMOUNT.match(amount)
    if not match:
        raise ValueError(f"data amount {amount!r}: write a share like '10%' or a cap like '256/class'")
    if match["cap"]:
        return {"train_per_class": int(match["cap"])}
    percent = float(match["percent"])
    if not 0 < percent <= 100:
        raise ValueError(f"data amount {amount!r}: the share must be in (0, 100]")
    return {"train_fraction": percent / 100}


def amount_tag(amount: str) -> str:
    return amount.replace("%", "pct").replace("/", "-per-")


class Cell(BaseModel):
    """One training run of the grid and the axes it sits on."""

    model_config = ConfigDict(frozen=True)
    method: str
    split: str
    data: str
    seed: int
    config: TrainConfig

    @property
    def name(self) -> str:
        return f"{self.method}__{self.split}__{amount_tag(self.data)}__seed{self.seed}"

    @property
    def domain_key(self) -> str:
        """The figure attribute this cell's figures are broken down by: tumor for tumor-out, else scanner."""
        return "tumor" if self.split == "tumor-out" else "scanner"


def load_grid(path: Path) -> GridConfig:
    grid = validated(GridConfig, yaml.safe_load(Path(path).read_text()) or {}, path)
    unknown = {m for s in grid.studies for m in s.methods or []} | set(grid.blur.methods or [] if grid.blur else [])
    unknown -= set(grid.methods)
    if unknown:
        raise ValueError(f"{path}: studies name methods the grid does not define: {sorted(unknown)}")
    return grid.model_copy(update={"base": (Path(path).parent / grid.base).resolve()})


def expand(grid: GridConfig, figures: list[Figure]) -> list[Cell]:
    """Every distinct cell of every study, in the order the grid file declares them (put what matters first);
    configs validated here, before anything trains."""
    cells: dict[str, Cell] = {}
    for study in grid.studies:
        axes = (study.methods or list(grid.methods), study.split, study.data, study.seeds)
        for method, split, amount, seed in itertools.product(*axes):
            method_config = layered(grid.overrides, grid.methods[method])  # a method's epochs replace the grid's steps
            changes = {**method_config, **SPLITS[split], **parse_amount(amount), "seed": seed}
            if split.endswith("-out"):  # one fold per domain present in the data
                domains = {getattr(f, SPLITS[split]["domain"]) for f in figures}
                if len(domains) < 2:
                    raise ValueError(f"study {study.name}: {split} needs two or more domains; the data has "
                                     f"{sorted(domains)}")  # fmt: skip
                changes["folds"] = len(domains)
            cell = Cell(method=method, split=split, data=amount, seed=seed, config=load_config(grid.base, changes))
            cell = cell.model_copy(update={"config": cell.config.model_copy(update={"name": cell.name})})
            cells[cell.name] = cell
    return list(cells.values())


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
def blurred_probs(model: torch.nn.Module, preprocess: Preprocess, pixels: np.ndarray, sigma: float, where: str,
                  batch_size: int = 128) -> np.ndarray:  # fmt: skip
    """P(atypical) with the figures blurred ``pre`` the resize (on the 128 px crop-out, as a blurry scan would be)
    or ``post`` it (on the model's input); the two differ by the resize factor, and not at all at native size."""
    device = next(model.parameters()).device
    probs = []
    for start in range(0, len(pixels), batch_size):
        x = torch.from_numpy(pixels[start : start + batch_size]).to(device).permute(0, 3, 1, 2).float()
        x = preprocess.resize(gaussian_blur(x, sigma) if where == "pre" else x)
        x = preprocess.normalize(gaussian_blur(x, sigma) if where == "post" else x)
        probs.append(torch.sigmoid(model(x).float()).cpu().numpy())
    return np.concatenate(probs)


def _classifier_of(model: torch.nn.Module) -> Classifier:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def measure_blur(cell: Cell, run_dir: Path, figures: list[Figure], pixels: np.ndarray, sigmas: list[float]) -> dict:
    """Balanced accuracy (at the cell's threshold) and AUC of the out-of-fold predictions under blur."""
    index = {f.image_id: i for i, f in enumerate(figures)}
    val_ids = json.loads((run_dir / "splits.json").read_text())["val_ids"]
    threshold = json.loads((run_dir / SUMMARY).read_text())["threshold"]
    labels = np.array([f.label for f in figures])
    result: dict[str, dict[str, dict[str, float]]] = {"pre": {}, "post": {}}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [load_fold_model(cell.config, run_dir / f"fold_{k}").to(device) for k in range(cell.config.folds)]
    preprocess = Preprocess.for_backbone(_classifier_of(models[0]).backbone).to(device)
    for where in result:
        for sigma in [0.0, *sigmas]:
            rows = [np.array([index[i] for i in ids]) for ids in val_ids]
            probs = [blurred_probs(m, preprocess, pixels[r], sigma, where) for m, r in zip(models, rows, strict=True)]
            idx, p = np.concatenate(rows), np.concatenate(probs)
            figs = figures_of(labels[idx], (p >= threshold).astype(int), p)
            result[where][str(sigma)] = {k: figs[k] for k in ("balanced_accuracy", "roc_auc")}
    return result


def measure_cost(config: TrainConfig) -> dict[str, float]:
    """Parameters, GFLOPs per 128 px figure (resize included), and the median time of one 16-figure stack."""
    classifier = classifier_for(config).eval()
    preprocess = Preprocess.for_backbone(classifier.backbone)
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


def run_grid(grid_path: Path, data_roots: list[Path], output: Path, report_dir: Path | None = None,
             shard: str | None = None, report_only: bool = False) -> list[dict]:  # fmt: skip
    """Train this shard's unfinished cells, measure them, and write the report of every finished cell."""
    from training.report import collect, write_report  # here: the report module reads this one's names

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
        if not (run_dir / SUMMARY).is_file():
            log.info("cell %d/%d: %s", i + 1, len(cells), cell.name)
            train_run(cell.config, data_roots, run_dir, cache_dir=cache)
        wants_blur = cell.method in blur_methods and cell.split == "slide" and cell.data == "100%"
        if grid.blur and wants_blur and (run_dir / SUMMARY).is_file() and not (run_dir / BLUR_FILE).is_file():
            blur = measure_blur(cell, run_dir, figures, pixels, grid.blur.sigmas)
            (run_dir / BLUR_FILE).write_text(json.dumps(blur, indent=1))
    costs = _costs(grid, cells, output) if grid.cost else {}
    rows = collect(cells, output / "cells", costs)
    unfinished = [c.name for c in cells if not (output / "cells" / c.name / SUMMARY).is_file()]
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
