"""Labs never trained on: the AtNorM reader and its duplicates, ``train --external`` (after the threshold, never
before it), and ensembles of runs exported as one graph."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import DEMO_CONFIG, run_cli, shared_path

from training.data import read_dataset
from training.figure import DataError
from training.pixels import decode_figures, unique_figures
from training.synthetic import write_atnorm, write_midog25


@pytest.fixture(scope="module")
def atnorm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab") / "atnorm-synth"
    write_atnorm(root, n=40, seed=5, votes=True)
    return root


def test_atnorm_layout_votes_and_pixel_size(atnorm):
    figures = read_dataset(atnorm)
    assert len(figures) == 43  # 40 crops, one copy under its class, one copy and one under the other class
    by_id = {f.image_id: f for f in figures}
    first = next(f for f in figures if f.image_id.endswith("/0.png"))
    assert first.source == "AtNorM" and first.domain == "atnorm-synth" and first.pixel_size_um == 0.25
    assert first.label == (1 if "Atypical/" in first.image_id else 0)
    assert len(first.votes) == 3 and first.soft_label in (0.0, 1.0)  # 0.png: every expert agrees
    seventh = next(f for i, f in by_id.items() if i.endswith("/7.png"))  # write_atnorm: expert 3 says normal
    assert seventh.votes[2] == 0
    assert all(f.slide == f.image_id for f in figures)  # no slide given: each crop its own group


def test_atnorm_votes_that_contradict_the_folder_are_refused(atnorm, tmp_path):
    copy = tmp_path / "lab"
    shutil.copytree(atnorm, copy)
    lines = (copy / "votes.csv").read_text().splitlines()
    name, *calls, majority = lines[1].split(",")
    flipped = "Normal" if majority == "Atypical" else "Atypical"
    lines[1] = ",".join([name, *calls, flipped])
    (copy / "votes.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"contradicts the class folder for {name}"):
        read_dataset(copy)
    (copy / "votes.csv").write_text("Filename,Majority\n0.png,Normal\n")
    with pytest.raises(DataError, match=r"want columns Filename, Expert_1\.\.Expert_N, Majority"):
        read_dataset(copy)
    with pytest.raises(DataError, match="no such folder"):
        read_dataset(tmp_path / "absent")


def test_copies_are_counted_once_and_crops_under_both_classes_left_out(atnorm):
    figures = read_dataset(atnorm)
    kept, pixels, duplicates = unique_figures(figures, decode_figures(figures))
    assert len(duplicates.copies) == 1 and duplicates.copies[0].endswith("/40.png")
    assert len(duplicates.conflicting) == 1 and len(duplicates.conflicting[0]) == 3  # 1.png, 41.png and 42.png
    assert len(kept) == 43 - 1 - 3 and len(pixels) == len(kept)
    assert len({p.tobytes() for p in pixels}) == len(kept)  # every crop once
    assert not {f.image_id for f in kept} & set(duplicates.conflicting[0])


def test_atnorm_br_as_published():
    root = shared_path("atnorm-br")
    figures = read_dataset(root)
    assert len(figures) == 746 and sum(f.label for f in figures) == 128
    kept, _, duplicates = unique_figures(figures, decode_figures(figures))
    # 30 copies that agree, and 2 crops filed under both classes (7 ids) left out: docs/results.md
    assert (len(kept), len(duplicates.copies), len(duplicates.conflicting), duplicates.left_out) == (709, 30, 2, 7)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Data, an external lab, and one short demo run trained without and one with ``--external`` on that lab
    with its labels swapped: whatever an external set says, it must not move the run."""
    root = tmp_path_factory.mktemp("external")
    data, lab, swapped = root / "data", root / "lab", root / "lab-swapped"
    write_midog25(data, n=150, seed=3, n_slides=15)
    write_atnorm(lab, n=40, seed=5)
    swapped.mkdir()
    (lab / "Atypical").rename(swapped / "Normal")  # every label the other way round
    shutil.copytree(swapped / "Normal", lab / "Atypical")
    shutil.copytree(lab / "Normal", swapped / "Atypical")
    train = ("-m", "training", "train", "--config", DEMO_CONFIG, "--data-root", data, "--epochs", "2")
    run_cli(*train, "--output", root / "plain")
    run_cli(*train, "--output", root / "scored", "--external", lab, swapped)
    return {"data": data, "lab": lab, "swapped": swapped, "plain": root / "plain", "scored": root / "scored"}


