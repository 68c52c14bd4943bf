"""Container timings: the cold start of ``process.py`` and where it goes, and ours against the peer approach.

``python -m training cold-start MODEL_DIR [--input CASE] [--device cpu|cuda] [--repeats 5] [--json OUT]`` runs
``process.py`` as the container does, ``repeats`` times in fresh processes, and times the parts in fresh processes
too: the interpreter with ``process.py``'s imports, the ONNX Runtime session, and one stack's inference. It also
times, interleaved, opening the served graph as exported against opening a copy ONNX Runtime optimized ahead of
time (basic level, the provider-independent one): whether shipping a pre-optimized graph would shorten the start;
and the start's integrity check, the served graph's sha256 against every file's.
"""

import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from contracts import ANSWER_FILENAME

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SAMPLE_CASE = REPO / "test" / "input"

# One fresh process: import what process.py imports, open the session, answer the stack; print the three times.
_PARTS = """
import json, sys, time
started = time.perf_counter()
import process
imported = time.perf_counter()
ensemble = process.OnnxEnsemble(process.Path(sys.argv[1]), sys.argv[2])
loaded = time.perf_counter()
case = process.read_stack(process.find_stack(process.Path(sys.argv[3])))
ensemble.predict(case.pages, pixel_sizes_um=case.pixel_sizes_um)
done = time.perf_counter()
print(json.dumps({"imports_s": imported - started, "session_s": loaded - imported, "predict_s": done - loaded,
                  "precision": ensemble.precision, "provider": ensemble.provider}))
"""


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def session_seconds(model_dir: Path, device: str = "cpu", repeats: int = 5) -> dict[str, float]:
    """Median seconds to open the served graph as exported vs pre-optimized at basic level, interleaved."""
    import onnxruntime as ort

    from contracts import ModelManifest

    graph = ModelManifest.load(model_dir).graph_for(device)[1].file
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / graph
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{graph}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(model_dir / graph), options, providers=providers)
        times: dict[str, list[float]] = {"session_as_exported_s": [], "session_preoptimized_s": []}
        for _ in range(repeats):
            for key, path in (("session_as_exported_s", model_dir / graph), ("session_preoptimized_s", optimized)):
                started = time.perf_counter()
                ort.InferenceSession(str(path), providers=providers)
                times[key].append(time.perf_counter() - started)
    return {key: statistics.median(values) for key, values in times.items()}


def integrity_seconds(model_dir: Path, device: str = "cpu") -> dict[str, float]:
    """Seconds to check the sha256 of the served graph's files (what a start does) and of every file the
    manifest lists (what it did before it checked only what it loads), each after one read to warm the cache."""
    from contracts import ModelManifest

    manifest = ModelManifest.load(model_dir)
    precision = manifest.graph_for(device)[0]
    times = {}
    for key, verify in (
        ("verify_served_graph_s", lambda: manifest.verify_graph(model_dir, precision)),
        ("verify_every_file_s", lambda: manifest.verify_files(model_dir)),
    ):
        verify()
        started = time.perf_counter()
        verify()
        times[key] = time.perf_counter() - started
    return times


def cold_start(model_dir: Path, case_dir: Path = SAMPLE_CASE, device: str = "cpu", repeats: int = 5) -> dict:
    """Median seconds from process start to the answer written, and of its parts, over ``repeats`` runs each."""
    model_dir, case_dir = model_dir.resolve(), case_dir.resolve()  # the parts run from the repository root
    totals, parts = [], []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(repeats):
            command = [
                sys.executable,
                str(REPO / "process.py"),
                "--input",
                str(case_dir),
                "--output",
                out,
                "--model",
                str(model_dir),
                "--device",
                device,
            ]
            started = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            totals.append(time.perf_counter() - started)
            if result.returncode != 0 or not (Path(out) / ANSWER_FILENAME).is_file():
                raise RuntimeError(f"process.py failed: {result.stderr.strip().splitlines()[-1:]}")
            measured = subprocess.run(
                [sys.executable, "-c", _PARTS, str(model_dir), device, str(case_dir)],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO,
            )
            parts.append(json.loads(measured.stdout.strip().splitlines()[-1]))
    return {
        "device": device,
        "provider": parts[0]["provider"],
        "precision": parts[0]["precision"],
        "repeats": repeats,
        "cold_start_s": statistics.median(totals),
        "cold_start_s_min": min(totals),
        **{key: _median(parts, key) for key in ("imports_s", "session_s", "predict_s")},
        **session_seconds(model_dir, device, repeats),
        **integrity_seconds(model_dir, device),
    }


def report(result: dict, json_out: Path | None) -> dict:
    print(json.dumps(result, indent=1))  # the report is the command's output
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1) + "\n")
        log.info("wrote %s", json_out)
    return result
