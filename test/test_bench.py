"""Container timings: the cold-start measurement runs process.py for real and accounts for its parts."""

import json

from conftest import red_mean_model, run_cli


def test_cold_start_times_the_container_path(tmp_path):
    model = red_mean_model(tmp_path / "model")
    run_cli("-m", "training", "cold-start", model, "--repeats", "2", "--json", tmp_path / "cold.json")
    result = json.loads((tmp_path / "cold.json").read_text())
    assert result["device"] == "cpu" and result["precision"] == "fp32" and result["repeats"] == 2
    assert result["provider"] == "CPUExecutionProvider"
    parts = result["imports_s"] + result["session_s"] + result["predict_s"]
    assert 0 < result["predict_s"] < parts  # every part measured
    assert parts < 3 * result["cold_start_s"]  # the parts belong to the same path as the whole
    assert result["cold_start_s_min"] <= result["cold_start_s"]
    assert result["session_as_exported_s"] > 0 and result["session_preoptimized_s"] > 0
