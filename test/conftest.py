"""Shared fixtures: the real data beside the repository, and one trained + exported demo run per session."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_CONFIG = REPO / "training" / "configs" / "tiny-demo.yaml"
sys.path.insert(0, str(REPO))
CORES = len(os.sched_getaffinity(0))
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # make test's workers share the cores: each worker's torch, and every process it starts, gets cores / workers
    # threads, not all of them each (torch's threads, oversubscribed, spend their time waiting on each other)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, CORES // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
# the Docker engine and the image under test (engine, checkout, built, exported), for the container tests
pytest_plugins = ["engine_fixtures"]


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


PROCESS = REPO / "process.py"


def answer_for(case_dir: Path, model_dir: Path, out_dir: Path, *extra: str) -> tuple[list, subprocess.CompletedProcess]:
    """process.py's answer on a case folder, on the CPU, and its completed process."""
    import json

    from contracts import ANSWER_FILENAME

    result = run_cli(PROCESS, "--input", case_dir, "--output", out_dir, "--model", model_dir, "--device", "cpu", *extra)
    answer = json.loads((out_dir / ANSWER_FILENAME).read_text())
    return answer, result


def assert_clean_failure(result: subprocess.CompletedProcess, out_dir: Path, *expected_words: str) -> None:
    """Exit non-zero, one ERROR line holding ``expected_words``, nothing but our log on stderr, no answer file."""
    from contracts import ANSWER_FILENAME

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert all(line.split(" ", 1)[0] in ("INFO", "WARNING", "ERROR") for line in result.stderr.splitlines()), (
        result.stderr  # nothing but our log: no decoder's own lines
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, result.stderr
    for word in expected_words:
        assert word in errors[0], errors[0]
    assert not (out_dir / ANSWER_FILENAME).exists()
    assert not list(out_dir.glob(".*tmp")) if out_dir.exists() else True


def case_with_file(tmp_path: Path, name: str, content: bytes) -> Path:
    """A case folder whose stack folder holds one file ``name`` with ``content``."""
    from contracts import INPUT_INTERFACE

    image_dir = tmp_path / "in" / "images" / INPUT_INTERFACE
    image_dir.mkdir(parents=True)
    (image_dir / name).write_bytes(content)
    return tmp_path / "in"


@pytest.fixture(scope="module")
def pages():
    """16 synthetic figures, RGB uint8 [16, 128, 128, 3]."""
    from training.synthetic import synthetic_figures

    return synthetic_figures(16, seed=11, n_slides=3)[0]


@pytest.fixture(scope="module")
def model_dir(demo_run):
    return demo_run["model"]


# the modules whose tests need the Docker engine (test/engine_fixtures.py): one worker takes them all, first
ENGINE_MODULES = ("test/test_container.py", "test/test_end_to_end.py")


def in_engine_module(nodeid: str) -> bool:
    return nodeid.split("::")[0] in ENGINE_MODULES


def pytest_xdist_make_scheduler(config, log):
    """How ``make test``'s workers (pytest-xdist, ``-n 2 --dist loadscope``) share the tests: a module at a time, so
    that a module's fixtures (trained runs) are made once, and the engine's modules as one unit, first: they are the
    longest chain (make demo, the image build, export.sh, each container run), and one worker builds the session's
    image once."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class EngineFirst(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "engine" if in_engine_module(nodeid) else super()._split_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            if "engine" in self.workqueue:
                self.workqueue.move_to_end("engine", last=False)
            super()._assign_work_unit(node)

    return EngineFirst(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    """A test that needs the Docker engine outside ``ENGINE_MODULES`` would build a second image on the other worker
    (minutes): refused at collection, naming the test."""
    strays = [i.nodeid for i in items if "engine" in i.fixturenames and not in_engine_module(i.nodeid)]
    if strays:
        raise pytest.UsageError(
            f"{', '.join(strays)} need the Docker engine: their place is {' or '.join(ENGINE_MODULES)}"
        )


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, worker_id) -> dict[str, Path]:
    """``make demo`` as the README gives it, into a scratch folder (this interpreter, the venv taken as installed):
    synthetic data -> 3 trained folds -> exported model -> upload -> the answer on test/input. Made once per
    ``make test``: the first worker that needs it makes it under a file lock, the others read it (read-only)."""
    if worker_id == "master":  # one process, no workers
        root = tmp_path_factory.mktemp("demo")
        _make_demo(root)
        return _demo(root)
    root = tmp_path_factory.getbasetemp().parent / "demo"  # the folder the workers share
    with FileLock(f"{root}.lock"):
        if not (root / "made").exists():
            shutil.rmtree(root, ignore_errors=True)
            _make_demo(root)
            (root / "made").touch()
    return _demo(root)


def _demo(root: Path) -> dict[str, Path]:
    """What ``_make_demo`` left in ``root``: its folders, the answer file and what make printed."""
    from contracts import ANSWER_FILENAME

    paths = {name: root / name for name in ("data", "run", "model", "upload")}
    return {**paths, "answer": root / "output" / ANSWER_FILENAME, "stdout": (root / "stdout.txt").read_text()}


def _make_demo(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    places = [f"PY={sys.executable}", f"DEMO={root}", f"MODEL={root / 'model'}", f"UPLOAD={root / 'upload'}"]
    command = ["make", "--no-print-directory", "-o", ".venv/.installed", "demo", *places]
    # every core, not a worker's share: most of the suite waits for this run, the other worker soon among them
    env = {**os.environ, "OMP_NUM_THREADS": str(CORES)}
    # a session of its own, so that a timeout kills the training make started, not only make
    with subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as make:
        try:
            stdout, stderr = make.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
            make.communicate()
            pytest.fail("make demo took over 900 s")
    if make.returncode != 0:
        pytest.fail(f"make demo exited {make.returncode}:\n{stderr[-3000:]}")
    (root / "stdout.txt").write_text(stdout)


def red_mean_model(model_dir: Path, pixel_size_um: float | None = None) -> Path:
    """An exported model folder whose P(atypical) is known: the mean red value of the page / 255."""
    import torch
    from torch import nn

    from contracts import EnsembleMember, ModelManifest, sha256_of
    from training.export import export_onnx
    from training.model import Ensemble
    from training.onnx_weights import graph_files
    from training.preprocess import Preprocess

    class RedMean(nn.Module):
        def forward(self, x):
            p = x[:, 0].mean(dim=(1, 2)).clamp(1e-6, 1 - 1e-6)
            return torch.log(p) - torch.log1p(-p)  # logit, so that the ensemble's sigmoid returns p

    ensemble = Ensemble(Preprocess((128, 128), "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), [RedMean(), RedMean()])
    model_dir.mkdir()
    export_onnx(ensemble.eval(), torch.zeros(2, 128, 128, 3, dtype=torch.uint8), model_dir / "ensemble.onnx")
    graph = graph_files(model_dir / "ensemble.onnx")
    files = {name: sha256_of(model_dir / name) for name in graph.names}
    manifest = ModelManifest(
        backbone="red-mean",
        folds=2,
        threshold=0.5,
        pixel_size_um=pixel_size_um,
        graphs={"fp32": graph},
        files=files,
        members=[EnsembleMember(run="red-mean", backbone="red-mean", folds=2, training_config={}, oof_metrics={})],
        oof_metrics={},
        created_utc="2026-01-01T00:00:00+00:00",
    )
    (model_dir / "manifest.json").write_text(manifest.model_dump_json())
    return model_dir