def test_external_sets_never_touch_the_folds_or_the_threshold(two_runs):
    plain, scored = two_runs["plain"], two_runs["scored"]
    for name in ("splits.json", "oof.csv", "fold_0/val.csv", "fold_2/best.json"):
        assert (plain / name).read_bytes() == (scored / name).read_bytes(), name
    summary_plain = json.loads((plain / "summary.json").read_text())
    summary = json.loads((scored / "summary.json").read_text())
    assert summary_plain["threshold"] == summary["threshold"] and "external" not in summary_plain
    assert {k: v for k, v in summary.items() if k != "external"} == summary_plain
    lab, swapped = summary["external"]["lab"], summary["external"]["lab-swapped"]
    assert lab["threshold"] == swapped["threshold"] == summary["threshold"]
    # the same crops, the same probabilities; only the labels differ: the swapped set's AUROC mirrors the other's
    assert lab["n"] == swapped["n"] == 43 - 1 - 3 and lab["duplicates"]["copies"] == 1
    assert swapped["roc_auc"] == pytest.approx(1 - lab["roc_auc"])
    assert swapped["balanced_accuracy"] == pytest.approx(1 - lab["balanced_accuracy"])
    assert 0 <= lab["balanced_accuracy_ci"][0] <= lab["balanced_accuracy"] <= lab["balanced_accuracy_ci"][1]


def test_external_figures_are_the_served_models(two_runs, tmp_path):
    """``train --external`` scores what ``export`` then ``predict`` serve: the same probabilities and figures."""
    run_cli("-m", "training", "export", two_runs["scored"], "--output", tmp_path / "model")
    result = run_cli(
        "-m",
        "training",
        "predict",
        tmp_path / "model",
        "--data-root",
        two_runs["lab"],
        "--output",
        tmp_path / "p.csv",
        "--device",
        "cpu",
    )
    assert "balanced_accuracy" in result.stdout
    assert (tmp_path / "p.csv").read_bytes() == (two_runs["scored"] / "external" / "lab.csv").read_bytes()


def _variant(tmp_path, name, **changes):
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config.update(name=name, **changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_runs_on_the_same_folds_export_as_one_graph(demo_run, tmp_path):
    """Two runs of other backbones and preprocessing, one graph: each fold of each run weighs the same, the
    threshold comes from the combined out-of-fold predictions, and ONNX Runtime agrees with PyTorch."""
    from contracts import ModelManifest
    from process import OnnxEnsemble
    from training.config import load_run_config
    from training.export import combined_out_of_fold, fold_model
    from training.model import Ensemble, preprocess_for
    from training.run import RunFolder

    other = _variant(tmp_path, "other", backbone="tiny-uni", standardize="channels", tta=True, epochs=1)
    run_b = tmp_path / "b"
    run_cli("-m", "training", "train", "--config", other, "--data-root", demo_run["data"], "--output", run_b)
    model = tmp_path / "model"
    run_cli("-m", "training", "export", demo_run["run"], run_b, "--output", model, "--parity-patches", "16")
    manifest = ModelManifest.load(model)
    assert [m.run for m in manifest.members] == [demo_run["run"].name, "b"] and manifest.folds == 6
    assert manifest.backbone == "tiny-virchow + tiny-uni"
    threshold, figures = combined_out_of_fold([RunFolder(demo_run["run"]), RunFolder(run_b)])
    assert manifest.threshold == threshold and manifest.oof_metrics == figures

    pixels = decode_figures(read_dataset(demo_run["data"])[:12])
    means = []
    for run_dir in (demo_run["run"], run_b):
        cfg = load_run_config(RunFolder(run_dir))
        folds = [fold_model(run_dir, k, pixels[:4]) for k in range(cfg.folds)]
        with torch.no_grad():
            means.append(
                Ensemble(preprocess_for(cfg.spec(), folds[0]), folds, tta=cfg.tta).eval()(torch.from_numpy(pixels))
            )
    expected = ((means[0] + means[1]) / 2).numpy()
    got = OnnxEnsemble(model, "cpu", precision="fp32").predict(list(pixels))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert not np.allclose(means[0].numpy(), means[1].numpy(), atol=1e-3)  # the members do differ


def test_runs_on_other_folds_are_refused_in_one_line(demo_run, tmp_path):
    other = tmp_path / "other-seed"
    shutil.copytree(demo_run["run"], other)
    splits = json.loads((other / "splits.json").read_text())
    splits["val_ids"] = [splits["val_ids"][1], splits["val_ids"][0], *splits["val_ids"][2:]]
    (other / "splits.json").write_text(json.dumps(splits))
    result = run_cli("-m", "training", "export", demo_run["run"], other, "--output", tmp_path / "m", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "splits.json differs" in line and "same folds" in line
    assert not (tmp_path / "m").exists()
