"""The whole chain once: synthetic MIDOG25 data -> 3 LoRA folds -> merged ONNX ensemble -> the container's run
(test.sh against the fake docker, on CPU) -> the committed answer for test/input, test/expected_output.json."""

from test_container_scripts import docker_calls, repo_copy, run_script


def test_demo_chain_through_test_sh_reproduces_the_expected_output(demo_run, tmp_path):
    log = tmp_path / "docker.log"
    checkout = repo_copy(tmp_path, demo_run["model"])  # the model baked into the "image", as make demo leaves it
    result = run_script(checkout / "test.sh", {"GPUS": "", "FAKE_DOCKER_LOG": str(log)})
    assert result.returncode == 0, result.stderr
    assert "OK: 16 answers match" in result.stdout
    build, run = docker_calls(log)
    assert build[0] == "build" and run[0] == "run"
    assert run[run.index("--network") + 1] == "none"
    assert any(a.endswith(":/input:ro") for a in run)
    assert run[-2:] == ["--device", "cpu"] and "--gpus" not in run
