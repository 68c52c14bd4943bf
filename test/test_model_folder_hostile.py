"""A model folder or an environment built to hurt: each model-folder case refused with exit 4 and one line; a closed
stderr still answered."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import PROCESS, REPO, assert_clean_failure, red_mean_model, run_cli
from torch import nn

from contracts import ANSWER_FILENAME


def served(tmp_path, model):
    out = tmp_path / "out"
    result = run_cli(PROCESS, "--input", REPO / "test" / "input", "--output", out, "--model", model, check=False)
    return result, out


def test_a_manifest_that_is_not_utf8(tmp_path):
    model = red_mean_model(tmp_path / "model")
    text = (model / "manifest.json").read_bytes()
    (model / "manifest.json").write_bytes(text.replace(b'"red-mean"', b'"red-\xff-mean"', 1))
    result, out = served(tmp_path, model)
    assert result.returncode == 4
    assert_clean_failure(result, out, "manifest.json", "not UTF-8")


@pytest.mark.parametrize("name", ["/tmp/elsewhere.onnx", "../elsewhere.onnx", "sub/ensemble.onnx"])
def test_a_manifest_naming_files_outside_its_folder(tmp_path, name):
    model = red_mean_model(tmp_path / "model")
    manifest = json.loads((model / "manifest.json").read_text())
    old = manifest["graphs"]["fp32"]["file"]
    manifest["graphs"]["fp32"]["file"] = name
    manifest["files"][name] = manifest["files"].pop(old)
    (model / "manifest.json").write_text(json.dumps(manifest))
    result, out = served(tmp_path, model)
    assert result.returncode == 4
    assert_clean_failure(result, out, "not plain names inside the model folder")


class Constant(nn.Module):
    def __init__(self, value: float, shape: tuple[int, ...]):
        super().__init__()
        self.value, self.shape = value, shape

    def forward(self, pixels):
        return torch.full(self.shape, self.value) + 0 * pixels.float().mean()


@pytest.mark.parametrize(
    ("value", "shape", "words"),
    [
        (1.5, (1,), "not one probability in [0, 1]"),
        (0.3, (1, 2), "[1, 2]"),
        (float("nan"), (1,), "not one probability"),
    ],
)
def test_a_graph_that_answers_no_probability(tmp_path, value, shape, words):
    from contracts import sha256_of

    model = red_mean_model(tmp_path / "model")
    export = tmp_path / "graph"
    export.mkdir()
    torch.onnx.export(
        Constant(value, shape),
        (torch.zeros(1, 128, 128, 3, dtype=torch.uint8),),
        str(export / "g.onnx"),
        input_names=["pixels"],
        output_names=["prob_atypical"],
        dynamo=False,
    )
    shutil.copy(export / "g.onnx", model / "ensemble.onnx")
    (model / "ensemble.onnx.data").unlink(missing_ok=True)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["graphs"]["fp32"]["external_data"] = []
    manifest["files"] = {"ensemble.onnx": sha256_of(model / "ensemble.onnx")}
    (model / "manifest.json").write_text(json.dumps(manifest))
    result, out = served(tmp_path, model)
    assert result.returncode == 4, result.stderr
    assert_clean_failure(result, out, words)


def test_a_stale_temp_answer_of_a_killed_run_is_removed(tmp_path):
    model = red_mean_model(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".{ANSWER_FILENAME}.abc123.tmp"
    stale.write_text("[]")
    result, _ = served(tmp_path, model)
    assert result.returncode == 0 and not stale.exists()
    assert len(json.loads((out / ANSWER_FILENAME).read_text())) == 16
    assert np.isfinite([e["confidence"] for e in json.loads((out / ANSWER_FILENAME).read_text())]).all()


def test_closed_stderr_still_answers(tmp_path):
    """Started with stderr closed (and TMPDIR naming no folder), the case is still answered."""
    import subprocess
    import sys

    model = red_mean_model(tmp_path / "model")
    out = tmp_path / "out"
    command = (
        f'"{sys.executable}" "{PROCESS}" --input "{REPO / "test" / "input"}" --output "{out}" --model "{model}" 2>&-'
    )
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path / "absent")}
    result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout
    assert len(json.loads((out / ANSWER_FILENAME).read_text())) == 16
