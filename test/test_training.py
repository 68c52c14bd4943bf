"""The training loop's modes, resume after a kill, and augmentations."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import DEMO_CONFIG

import training.train as train_module
from training.config import load_config, save_config
from training.data import read_midog25
from training.export import export_run
from training.synthetic import write_midog25
from training.train import augment_color, augment_d4, augment_stain, train_run


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    write_midog25(root, n=90, seed=3, n_slides=9)
    return root


def read_oof(run_dir):
    with (run_dir / "oof.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("options", [{}, {"ema_decay": 0.9}], ids=["live-weights", "weight-average"])
def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(small_data, tmp_path, monkeypatch, options):
    cfg = load_config(DEMO_CONFIG, {"epochs": 3, **options})
    train_run(cfg, [small_data], tmp_path / "uninterrupted")

    real_save = train_module._save_atomically
    saves = []

    def save_then_die(obj, path):
        real_save(obj, path)
        saves.append(path)
        if len(saves) == 5:  # fold 1, after its second epoch's checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_atomically", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, [small_data], tmp_path / "killed")
    assert not (tmp_path / "killed" / "fold_1" / "best.json").exists()
    monkeypatch.setattr(train_module, "_save_atomically", real_save)

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
    assert main(["predict", str(model), "--data-root", str(small_data), "--output", str(preds), "--device", "cpu",
                 "--scanner", "Aperio CS2"]) == 0  # fmt: skip
    with preds.open() as f:
        scored = list(csv.DictReader(f))
    assert {r["image_id"] for r in scored} == {i for i, s in scanner_of.items() if s == "Aperio CS2"}
    assert {r["domain"] for r in scored} == {"Aperio CS2"}


UNAUGMENTED = {"augment": False, "stain_jitter": 0.0}


STANDARDIZED = {"standardize_input": True, "standardize_detail": True}


MIXSTYLED_CNN = {"backbone": "efficientnetv2-b0-scratch", "mixstyle": 1.0}


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("full", STANDARDIZED),
        ("full", {**STANDARDIZED, "detail_ceiling": True}),
        ("full", {**STANDARDIZED, "standardize_mid_band": True}),
        ("full", MIXSTYLED_CNN),
        ("linear", UNAUGMENTED),
        ("linear", {**UNAUGMENTED, "mixup": 0.4}),
    ],
)
def test_other_modes_train_and_export(small_data, tmp_path, mode, options):
    cfg = load_config(DEMO_CONFIG, {"epochs": 1, "mode": mode, **options})
    summary = train_run(cfg, [small_data], tmp_path / "run")
    assert 0 <= summary["oof"]["balanced_accuracy"] <= 1
    assert (tmp_path / "run" / "fold_0" / "weights.safetensors").is_file()
    assert not (tmp_path / "run" / "fold_0" / "adapter").exists()
    manifest = export_run(tmp_path / "run", tmp_path / "model")
    assert manifest.training_config["mode"] == mode


def test_linear_probe_leaves_the_backbone_untouched(small_data, tmp_path):
    from safetensors.torch import load_file

    cfg = load_config(DEMO_CONFIG, {"epochs": 3, "mode": "linear", **UNAUGMENTED})
    train_run(cfg, [small_data], tmp_path / "run")
    saved = load_file(tmp_path / "run" / "fold_0" / "weights.safetensors")
    assert set(saved) == {"atypia_head.weight", "atypia_head.bias"}
    # the head trained on cached embeddings scores figures as the whole exported classifier does
    from training.adapt import load_fold_model
    from training.data import decode_figures, read_midog25
    from training.model import Preprocess
    from training.train import predict_probs

    rows = list(csv.DictReader((tmp_path / "run" / "fold_0" / "val.csv").open()))
    by_id = {f.image_id: f for f in read_midog25(small_data)}
    pixels = decode_figures([by_id[r["image_id"]] for r in rows])
    clf = load_fold_model(cfg, tmp_path / "run" / "fold_0")
    probs = predict_probs(clf, Preprocess.for_backbone(clf.backbone), pixels, 64, torch.device("cpu"))
    np.testing.assert_allclose(probs, [float(r["prob_atypical"]) for r in rows], atol=1e-5)
    with pytest.raises(ValueError, match="mode linear embeds each figure once"):
        load_config(DEMO_CONFIG, {"mode": "linear"})  # the demo config augments


def test_d4_augmentation_only_moves_pixels():
    batch = torch.randint(0, 256, (16, 8, 8, 3), dtype=torch.uint8)
    out = augment_d4(batch, torch.Generator().manual_seed(0))
    for a, b in zip(batch, out, strict=True):
        assert sorted(a.flatten().tolist()) == sorted(b.flatten().tolist())
    assert not torch.equal(batch, out)


def test_stain_jitter_is_identity_at_zero_and_bounded():
    batch = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    same = augment_stain(batch, 0.0, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(same.numpy(), batch.float().numpy(), atol=1e-3)
    jittered = augment_stain(batch, 0.1, torch.Generator().manual_seed(0))
    assert jittered.min() >= 0 and jittered.max() <= 255
    assert 0.5 < (jittered - batch.float()).abs().mean() < 40


def test_color_jitter_is_identity_at_zero_bounded_and_leaves_gray_gray():
    batch = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    torch.testing.assert_close(augment_color(batch, 0.0, torch.Generator().manual_seed(0)), batch.float())
    jittered = augment_color(batch, 0.2, torch.Generator().manual_seed(0))
    assert jittered.min() >= 0 and jittered.max() <= 255 and not torch.allclose(jittered, batch.float())
    gray = torch.randint(60, 200, (8, 16, 16, 1), dtype=torch.uint8).expand(-1, -1, -1, 3)
    out = augment_color(gray, 0.2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[..., 0], out[..., 2])  # saturation scales colour, and gray has none
    means = out.mean(dim=(1, 2, 3)) / gray.float().mean(dim=(1, 2, 3))
    assert means.min() >= 0.8 - 1e-4 and means.max() <= 1.2 + 1e-4 and means.std() > 0.01  # brightness per image


def test_tone_jitter_is_identity_at_zero_keeps_black_white_and_every_pixels_rank():
    from training.train import augment_tone

    batch = torch.randint(0, 256, (6, 16, 16, 3), dtype=torch.uint8)
    batch[:, 0, 0], batch[:, 0, 1] = 0, 255
    torch.testing.assert_close(augment_tone(batch, 0.0, torch.Generator().manual_seed(0)), batch.float())
    out = augment_tone(batch, 0.3, torch.Generator().manual_seed(0))
    assert (out[:, 0, 0] == 0).all() and (out[:, 0, 1] - 255).abs().max() < 1e-3
    flat_in, flat_out = batch.flatten(1).float(), out.flatten(1)
    order = flat_in.argsort(dim=1)
    assert (flat_out.gather(1, order).diff(dim=1) >= 0).all()  # a monotone curve: ranks kept
    mid = (batch.float() > 20) & (batch.float() < 235)
    ratio = torch.log(out[mid] / 255) / torch.log(batch.float()[mid] / 255)  # the image's gamma, recovered
    assert ratio.min() >= np.exp(-0.3) - 1e-3 and ratio.max() <= np.exp(0.3) + 1e-3
    per_image = [torch.log(o[m] / 255) / torch.log(b.float()[m] / 255) for o, b, m in zip(out, batch, mid, strict=True)]
    assert max(r.std().item() for r in per_image) < 1e-3 and np.std([r.mean().item() for r in per_image]) > 0.02


def test_d4_test_time_augmentation_from_training_to_the_served_graph(small_data, tmp_path):
    """With tta, val.csv holds the 8-orientation mean (what the graph serves) beside the single view, the summary
    scores both, and the exported graph's answer does not change when a page is flipped or turned."""
    import onnxruntime as ort

    from training.adapt import load_fold_model
    from training.data import decode_figures, read_midog25
    from training.model import Preprocess
    from training.train import predict_probs

    cfg = load_config(DEMO_CONFIG, {"epochs": 1, "tta": True})
    summary = train_run(cfg, [small_data], tmp_path / "run")
    assert summary["oof_no_tta"]["n"] == summary["oof"]["n"] == 90
    rows = list(csv.DictReader((tmp_path / "run" / "fold_1" / "val.csv").open()))
    by_id = {f.image_id: f for f in read_midog25(small_data)}
    pixels = decode_figures([by_id[r["image_id"]] for r in rows])
    fold = load_fold_model(cfg, tmp_path / "run" / "fold_1")
    preprocess = Preprocess.for_backbone(fold.get_base_model().backbone)
    for column, tta in (("prob_atypical", True), ("prob_atypical_no_tta", False)):
        probs = predict_probs(fold, preprocess, pixels, 64, torch.device("cpu"), tta=tta)
        np.testing.assert_allclose(probs, [float(r[column]) for r in rows], atol=1e-5)
    best = json.loads((tmp_path / "run" / "fold_1" / "best.json").read_text())
    assert set(best["tta"]) == {"balanced_accuracy", "roc_auc"}

    export_run(tmp_path / "run", tmp_path / "model")
    session = ort.InferenceSession(str(tmp_path / "model" / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    pages = pixels[:6]
    served = session.run(None, {"pixels": pages})[0]
    for moved in (pages[:, ::-1], pages[:, :, ::-1], np.rot90(pages, 1, axes=(1, 2)), pages.transpose(0, 2, 1, 3)):
        np.testing.assert_allclose(session.run(None, {"pixels": np.ascontiguousarray(moved)})[0], served, atol=1e-5)
    plain = predict_probs(fold, preprocess, pages, 64, torch.device("cpu"))
    assert not np.allclose(plain, predict_probs(fold, preprocess, pages[:, ::-1].copy(), 64, torch.device("cpu")))


def test_d4_views_are_the_eight_symmetries_of_the_square():
    from training.model import d4_views, mean_over_views

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = torch.stack(d4_views(x, h=2, w=3))
    expected = [torch.rot90(img, k, dims=(2, 3)) for img in (x, x.flip(3)) for k in range(4)]
    assert sorted(v.flatten().tolist() for v in views) == sorted(e.flatten().tolist() for e in expected)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8 and torch.equal(views[0], x)
    torch.testing.assert_close(mean_over_views(torch.arange(16.0), 8), torch.tensor([7.0, 8.0]))


SHIPPED_CONFIGS = sorted([*DEMO_CONFIG.parent.glob("*.yaml"), *DEMO_CONFIG.parent.glob("ablations/*.yaml")])


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_a_registered_backbone(path):
    from training.backbones import BACKBONES

    cfg = load_config(path)
    assert cfg.backbone in BACKBONES and path.stem.startswith(cfg.name)


def test_a_config_states_only_what_it_changes_from_its_base(tmp_path):
    (tmp_path / "variants").mkdir()
    (tmp_path / "variants" / "a.yaml").write_text(f"base: {DEMO_CONFIG}\nname: a\nepochs: 7\n")
    (tmp_path / "b.yaml").write_text("base: variants/a.yaml\nname: b\nseed: 3\n")
    chained = load_config(tmp_path / "b.yaml", {"seed": 5})
    assert chained == load_config(DEMO_CONFIG, {"name": "b", "epochs": 7, "seed": 5})
    (tmp_path / "loop.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="'base' loops back"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "number.yaml").write_text("base: 3\n")
    with pytest.raises(ValueError, match="'base' names another config file"):
        load_config(tmp_path / "number.yaml")


def test_the_training_length_is_stated_once_in_epochs_or_steps_and_a_later_layer_replaces_it(tmp_path):
    in_steps = load_config(DEMO_CONFIG, {"steps": 50})
    assert (in_steps.epochs, in_steps.steps) == (None, 50)
    (tmp_path / "steps.yaml").write_text(f"base: {DEMO_CONFIG}\nname: steps\nsteps: 50\n")
    assert load_config(tmp_path / "steps.yaml").steps == 50  # over a base in epochs
    again = load_config(tmp_path / "steps.yaml", {"epochs": 3})  # train --epochs 3
    assert (again.epochs, again.steps) == (3, None)
    save_config(in_steps, tmp_path / "saved.yaml")  # a run folder's config reloads as it was saved
    assert load_config(tmp_path / "saved.yaml") == in_steps
    (tmp_path / "both.yaml").write_text("name: both\nbackbone: tiny-virchow\nepochs: 3\nsteps: 50\n")
    with pytest.raises(ValueError, match="epochs or steps"):
        load_config(tmp_path / "both.yaml")
    with pytest.raises(ValueError, match="epochs or steps"):
        load_config(DEMO_CONFIG, {"epochs": None})


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


def test_shift_scale_and_blur():
    from training.train import augment_geometry_blur

    batch = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    same = augment_geometry_blur(batch, 0.0, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, batch.float())
    blurred = augment_geometry_blur(batch, 0.0, 1.0, torch.Generator().manual_seed(0))

    def roughness(x):
        return (x[:, 1:] - x[:, :-1]).abs().mean()

    assert roughness(blurred) < 0.6 * roughness(batch.float())
    moved = augment_geometry_blur(batch, 0.1, 0.0, torch.Generator().manual_seed(0))
    assert moved.shape == (6, 32, 32, 3) and moved.min() >= 0 and moved.max() <= 255
    assert not torch.allclose(moved, batch.float())


def test_sharpness_jitter_spans_blurring_to_sharpening():
    from training.model import binomial_blur
    from training.train import augment_sharpness

    batch = torch.randint(40, 216, (64, 32, 32, 3), dtype=torch.uint8)
    torch.testing.assert_close(augment_sharpness(batch, 0.0, torch.Generator().manual_seed(0)), batch.float())
    out = augment_sharpness(batch, 1.0, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 255

    def roughness(x):
        return (x[:, 1:] - x[:, :-1]).abs().mean(dim=(1, 2, 3))

    ratio = roughness(out) / roughness(batch.float())
    assert ratio.min() < 0.6 and ratio.max() > 1.4  # some images blurred, some sharpened
    k = (torch.rand(64, 1, 1, 1, generator=torch.Generator().manual_seed(0)) * 2 - 1)[:1]
    x = batch[:1].float().permute(0, 3, 1, 2)
    expected = (x + k * (x - binomial_blur(x))).permute(0, 2, 3, 1).clamp(0, 255)
    torch.testing.assert_close(out[:1], expected)  # the first image, with the first draw of k


def test_mixup_blends_figures_and_targets_alike_and_keeps_each_figure_dominant():
    from training.train import mixup

    n = 64  # figure i is bright at pixel i only: its blend shows its own weight and its partner
    idx = torch.arange(n)
    batch = torch.zeros(n, 1, n, 3, dtype=torch.uint8)
    batch[idx, 0, idx] = 200
    targets = (idx % 4 == 0).float()
    mixed, mixed_targets = mixup(batch, targets, 0.4, torch.Generator().manual_seed(0))
    again, _ = mixup(batch, targets, 0.4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(mixed, again)  # drawn from the run's generator only: a resumed run repeats it
    own = mixed[idx, 0, idx, 0] / 200
    blended = own < 1  # a figure drawn as its own partner stays whole
    others = mixed[:, 0, :, 0] * (idx[None, :] != idx[:, None])
    partner = torch.where(blended, others.argmax(1), idx)
    assert (own >= 0.5).all() and blended.sum() > n / 2  # the figure itself carries at least half
    torch.testing.assert_close(others.sum(1) / 200, torch.where(blended, 1 - own, 0.0))  # one partner, the rest
    torch.testing.assert_close(mixed_targets, own * targets + (1 - own) * targets[partner])
    assert len(set(partner[blended].tolist())) == int(blended.sum())  # partners from a permutation


def test_mixstyle_swaps_feature_statistics_between_figures_and_keeps_each_figures_pattern():
    from training.train import mix_feature_styles

    n = 64  # figure i's features: a fixed pattern z_i at mean i and standard deviation 1 + i, in every channel
    z = torch.randn(n, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    z = (z - z.mean(dim=(2, 3), keepdim=True)) / z.var(dim=(2, 3), keepdim=True).sqrt()
    i = torch.arange(n, dtype=torch.float32).view(-1, 1, 1, 1)
    features = (i + (1 + i) * z).requires_grad_()
    torch.manual_seed(0)
    out = mix_feature_styles(features)
    torch.manual_seed(0)
    torch.testing.assert_close(mix_feature_styles(features), out)  # torch's generator only: a resume repeats it
    mean, std = out.mean(dim=(2, 3), keepdim=True), out.var(dim=(2, 3), keepdim=True).sqrt()
    torch.testing.assert_close((out - mean) / std, z, atol=1e-3, rtol=1e-3)  # the figure itself is kept
    torch.testing.assert_close(std, 1 + mean, atol=1e-3, rtol=1e-3)  # mean and std blended with one weight
    moved = (mean.flatten(1) - i.flatten(1)).abs().amax(dim=1) > 0.5
    assert moved.sum() > n / 2  # most figures take on part of another's statistics
    assert (mean.flatten(1).std(dim=1) < 1e-4).all()  # ... the same blend in every channel of a figure
    out.sum().backward()  # the statistics are constants to the gradient, the pattern is not
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_mixstyle_hooks_act_in_training_only():
    from training.model import build_classifier
    from training.train import attach_mixstyle

    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = build_classifier("efficientnetv2-b0-scratch", head_seed=1)
    mixing = build_classifier("efficientnetv2-b0-scratch", head_seed=1)
    mixing.load_state_dict(plain.state_dict())
    attach_mixstyle(mixing.backbone, 1.0)
    torch.testing.assert_close(mixing.eval()(x), plain.eval()(x))  # validation and export see no mixing
    torch.manual_seed(0)
    mixed = mixing.train()(x)
    torch.manual_seed(0)
    assert not torch.allclose(mixed, plain.train()(x), atol=1e-4)
    with pytest.raises(ValueError, match="mixstyle mixes the statistics of a CNN's feature maps"):
        load_config(DEMO_CONFIG, {"mixstyle": 0.5})  # the demo's backbone is a transformer
    with pytest.raises(ValueError, match="mode linear embeds each figure once"):
        load_config(DEMO_CONFIG, {**UNAUGMENTED, **MIXSTYLED_CNN, "mode": "linear"})


def test_weight_average_follows_each_step_and_swaps_in_only_inside_its_block():
    from training.train import WeightAverage

    cfg = load_config(DEMO_CONFIG, {"mode": "full", "ema_decay": 0.75})
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, cfg)
    steps = [torch.randn(4, 3, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for weight in steps:
        with torch.no_grad():
            model[0].weight.copy_(weight)  # what an optimizer step does: the parameter changes in place
        model(torch.randn(8, 3))  # and batch-norm statistics move in training mode
        average.update()
    expected = start["0.weight"]
    for weight in steps:
        expected = 0.75 * expected + 0.25 * weight
    torch.testing.assert_close(average.averaged["0.weight"], expected)
    assert int(average.averaged["1.num_batches_tracked"]) == 3  # counters follow, not averaged
    assert not torch.equal(average.averaged["1.running_mean"], model[1].running_mean)
    with average.applied():
        torch.testing.assert_close(model[0].weight.detach(), expected)
    torch.testing.assert_close(model[0].weight.detach(), steps[-1])  # the live weights back
    average.update()  # still tracking the live weights after a swap
    torch.testing.assert_close(average.averaged["0.weight"], 0.75 * expected + 0.25 * steps[-1])


def test_losses():
    from training.train import classification_loss

    logits, targets = torch.randn(64), (torch.rand(64) < 0.3).float()
    pos_weight = torch.tensor(3.0)
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)(logits, targets)
    torch.testing.assert_close(classification_loss(logits, targets, pos_weight, load_config(DEMO_CONFIG)), bce)
    focal_cfg = load_config(DEMO_CONFIG, {"loss": "focal", "focal_gamma": 0.0})
    torch.testing.assert_close(classification_loss(logits, targets, pos_weight, focal_cfg), bce)
    focal_cfg = load_config(DEMO_CONFIG, {"loss": "focal", "focal_gamma": 2.0})
    assert classification_loss(logits, targets, pos_weight, focal_cfg) < bce


def test_scanner_alignment_penalty_estimates_the_squared_gap_between_scanners_class_means():
    from training.train import scanner_alignment_penalty

    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 12 + [1] * 4).repeat(2)
    scanners = torch.tensor([0] * 16 + [1] * 16)
    shift = torch.where(scanners == 1, 0.8, 0.0)  # scanner 1 scores every figure 0.8 higher
    draws = [scanner_alignment_penalty(torch.randn(32, generator=gen) + 2 * labels + shift, labels, scanners)
             for _ in range(4000)]  # fmt: skip
    assert abs(torch.stack(draws).mean().item() - 0.8**2) < 0.03  # unbiased: the means' noise would add ~0.33
    same = [scanner_alignment_penalty(torch.randn(32, generator=gen) + 2 * labels, labels, scanners)
            for _ in range(4000)]  # fmt: skip
    assert abs(torch.stack(same).mean().item()) < 0.03
    # a class with fewer than 2 figures on a scanner, or one scanner only, says nothing
    logits = torch.randn(32, generator=gen)
    assert scanner_alignment_penalty(logits, labels, torch.zeros(32, dtype=torch.long)).item() == 0
    lone = torch.tensor([1] + [0] * 31)
    expected = scanner_alignment_penalty(logits[1:], lone[1:], scanners[1:])
    torch.testing.assert_close(scanner_alignment_penalty(logits, lone, scanners), expected)
    # the gradient pulls the scanners' class means together
    logits = (torch.randn(32, generator=gen) + shift).requires_grad_()
    scanner_alignment_penalty(logits, labels, scanners).backward()
    assert logits.grad[scanners == 1].sum() > 0 > logits.grad[scanners == 0].sum()


def test_every_training_option_together(small_data, tmp_path):
    options = {"epochs": 2, "loss": "focal", "soft_labels": True, "shift_scale": 0.1, "blur": 0.3,
               "stain_jitter": 0.05, "color_jitter": 0.1, "patience": 1, "threshold": "domain-balanced",
               "split": "random", "mixup": 0.4, "ema_decay": 0.9, "cpu_bf16": True, "tone_jitter": 0.2,
               "scanner_alignment": 1.0}  # fmt: skip
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
    with pytest.raises(ValueError, match="set validate_every 1"):
        load_config(DEMO_CONFIG, {"validate_every": 2, "patience": 3})


def test_torchrun_ddp_takes_the_same_step_as_one_process(small_data, tmp_path):
    """Two processes (gloo on CPU) share a batch that does not split evenly (61 figures); after the one optimizer
    step of this run, Adam's first moment (0.1 x the gradient) must equal the one-process run's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(DEMO_CONFIG.read_text().replace("epochs: 20", "epochs: 1").replace("batch_size: 32",
                                                                                         "batch_size: 64"))  # fmt: skip
    args = ["-m", "training", "train", "--config", str(cfg_path), "--data-root", str(small_data), "--fold", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", "29533"]
    for command, out in ((torchrun, "ddp"), ([sys.executable], "single")):
        result = subprocess.run([*command, *args, "--output", str(tmp_path / out)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=600)  # fmt: skip
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
    from training.data import decode_figures
    from training.predict import predict_folder

    trained_on = {}
    real_train_fold = train_module.train_fold

    def spy(cfg, fold, figures, pixels, *args):
        trained_on.update(figures=figures, pixels=pixels)
        return real_train_fold(cfg, fold, figures, pixels, *args)

    monkeypatch.setattr(train_module, "train_fold", spy)
    cfg = load_config(DEMO_CONFIG, {"epochs": 1, "pixel_size_um": 0.23})
    train_run(cfg, [small_data], tmp_path / "run")
    decoded = decode_figures(trained_on["figures"])
    aperio = np.array([f.scanner == "Aperio CS2" for f in trained_on["figures"]])
    assert aperio.any() and (~aperio).any()
    assert np.array_equal(trained_on["pixels"][~aperio], decoded[~aperio])  # Hamamatsu scans are at 0.23 already
    assert np.array_equal(trained_on["pixels"][aperio], resample_to_pixel_size(decoded[aperio], 0.25, 0.23))
    assert not np.array_equal(trained_on["pixels"][aperio], decoded[aperio])

    manifest = export_run(tmp_path / "run", tmp_path / "model")
    assert manifest.pixel_size_um == 0.23
    predict_folder(tmp_path / "model", small_data, tmp_path / "preds.csv", device="cpu", scanners=["Aperio CS2"])
    with (tmp_path / "preds.csv").open() as f:
        served = [float(r["prob_atypical"]) for r in csv.DictReader(f)]
    expected = OnnxEnsemble(tmp_path / "model", "cpu").predict(list(trained_on["pixels"][aperio]))
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)  # predict resampled them as training did
