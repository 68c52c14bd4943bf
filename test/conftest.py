"""Shared fixtures: the real data beside the repository, and one trained + exported demo run per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_CONFIG = REPO / "training" / "configs" / "tiny-demo.yaml"
sys.path.insert(0, str(REPO))


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data; skipped when absent, except under CI where its absence is a failure."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing: CI must run with ../shared beside the repository")
        pytest.skip(f"{path} not available")
    return path


def run_cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python <args>`` from the repository root, as a user would."""
    result = subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, check=False, timeout=900
    )
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> dict[str, Path]:
    """The demo chain's first three steps, through the CLI: synthetic data -> 3 trained folds -> exported model."""
    root = tmp_path_factory.mktemp("demo")
    data, run, model = root / "data", root / "run", root / "model"
    run_cli("-m", "training", "synth", "--output", data)
    run_cli("-m", "training", "train", "--config", DEMO_CONFIG, "--data-root", data, "--output", run)
    run_cli("-m", "training", "export", run, "--output", model)
    return {"data": data, "run": run, "model": model}


def red_mean_model(model_dir: Path, pixel_size_um: float | None = None) -> Path:
    """An exported model folder whose P(atypical) is known: the mean red value of the page / 255."""
    import torch
    from torch import nn

    from contracts import ModelManifest, sha256_of
    from training.export import export_onnx
    from training.model import Ensemble
    from training.preprocess import Preprocess

    class RedMean(nn.Module):
        def forward(self, x):
            p = x[:, 0].mean(dim=(1, 2)).clamp(1e-6, 1 - 1e-6)
            return torch.log(p) - torch.log1p(-p)  # logit, so that the ensemble's sigmoid returns p

    ensemble = Ensemble(Preprocess((128, 128), "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), [RedMean(), RedMean()])
    model_dir.mkdir()
    export_onnx(ensemble.eval(), torch.zeros(2, 128, 128, 3, dtype=torch.uint8), model_dir / "ensemble.onnx")
    files = {p.name: sha256_of(p) for p in model_dir.iterdir()}
    manifest = ModelManifest(
        backbone="red-mean",
        folds=2,
        threshold=0.5,
        pixel_size_um=pixel_size_um,
        graphs={"fp32": "ensemble.onnx"},
        files=files,
        training_config={},
        oof_metrics={},
        created_utc="2026-01-01T00:00:00+00:00",
    )
    (model_dir / "manifest.json").write_text(manifest.model_dump_json())
    return model_dir
