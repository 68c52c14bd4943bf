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
