"""The whole chain once: synthetic MIDOG25 data -> 3 LoRA folds -> merged ONNX ensemble -> the real image's run
(test.sh with a Docker engine, on CPU) -> the answer PyTorch gives with the trained, unmerged folds.

The golden answer is computed here, from the run, rather than read from the committed test/expected_output.json:
20 seeded epochs reproduce a model bit for bit on one machine, but a CPU with other vector units rounds
differently and training amplifies it (two machines here gave demo thresholds 0.500 and 0.525)."""

import json

import numpy as np
import torch
from engine_fixtures import run_script

import process
import reader
from contracts import build_answer
from training.adapt import load_fold_model
from training.config import load_config
from training.preprocess import Preprocess


def pytorch_answer(run_dir, case_dir) -> list[dict]:
    """P(atypical) of the stack from each fold's PeftModel as trained (adapters unmerged), averaged in PyTorch."""
    cfg = load_config(run_dir / "config.yaml")
    folds = [load_fold_model(cfg.spec(), run_dir / f"fold_{k}") for k in range(cfg.folds)]
    preprocess = Preprocess.for_backbone(folds[0].get_base_model().backbone)
    pixels = torch.from_numpy(np.stack(reader.read_stack(process.find_stack(case_dir)).pages))
    with torch.no_grad():
        probs = torch.stack([torch.sigmoid(fold(preprocess(pixels))) for fold in folds]).mean(dim=0)
    threshold = json.loads((run_dir / "summary.json").read_text())["threshold"]
    return build_answer(probs.tolist(), threshold)


def test_demo_chain_through_test_sh_matches_pytorch(demo_run, checkout, built, tmp_path):
    """test.sh builds the image with the demo model baked in, as make demo leaves it, and runs it on test/input."""
    expected = tmp_path / "pytorch_answer.json"
    expected.write_text(json.dumps(pytorch_answer(demo_run["run"], checkout / "test" / "input")))
    result = run_script(checkout, "test.sh", GPUS="", EXPECTED=str(expected))
    assert "OK: 16 answers match" in result.stdout


def test_make_demo_leaves_the_tree_docker_build_needs_and_prints_the_answer(demo_run):
    """upload/ holds the graph a GPU serves and its manifest (what the Dockerfile copies), and the last thing make
    demo prints is the answer it wrote."""
    from contracts import ModelManifest

    upload = ModelManifest.load(demo_run["upload"])
    assert sorted(p.name for p in demo_run["upload"].iterdir()) == sorted(["manifest.json", *upload.files])
    assert list(upload.graphs) == ["fp16"]
    answer = demo_run["answer"].read_text()
    assert demo_run["stdout"].rstrip().endswith(answer.rstrip()) and len(json.loads(answer)) == 16
