"""Dockerfile, test.sh, export.sh and .ci/run: static checks, shellcheck, and real runs against a fake docker."""

import gzip
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import REPO

from contracts import ModelManifest

FAKE_DOCKER_DIR = REPO / "test" / "fake_docker"
SCRIPTS = ["test.sh", "export.sh", ".ci/run"]


def run_script(script: Path, env_extra: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{FAKE_DOCKER_DIR}{os.pathsep}{os.environ['PATH']}", **env_extra}
    return subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def docker_calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_dockerfile_follows_the_contract():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.04", base), base
    requirements = (REPO / "requirements.txt").read_text()
    assert re.search(r"^onnxruntime-gpu==1\.2[0-6]\.\d+$", requirements, re.M), "pin a CUDA 12 onnxruntime-gpu"
    assert text.index("COPY requirements.txt") < text.index("pip install --requirement /opt/app/requirements.txt")
    assert text.index("pip install") < text.index("COPY contracts.py process.py")
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    assert entrypoint[-3:] == ["/opt/app/process.py", "--device", "cuda"]
    assert "WORKDIR /opt/app" in text and "HF_HUB_OFFLINE=1" in text


def test_dockerignore_keeps_the_context_small():
    rules = (REPO / ".dockerignore").read_text().split()
    assert rules[rules.index("*")] == "*"
    assert {"!requirements.txt", "!process.py", "!contracts.py", "!model/"} <= set(rules)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_pass_shellcheck(script):
    shellcheck = shutil.which("shellcheck") or str(Path(os.sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, "--shell=bash", str(REPO / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_ci_runs_make_test():
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_test_sh_with_gpus_fails_when_cuda_is_not_active(demo_run, tmp_path):
    log = tmp_path / "docker.log"
    result = run_script(REPO / "test.sh", {"FAKE_DOCKER_LOG": str(log), "FAKE_DOCKER_MODEL": str(demo_run["model"])})
    assert result.returncode != 0
    assert "--device cuda" in result.stderr
    run_args = docker_calls(log)[1]
    assert run_args[run_args.index("--gpus") + 1] == "all"


def test_export_sh_writes_the_image_and_the_model_tarball(demo_run, tmp_path):
    workdir = tmp_path / "repo"
    workdir.mkdir()
    for name in ("export.sh", "Dockerfile"):
        shutil.copy(REPO / name, workdir / name)
    shutil.copytree(demo_run["model"], workdir / "model")
    (workdir / "model" / "README.md").write_text("docs")
    result = run_script(workdir / "export.sh", {}, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert gzip.decompress((workdir / "midog25-track2.tar.gz").read_bytes()).startswith(b"fake image")
    with tarfile.open(workdir / "model.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        tar.extractall(tmp_path / "opt-ml-model", filter="data")
    assert {"manifest.json", "ensemble.onnx"} <= names and "README.md" not in names
    ModelManifest.load(tmp_path / "opt-ml-model").verify_files(tmp_path / "opt-ml-model")


def test_export_sh_refuses_without_a_model(tmp_path):
    shutil.copy(REPO / "export.sh", tmp_path / "export.sh")
    result = run_script(tmp_path / "export.sh", {}, cwd=tmp_path)
    assert result.returncode == 1 and "model/manifest.json missing" in result.stderr
