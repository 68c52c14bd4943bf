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
        data: ["10%", "100%"]             # share of each class of each fold's training set
        split: [slide]                     # slide | random | scanner-out | tumor-out
        seeds: [42]
    blur:                                  # robustness, on each method's slide-split full-data cells
      sigmas: [1.0, 2.0]                   # Gaussian sigma in pixels of the image it is applied to
    cost: true                             # parameters, GFLOPs per image, latency per 16-figure stack

``python -m training experiment --config GRID --data-root DIR --output OUT`` trains every unfinished cell
into ``OUT/cells/<cell>/`` (a run folder like ``train``'s; its ``summary.json`` marks it finished, a killed cell
resumes), measures blur robustness and cost, and writes ``results.csv``, ``domains.csv``, ``report.md`` and the
plots (``training.lab.report``). ``--shard K/N`` trains every N-th cell only, so a grid splits across machines that
share ``OUT``; ``--report-only`` writes the report from the finished cells.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from training.config import TrainConfig, layered, load_config, validated
from training.figure import Figure
from training.spec import Strict

SPLITS: dict[str, dict[str, str]] = {
    "slide": {"split": "slide"},
    "random": {"split": "random"},
    "scanner-out": {"split": "domain", "domain": "scanner"},
    "tumor-out": {"split": "domain", "domain": "tumor"},
}
DATA_AMOUNT = re.compile(r"^(?P<percent>\d+(?:\.\d+)?)%$")
BLUR_FILE = "blur.json"
COST_FILE = "cost.json"
STACK = 16  # figures per case: the latency the container pays


class Study(Strict):
    name: str
    methods: list[str] | None = None
    data: list[str] = Field(["100%"])
    split: list[Literal["slide", "random", "scanner-out", "tumor-out"]] = Field(["slide"])
    seeds: list[int] = Field([42])

    @field_validator("data")
    @classmethod
    def _amounts_parse(cls, amounts: list[str]) -> list[str]:
        for amount in amounts:
            parse_amount(amount)
        return amounts


class BlurStudy(Strict):
    sigmas: list[float] = Field(min_length=1)
    methods: list[str] | None = None


class GridConfig(Strict):
    name: str
    base: Path
    overrides: dict[str, Any] = Field({})
    methods: dict[str, dict[str, Any]] = Field(min_length=1)
    studies: list[Study] = Field(min_length=1)
    blur: BlurStudy | None = None
    cost: bool = True


def parse_amount(amount: str) -> dict[str, Any]:
    """'10%' -> a share of each class (of each fold's training figures)."""
    match = DATA_AMOUNT.match(amount)
    if not match:
        raise ValueError(f"data amount {amount!r}: write a share like '10%'")
    percent = float(match["percent"])
    if not 0 < percent <= 100:
        raise ValueError(f"data amount {amount!r}: the share must be in (0, 100]")
    return {"train_fraction": percent / 100}


def amount_tag(amount: str) -> str:
    return amount.replace("%", "pct")


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
                    raise ValueError(
                        f"study {study.name}: {split} needs two or more domains; the data has {sorted(domains)}"
                    )
                changes["folds"] = len(domains)
            cell = Cell(method=method, split=split, data=amount, seed=seed, config=load_config(grid.base, changes))
            cell = cell.model_copy(update={"config": cell.config.model_copy(update={"name": cell.name})})
            cells[cell.name] = cell
    return list(cells.values())
