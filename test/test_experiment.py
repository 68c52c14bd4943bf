"""Experiment grids: expansion, resumable cells, data subsets, blur, and a report whose figures are right."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import DEMO_CONFIG, REPO, run_cli
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

import training.lab.experiment as experiment
from training.data import read_datasets
from training.figure import Figure
from training.lab.experiment import expand, gaussian_blur, load_grid, run_grid
from training.preprocess import Preprocess
from training.splits import training_subset
from training.synthetic import write_midog25

GRIDS = REPO / "training" / "configs" / "experiments"
LINEAR = {"mode": "linear", "augment": False, "stain_jitter": 0.0, "epochs": 3}
TINY_GRID = {
    "name": "tiny-grid",
    "base": str(DEMO_CONFIG),
    "overrides": {"epochs": 1},
    "methods": {"tiny-lora": {}, "tiny-linear": LINEAR},
    "studies": [
        {"name": "data-scaling", "data": ["50%", "100%"]},
        {"name": "splits", "methods": ["tiny-linear"], "split": ["slide", "random", "scanner-out"]},
    ],
    "blur": {"sigmas": [1.5], "methods": ["tiny-lora"]},
}
EXPECTED_CELLS = {
    "tiny-lora__slide__50pct__seed42",
    "tiny-lora__slide__100pct__seed42",
    "tiny-linear__slide__50pct__seed42",
    "tiny-linear__slide__100pct__seed42",
    "tiny-linear__random__100pct__seed42",
    "tiny-linear__scanner-out__100pct__seed42",
}


def write_grid(path: Path, grid: dict) -> Path:
    path.write_text(yaml.safe_dump(grid, sort_keys=False))  # method order is cell order
    return path


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    write_midog25(root / "data", n=90, seed=3, n_slides=9)
    grid = write_grid(root / "grid.yaml", TINY_GRID)
    rows = run_grid(grid, [root / "data"], root / "out")
    return {"root": root, "grid": grid, "rows": rows, "out": root / "out"}


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_grid_runs_every_distinct_cell_once_and_scores_it_as_the_challenge_does(grid_run):
    out = grid_run["out"]
    results = read_csv(out / "results.csv")
    assert {r["cell"] for r in results} == EXPECTED_CELLS  # the shared slide/100% linear cell ran once
    for r in results:
        with (out / "cells" / r["cell"] / "oof.csv").open() as f:
            oof = list(csv.DictReader(f))
        label = np.array([int(x["label"]) for x in oof])
        prob = np.array([float(x["prob_atypical"]) for x in oof])
        assert len(oof) == 90  # every figure scored once, out of fold
        threshold = float(r["threshold"])
        at_threshold = balanced_accuracy_score(label, prob >= threshold)
        assert float(r["balanced_accuracy"]) == pytest.approx(at_threshold, abs=1e-9)
        assert float(r["ba_at_0.5"]) == pytest.approx(balanced_accuracy_score(label, prob >= 0.5), abs=1e-9)
        assert float(r["roc_auc"]) == pytest.approx(roc_auc_score(label, prob), abs=1e-9)
        assert float(r["ba_ci_lo"]) <= float(r["balanced_accuracy"]) <= float(r["ba_ci_hi"])
        assert float(r["gflops_per_image"]) > 0 and float(r["parameters_m"]) > 0
    n_train = {r["cell"]: int(r["n_train"]) for r in results}
    half, full = n_train["tiny-lora__slide__50pct__seed42"], n_train["tiny-lora__slide__100pct__seed42"]
    assert abs(half - full / 2) <= 1


def test_leave_one_scanner_out_holds_each_scanner_out_once(grid_run):
    cell = grid_run["out"] / "cells" / "tiny-linear__scanner-out__100pct__seed42"
    data = grid_run["root"] / "data" / "MIDOG25_Atypical_Classification_Train_Set.csv"
    scanner_of = {r["image_id"]: r["Scanner"] for r in read_csv(data)}
    folds = json.loads((cell / "splits.json").read_text())["val_ids"]
    assert sorted(len({scanner_of[i] for i in fold}) for fold in folds) == [1, 1, 1]
    assert len({scanner_of[fold[0]] for fold in folds}) == 3
    domains = [d for d in read_csv(grid_run["out"] / "domains.csv") if d["cell"] == cell.name]
    assert {d["domain"] for d in domains} == {"Hamamatsu XR", "Hamamatsu S360", "Aperio CS2"}


def test_blur_at_sigma_zero_reproduces_the_cell_and_pre_and_post_differ(grid_run):
    cell = grid_run["out"] / "cells" / "tiny-lora__slide__100pct__seed42"
    blur = json.loads((cell / "blur.json").read_text())
    row = next(r for r in grid_run["rows"] if r["cell"] == cell.name)
    for where in ("pre", "post"):
        assert blur[where]["0.0"]["balanced_accuracy"] == pytest.approx(row["balanced_accuracy"], abs=1e-9)
    assert blur["pre"]["1.5"] != blur["post"]["1.5"]  # tiny-virchow resizes 128 -> 112: blur lands differently
    others = [p.parent.name for p in (grid_run["out"] / "cells").glob("*/blur.json")]
    assert others == [cell.name]


def test_the_report_holds_every_plot_and_the_command(grid_run):
    out = grid_run["out"]
    report = (out / "report.md").read_text()
    assert f"python -m training experiment --config {grid_run['grid']}" in report
    for name in ("ba_vs_data.png", "roc.png", "domains.png", "blur.png", "cost.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in report
    assert "not yet run" not in report


def test_finished_cells_are_not_recomputed_and_shards_split_the_grid(grid_run, tmp_path, monkeypatch):
    def no_training(cfg, *args, **kwargs):
        trained.append(cfg.name)

    def no_blur(*args, **kwargs):
        raise AssertionError("blur measured twice")

    trained: list[str] = []
    monkeypatch.setattr(experiment, "train_run", no_training)
    monkeypatch.setattr(experiment, "measure_blur", no_blur)
    rows = run_grid(grid_run["grid"], [grid_run["root"] / "data"], grid_run["out"])
    assert trained == [] and len(rows) == len(EXPECTED_CELLS)

    names = [c.name for c in expand(load_grid(grid_run["grid"]), read_datasets([grid_run["root"] / "data"]))]
    assert names[:2] == ["tiny-lora__slide__50pct__seed42", "tiny-lora__slide__100pct__seed42"]  # as declared
    for k in (0, 1):
        trained.clear()
        rows = run_grid(grid_run["grid"], [grid_run["root"] / "data"], tmp_path / "fresh", shard=f"{k}/2")
        assert trained == names[k::2] and rows == []
    report = (tmp_path / "fresh" / "report.md").read_text()
    assert "6 not yet run" in report and "--shard 1/2`" in report  # the command that wrote it


def test_report_only_through_the_cli(grid_run, tmp_path):
    run_cli(
        "-m",
        "training",
        "experiment",
        "--config",
        grid_run["grid"],
        "--data-root",
        grid_run["root"] / "data",
        "--output",
        grid_run["out"],
        "--report-dir",
        tmp_path / "docs",
        "--report-only",
    )
    assert len(read_csv(tmp_path / "docs" / "results.csv")) == len(EXPECTED_CELLS)
    assert (tmp_path / "docs" / "roc.png").is_file()


def test_training_subsets_are_per_class_and_nested():
    labels = np.array([0] * 300 + [1] * 100)
    tenth, half = training_subset(labels, 0.1, 7), training_subset(labels, 0.5, 7)
    assert np.bincount(labels[tenth]).tolist() == [30, 10] and np.bincount(labels[half]).tolist() == [150, 50]
    assert set(tenth) <= set(half)  # more data adds figures, it does not swap them
    assert not np.array_equal(training_subset(labels, 0.1, 8), tenth)
    assert len(training_subset(labels, 0.001, 7)) == 2  # at least one figure of each class


def test_gaussian_blur():
    x = torch.rand(2, 3, 32, 32) * 255
    assert torch.equal(gaussian_blur(x, 0.0), x)
    flat = torch.full((1, 3, 16, 16), 77.0)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)  # weights sum to one, borders reflected
    impulse = torch.zeros(1, 1, 33, 33)
    impulse[0, 0, 16, 16] = 1
    spread = gaussian_blur(impulse, 2.0)[0, 0]
    assert spread.sum().item() == pytest.approx(1.0, abs=1e-6)
    offsets = (torch.arange(33.0) - 16) ** 2
    assert (spread.sum(1) * offsets).sum().item() == pytest.approx(4.0, rel=0.05)  # sigma^2, truncated at 3 sigma
    assert torch.allclose(spread, spread.T) and gaussian_blur(x, 1.0).std() < x.std()
    native = Preprocess((3, 32, 32), "bicubic", (0.5,) * 3, (0.5,) * 3)
    pre = native.resize(gaussian_blur(x, 1.0))
    torch.testing.assert_close(pre, gaussian_blur(native.resize(x), 1.0))  # no resize: the same blur


def test_grid_files_are_checked(tmp_path):
    figures = [Figure(f"{i}.png", Path(f"{i}.png"), i % 2, f"s{i}", "breast", f"scanner {i % 3}") for i in range(12)]
    bad_amount = {**TINY_GRID, "studies": [{"name": "x", "data": ["ten percent"]}]}
    with pytest.raises(ValueError, match="'10%'"):
        load_grid(write_grid(tmp_path / "a.yaml", bad_amount))
    bad_method = {**TINY_GRID, "studies": [{"name": "x", "methods": ["virchow-huge"]}]}
    with pytest.raises(ValueError, match="virchow-huge"):
        load_grid(write_grid(tmp_path / "b.yaml", bad_method))
    with pytest.raises(ValueError, match="epochs"):
        load_grid(write_grid(tmp_path / "c.yaml", {**TINY_GRID, "epochs": 3}))
    one_tumor = {**TINY_GRID, "studies": [{"name": "loto", "split": ["tumor-out"]}]}
    with pytest.raises(ValueError, match="two or more domains"):
        expand(load_grid(write_grid(tmp_path / "d.yaml", one_tumor)), figures)
    in_steps = {**TINY_GRID, "overrides": {"steps": 5}, "studies": [{"name": "x"}]}  # tiny-linear: epochs 3
    lengths = {
        c.method: (c.config.epochs, c.config.steps)
        for c in expand(load_grid(write_grid(tmp_path / "e.yaml", in_steps)), figures)
    }
    assert lengths == {"tiny-lora": (None, 5), "tiny-linear": (3, None)}


@pytest.mark.parametrize("path", sorted(GRIDS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_grid_expands_to_valid_configs(path):
    tumors = ("breast", "canine lymphoma", "melanoma")
    figures = [
        Figure(f"{i}.png", Path(f"{i}.png"), i % 2, f"s{i}", tumors[i % 3], f"scanner {i % 3}") for i in range(30)
    ]
    cells = expand(load_grid(path), figures)
    assert len(cells) == len({c.name for c in cells}) > 1
    from training.backbones import BACKBONES

    assert all(c.config.backbone in BACKBONES and c.config.name == c.name for c in cells)
