"""The training loop's modes, resume after a kill, and augmentations."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import DEMO_CONFIG

import training.train as train_module
from training.config import load_config
from training.data import read_midog25
from training.export import export_run
from training.synthetic import write_midog25
from training.train import FoldTrainer, train_run


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    write_midog25(root, n=90, seed=3, n_slides=9)
    return root


def read_oof(run_dir):
    with (run_dir / "oof.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(small_data, tmp_path, monkeypatch):
    cfg = load_config(DEMO_CONFIG, {"epochs": 3})
    train_run(cfg, [small_data], tmp_path / "uninterrupted")

    real_save = FoldTrainer.checkpoint
    saves = []

    def save_then_die(trainer):
        real_save(trainer)
        saves.append(trainer.folder.checkpoint)
        if len(saves) == 5:  # fold 1, after its second epoch's checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(FoldTrainer, "checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, [small_data], tmp_path / "killed")
    assert not (tmp_path / "killed" / "fold_1" / "best.json").exists()
    monkeypatch.setattr(FoldTrainer, "checkpoint", real_save)

    train_run(cfg, [small_data], tmp_path / "killed")  # the same command again
    assert read_oof(tmp_path / "killed") == read_oof(tmp_path / "uninterrupted")
    for k in range(3):
        log_a = (tmp_path / "uninterrupted" / f"fold_{k}" / "log.csv").read_text().splitlines()
        log_b = (tmp_path / "killed" / f"fold_{k}" / "log.csv").read_text().splitlines()
        assert [r.split(",")[:2] for r in log_a] == [r.split(",")[:2] for r in log_b]  # epochs and losses


def test_a_held_out_scanner_is_in_no_fold_and_its_figures_alone_are_scored_later(small_data, tmp_path):
    from training.cli import main

    run, model, preds = tmp_path / "run", tmp_path / "model", tmp_path / "preds.csv"
    args = ["--config", str(DEMO_CONFIG), "--data-root", str(small_data), "--output", str(run), "--epochs", "1"]
    assert main(["train", *args, "--hold-out-scanner", "Aperio CS2", "--seed", "7"]) == 0
    assert load_config(run / "config.yaml").hold_out_scanners == ["Aperio CS2"]
    assert load_config(run / "config.yaml").seed == 7
    scanner_of = {f.image_id: f.scanner for f in read_midog25(small_data)}
    trained_on = [i for ids in json.loads((run / "splits.json").read_text())["val_ids"] for i in ids]
    assert {r["image_id"] for r in read_oof(run)} == set(trained_on)
    assert {scanner_of[i] for i in trained_on} == {"Hamamatsu XR", "Hamamatsu S360"}
    assert main(["export", str(run), "--output", str(model)]) == 0
    assert (
        main(
            [
                "predict",
                str(model),
                "--data-root",
                str(small_data),
                "--output",
                str(preds),
                "--device",
                "cpu",
                "--scanner",
                "Aperio CS2",
            ]
        )
        == 0
    )
    with preds.open() as f:
        scored = list(csv.DictReader(f))
    assert {r["image_id"] for r in scored} == {i for i, s in scanner_of.items() if s == "Aperio CS2"}
    assert {r["domain"] for r in scored} == {"Aperio CS2"}


UNAUGMENTED = {"augment": False, "stain_jitter": 0.0}


STANDARDIZED = {"standardize": "channels+detail"}


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("full", STANDARDIZED),
        ("linear", UNAUGMENTED),
    ],
)
def test_other_modes_train_and_export(small_data, tmp_path, mode, options):
    cfg = load_config(DEMO_CONFIG, {"epochs": 1, "mode": mode, **options})
    summary = train_run(cfg, [small_data], tmp_path / "run")
    assert 0 <= summary["oof"]["balanced_accuracy"] <= 1
    assert (tmp_path / "run" / "fold_0" / "weights.safetensors").is_file()
    assert not (tmp_path / "run" / "fold_0" / "adapter").exists()
    manifest = export_run([tmp_path / "run"], tmp_path / "model")
    assert manifest.members[0].training_config["mode"] == mode


def test_linear_probe_leaves_the_backbone_untouched(small_data, tmp_path):
    from safetensors.torch import load_file

    cfg = load_config(DEMO_CONFIG, {"epochs": 3, "mode": "linear", **UNAUGMENTED})
    train_run(cfg, [small_data], tmp_path / "run")
    saved = load_file(tmp_path / "run" / "fold_0" / "weights.safetensors")
    assert set(saved) == {"atypia_head.weight", "atypia_head.bias"}
    # the head trained on cached embeddings scores figures as the whole exported classifier does
    from training.adapt import load_fold_model
    from training.data import read_midog25
    from training.model import preprocess_for
    from training.pixels import decode_figures
    from training.train import predict_probs

    rows = list(csv.DictReader((tmp_path / "run" / "fold_0" / "val.csv").open()))
    by_id = {f.image_id: f for f in read_midog25(small_data)}
    pixels = decode_figures([by_id[r["image_id"]] for r in rows])
    clf = load_fold_model(cfg.spec(), tmp_path / "run" / "fold_0")
    probs = predict_probs(clf, preprocess_for(cfg.spec(), clf), pixels, 64, torch.device("cpu"))
    np.testing.assert_allclose(probs, [float(r["prob_atypical"]) for r in rows], atol=1e-5)
    with pytest.raises(ValueError, match="mode linear embeds each figure once"):
        load_config(DEMO_CONFIG, {"mode": "linear"})  # the demo config augments


def test_d4_test_time_augmentation_from_training_to_the_served_graph(small_data, tmp_path):
    """With tta, val.csv holds the 8-orientation mean (what the graph serves) beside the single view, the summary
    scores both, and the exported graph's answer does not change when a page is flipped or turned."""
    import onnxruntime as ort

    from training.adapt import load_fold_model
    from training.data import read_midog25
    from training.model import preprocess_for
    from training.pixels import decode_figures
    from training.train import predict_probs

    cfg = load_config(DEMO_CONFIG, {"epochs": 1, "tta": True})
    summary = train_run(cfg, [small_data], tmp_path / "run")
    assert summary["oof_no_tta"]["n"] == summary["oof"]["n"] == 90
    rows = list(csv.DictReader((tmp_path / "run" / "fold_1" / "val.csv").open()))
    by_id = {f.image_id: f for f in read_midog25(small_data)}
    pixels = decode_figures([by_id[r["image_id"]] for r in rows])
    fold = load_fold_model(cfg.spec(), tmp_path / "run" / "fold_1")
    preprocess = preprocess_for(cfg.spec(), fold.get_base_model())
    for column, tta in (("prob_atypical", True), ("prob_atypical_no_tta", False)):
        probs = predict_probs(fold, preprocess, pixels, 64, torch.device("cpu"), tta=tta)
        np.testing.assert_allclose(probs, [float(r[column]) for r in rows], atol=1e-5)
    best = json.loads((tmp_path / "run" / "fold_1" / "best.json").read_text())
    assert set(best["tta"]) == {"balanced_accuracy", "roc_auc"}

    export_run([tmp_path / "run"], tmp_path / "model")
    session = ort.InferenceSession(str(tmp_path / "model" / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    pages = pixels[:6]
    served = session.run(None, {"pixels": pages})[0]
    for moved in (pages[:, ::-1], pages[:, :, ::-1], np.rot90(pages, 1, axes=(1, 2)), pages.transpose(0, 2, 1, 3)):
        np.testing.assert_allclose(session.run(None, {"pixels": np.ascontiguousarray(moved)})[0], served, atol=1e-5)
    plain = predict_probs(fold, preprocess, pages, 64, torch.device("cpu"))
    assert not np.allclose(plain, predict_probs(fold, preprocess, pages[:, ::-1].copy(), 64, torch.device("cpu")))


def test_d4_views_are_the_eight_symmetries_of_the_square():
    from training.preprocess import d4_views, mean_over_views

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = torch.stack(d4_views(x, h=2, w=3))
    expected = [torch.rot90(img, k, dims=(2, 3)) for img in (x, x.flip(3)) for k in range(4)]
    assert sorted(v.flatten().tolist() for v in views) == sorted(e.flatten().tolist() for e in expected)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8 and torch.equal(views[0], x)
    torch.testing.assert_close(mean_over_views(torch.arange(16.0), 8), torch.tensor([7.0, 8.0]))


def test_a_length_in_steps_gives_a_fold_with_fewer_figures_more_epochs(small_data, tmp_path):
    """Held out or not, every fold trains about as many steps; a length in epochs would shrink with the data."""
    cfg = load_config(DEMO_CONFIG, {"steps": 7, "batch_size": 16, "validate_every": 100, "selection": "last"})
    epochs = {}
    for name, held_out in (("all", []), ("held-out", ["Aperio CS2"])):
        run = tmp_path / name
        train_run(cfg.model_copy(update={"hold_out_scanners": held_out}), [small_data], run, folds=[0])
        best = json.loads((run / "fold_0" / "best.json").read_text())
        steps_per_epoch = -(-best["n_train"] // 16)
        epochs[name] = best["epoch"]
        assert best["epoch"] == -(-7 // steps_per_epoch)  # whole epochs, the last one reaching the 7th step
        with (run / "fold_0" / "log.csv").open() as f:
            assert len(list(csv.DictReader(f))) == best["epoch"]
    assert epochs["held-out"] > epochs["all"]
    # rounded up to whole epochs, a length in steps trains exactly what those epochs would
    in_epochs = cfg.model_copy(update={"steps": None, "epochs": epochs["all"]})
    train_run(in_epochs, [small_data], tmp_path / "epochs", folds=[0])
    assert (tmp_path / "epochs" / "fold_0" / "val.csv").read_text() == (
        tmp_path / "all" / "fold_0" / "val.csv"
    ).read_text()


def test_every_training_option_together(small_data, tmp_path):
    options = {
        "epochs": 2,
        "soft_labels": True,
        "shift_scale": 0.1,
        "sharpness_jitter": 0.5,
        "stain_jitter": 0.05,
        "color_jitter": 0.1,
        "grayscale": 0.2,
        "split": "random",
        "cpu_bf16": True,
        "standardize": "channels",
    }
    summary = train_run(load_config(DEMO_CONFIG, options), [small_data], tmp_path / "run")
    assert 0 <= summary["threshold"] <= 1
    assert (tmp_path / "run" / "provenance.json").is_file()


def test_validate_every_k_epochs_and_always_the_last(small_data, tmp_path):
    cfg = load_config(DEMO_CONFIG, {"epochs": 5, "validate_every": 2, "selection": "last"})
    train_run(cfg, [small_data], tmp_path / "run", folds=[0])
    with (tmp_path / "run" / "fold_0" / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert [r["roc_auc"] != "nan" for r in rows] == [False, True, False, True, True]
    assert all(float(r["train_loss"]) > 0 for r in rows)
    best = json.loads((tmp_path / "run" / "fold_0" / "best.json").read_text())
    assert best["epoch"] == 5 and str(best["roc_auc"]) == rows[-1]["roc_auc"]
    # validation only reads the model: validated after the last epoch alone, the same weights and predictions
    train_run(cfg.model_copy(update={"validate_every": 100}), [small_data], tmp_path / "last", folds=[0])
    for name in ("adapter/adapter_model.safetensors", "val.csv"):
        assert (tmp_path / "last" / "fold_0" / name).read_bytes() == (tmp_path / "run" / "fold_0" / name).read_bytes()


def test_torchrun_ddp_takes_the_same_step_as_one_process(small_data, tmp_path):
    """Two processes (gloo on CPU) share a batch that does not split evenly (61 figures); after the one optimizer
    step of this run, Adam's first moment (0.1 x the gradient) must equal the one-process run's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        DEMO_CONFIG.read_text().replace("epochs: 20", "epochs: 1").replace("batch_size: 32", "batch_size: 64")
    )
    args = ["-m", "training", "train", "--config", str(cfg_path), "--data-root", str(small_data), "--fold", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", "29533"]
    for command, out in ((torchrun, "ddp"), ([sys.executable], "single")):
        result = subprocess.run(
            [*command, *args, "--output", str(tmp_path / out)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]

    def first_moments(run):
        state = torch.load(tmp_path / run / "fold_0" / "checkpoint.pt", weights_only=False)["optimizer"]["state"]
        assert all(s["step"] == 1 for s in state.values())
        return [s["exp_avg"] for s in state.values()]

    for ddp, single in zip(first_moments("ddp"), first_moments("single"), strict=True):
        torch.testing.assert_close(ddp, single, atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "ddp" / "splits.json").read_text())["val_ids"][0]  # written once, by rank 0


def test_sigkill_then_the_same_command_resumes_and_finishes(small_data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, run_cli

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(DEMO_CONFIG.read_text().replace("epochs: 20", "epochs: 8"))
    run = tmp_path / "run"
    args = ["-m", "training", "train", "--config", str(cfg_path), "--data-root", str(small_data), "--output", str(run)]
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "fold_0" / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "fold_0" / "best.json").exists(), "killed too late to test a resume"

    result = run_cli(*args)
    assert "fold 0: resuming after epoch" in result.stderr
    assert (run / "summary.json").is_file() and len(read_oof(run)) == 90


def test_training_and_serving_resample_each_scanner_to_one_pixel_size(small_data, tmp_path, monkeypatch):
    from contracts import resample_to_pixel_size
    from process import OnnxEnsemble
    from training.pixels import decode_figures
    from training.predict import predict_folder

    trained_on = {}
    real_fold_data = train_module.fold_data

    def spy(cfg, fold, figures, pixels, *args):
        trained_on.update(figures=figures, pixels=pixels)
        return real_fold_data(cfg, fold, figures, pixels, *args)

    monkeypatch.setattr(train_module, "fold_data", spy)
    cfg = load_config(DEMO_CONFIG, {"epochs": 1, "pixel_size_um": 0.23})
    train_run(cfg, [small_data], tmp_path / "run")
    decoded = decode_figures(trained_on["figures"])
    aperio = np.array([f.scanner == "Aperio CS2" for f in trained_on["figures"]])
    assert aperio.any() and (~aperio).any()
    assert np.array_equal(trained_on["pixels"][~aperio], decoded[~aperio])  # Hamamatsu scans are at 0.23 already
    assert np.array_equal(trained_on["pixels"][aperio], resample_to_pixel_size(decoded[aperio], 0.25, 0.23))
    assert not np.array_equal(trained_on["pixels"][aperio], decoded[aperio])

    manifest = export_run([tmp_path / "run"], tmp_path / "model")
    assert manifest.pixel_size_um == 0.23
    predict_folder(tmp_path / "model", small_data, tmp_path / "preds.csv", device="cpu", scanners=["Aperio CS2"])
    with (tmp_path / "preds.csv").open() as f:
        served = [float(r["prob_atypical"]) for r in csv.DictReader(f)]
    expected = OnnxEnsemble(tmp_path / "model", "cpu").predict(list(trained_on["pixels"][aperio]))
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)  # predict resampled them as training did


def test_a_linear_probe_trains_on_embeddings_of_its_own_and_leaves_the_fold_data_as_given(small_data, tmp_path):
    from training.pixels import decode_figures
    from training.run import FoldFolder
    from training.splits import fold_data
    from training.workers import Workers

    cfg = load_config(DEMO_CONFIG, {"epochs": 1, "mode": "linear", **UNAUGMENTED})
    figures = read_midog25(small_data)
    pixels = decode_figures(figures)
    data = fold_data(cfg, 0, figures, pixels, {f.image_id for f in figures[:30]})
    before = data.train_x.copy()
    trainer = FoldTrainer(cfg, 0, data, FoldFolder(tmp_path), Workers())
    assert trainer.data is not data and trainer.data.train_x.shape == (
        data.n_train,
        trainer.model.atypia_head.in_features,
    )
    assert data.train_x.shape == before.shape and np.array_equal(data.train_x, before)
    assert [n for n, _ in trainer.model.named_parameters()] == ["atypia_head.weight", "atypia_head.bias"]
