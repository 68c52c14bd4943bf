"""Configs: every shipped one loads, a variant states only what it changes, the length is stated once, and
bf16 autocast where the device runs it natively."""

import json

import pytest
import torch
from conftest import DEMO_CONFIG

import training.train as train_module
from training.config import load_config, save_config

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


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "emulated-bf16"])
def test_cpu_bf16_autocasts_only_where_the_cpu_runs_bf16_natively(monkeypatch, native):
    monkeypatch.setattr(train_module, "native_cpu_bf16", lambda: native)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    asked = load_config(DEMO_CONFIG, {"cpu_bf16": True})
    assert train_module.autocast_bf16(cpu, asked) is native
    assert not train_module.autocast_bf16(cpu, load_config(DEMO_CONFIG, {"cpu_bf16": False}))
    assert train_module.autocast_bf16(cuda, load_config(DEMO_CONFIG, {"cpu_bf16": False}))  # always on CUDA


def test_native_bf16_is_what_torch_reports():
    reported = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert train_module.native_cpu_bf16() == reported


def test_a_run_folder_saved_with_a_removed_option_names_the_commit_that_trained_it(tmp_path):
    """Its config.yaml no longer validates; the one-line refusal says which commit loads it (provenance.json)."""
    from training.config import load_run_config
    from training.run import RunFolder

    run = RunFolder(tmp_path)
    save_config(load_config(DEMO_CONFIG), run.config)
    assert load_run_config(run) == load_config(DEMO_CONFIG)
    run.config.write_text(run.config.read_text() + "tone_jitter: 0.0\n")
    run.provenance.write_text(json.dumps({"data_roots": [], "git": "0fba536", "versions": {}}))
    with pytest.raises(
        ValueError,
        match=r"'tone_jitter': Extra inputs are not permitted; the run was trained at "
        r"commit 0fba536 \(provenance.json\)",
    ):
        load_run_config(run)


def test_a_run_saved_before_an_option_was_retired_loads_where_it_left_the_option_off(tmp_path):
    """Options removed since (training.config.RETIRED) at the value that is now the only behaviour are dropped;
    one that was in use is refused with the commit that trained the run."""
    from training.config import load_run_config
    from training.run import RunFolder

    run = RunFolder(tmp_path)
    save_config(load_config(DEMO_CONFIG), run.config)
    off = "patience: null\nema_decay: null\nloss: weighted-bce\nfocal_gamma: 2.0\nmixup: 0.0\nthreshold: pooled\n"
    run.config.write_text(run.config.read_text() + off)
    assert load_run_config(run) == load_config(DEMO_CONFIG)
    run.config.write_text(run.config.read_text().replace("mixup: 0.0", "mixup: 0.2"))
    with pytest.raises(ValueError, match=r"'mixup': Extra inputs are not permitted; the run was trained at commit"):
        load_run_config(run)
