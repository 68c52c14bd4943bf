"""The Docker engine and the image under test, shared by the container tests: a running engine with the test base
(test/container/engine.sh), a scratch checkout with the demo model and its golden answer, the image built by
test.sh and the uploads export.sh writes. Without an engine these fixtures skip (under CI=true they fail)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from compare_answer import answer_mismatches
from conftest import REPO, run_cli

from contracts import ANSWER_FILENAME

TEST_BASE_IMAGE = os.environ.get("TEST_BASE_IMAGE", "midog25-test-base")
# a tag of this session's own: two checkouts testing on one engine neither clobber nor remove each other's image
IMAGE = f"midog25-track2-test-{uuid.uuid4().hex[:8]}"
IMAGE_FILES = [
    "Dockerfile",
    ".dockerignore",
    "requirements.txt",
    "process.py",
    "declared.py",
    "reader.py",
    "contracts.py",
    "inference.py",
]
SCRIPTS = ["test.sh", "export.sh", "preflight.sh", "test/compare_answer.py"]
CPU = ["--env", "MIDOG_DEVICE=cpu"]
# same onnxruntime build and graph inside and outside the image, on the same CPU
CONFIDENCE_TOLERANCE = 1e-5


def docker(*args: str | Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def engine() -> None:
    """A running Docker engine with the test base image, or a skip (a failure under CI)."""
    up = shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    if not up:
        if os.environ.get("CI") == "true":
            pytest.fail("no Docker engine: .ci/run must start one (test/container/engine.sh)")
        pytest.skip("no Docker engine (bash test/container/engine.sh starts one, as root)")
    subprocess.run(
        ["bash", str(REPO / "test" / "container" / "engine.sh")],
        check=True,
        capture_output=True,
        env={**os.environ, "TEST_BASE_IMAGE": TEST_BASE_IMAGE},
        timeout=900,
    )


@pytest.fixture(scope="session")
def checkout(engine, demo_run, tmp_path_factory) -> Iterator[Path]:
    """A scratch checkout as ``make demo`` leaves one: what the image and the scripts need (the training package
    writes the upload), the demo model as model/, its upload as upload/ (what the image holds) and ``golden.json``:
    the upload's answer on test/input from process.py on this machine. The session's image is removed after."""
    root = tmp_path_factory.mktemp("image") / "repo"
    for name in [*IMAGE_FILES, *SCRIPTS]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "test" / "input", root / "test" / "input")
    shutil.copytree(REPO / "training", root / "training", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(demo_run["model"], root / "model")
    shutil.copytree(demo_run["upload"], root / "upload")
    out = root.parent / "golden"
    run_cli(
        REPO / "process.py",
        "--input",
        root / "test" / "input",
        "--output",
        out,
        "--model",
        root / "upload",
        "--device",
        "cpu",
    )
    shutil.copy(out / ANSWER_FILENAME, root / "golden.json")
    yield root
    docker("image", "rm", "--force", IMAGE, check=False)


def run_script(checkout: Path, script: str, check: bool = True, **env: str | None) -> subprocess.CompletedProcess:
    """``bash script`` in ``checkout`` with this session's tag and the test base; ``env`` over the environment (a
    None unsets the variable)."""
    env = {**os.environ, "IMAGE": IMAGE, "BASE_IMAGE": TEST_BASE_IMAGE, **env}
    env = {k: v for k, v in env.items() if v is not None}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])  # python3 with the repo's deps
    result = subprocess.run(["bash", script], cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, f"{script} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="session")
def exported(checkout) -> dict[str, Path]:
    """export.sh's two uploads: the image archive and the model tarball."""
    run_script(checkout, "export.sh")
    return {"image": checkout / f"{IMAGE}.tar.gz", "model": checkout / "model.tar.gz"}


@pytest.fixture(scope="session")
def built(checkout) -> subprocess.CompletedProcess:
    """test.sh as a host without a GPU runs it: build on the test base, run on test/input, compare with golden."""
    return run_script(checkout, "test.sh", GPUS="", EXPECTED="golden.json")


def writable_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    path.chmod(0o777)  # as the platform's /output and the harness's OUT: the image's user is not the host's
    return path


def run_case(tmp_path: Path, *flags: str | Path, image: str = IMAGE) -> tuple[subprocess.CompletedProcess, Path]:
    """One container start on test/input as Grand Challenge starts it: no network, /input read-only."""
    out = writable_dir(tmp_path / f"out{len(list(tmp_path.glob('out*')))}")
    result = docker(
        "run",
        "--rm",
        "--network",
        "none",
        "--volume",
        f"{REPO / 'test' / 'input'}:/input:ro",
        "--volume",
        f"{out}:/output",
        *flags,
        image,
        check=False,
    )
    return result, out / ANSWER_FILENAME


def assert_golden(answer_path: Path, golden: Path) -> None:
    answer = json.loads(answer_path.read_text())
    assert answer_mismatches(answer, json.loads(golden.read_text()), CONFIDENCE_TOLERANCE) == []
