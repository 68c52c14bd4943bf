"""A stack as one batch against its pages one at a time, side by side in one process, through process.py's session.

``python -m training.lab.page_timing MODEL_DIR [--input CASE_DIR] [--device cpu|cuda] [--repeats N]`` prints JSON:
the median seconds of each way (interleaved repeats, after one warm-up of each), their ratio, and the largest
|P(atypical)| difference between a page in the batch and the same page alone. process.py serves pages one at a
time (``OnnxEnsemble.predict``); the batch is timed by calling the same session with the whole stack.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from process import OnnxEnsemble, find_stack, read_stack

REPO = Path(__file__).resolve().parents[2]


def compare(model_dir: Path, input_dir: Path, device: str = "cpu", repeats: int = 20) -> dict:
    case = read_stack(find_stack(input_dir))
    ensemble = OnnxEnsemble(model_dir, device)
    pages = ensemble.at_model_pixel_size(case.pages, case.pixel_sizes_um)
    batch = np.stack(pages)

    def as_batch() -> np.ndarray:
        (out,) = ensemble.session.run([ensemble.manifest.output_name], {ensemble.manifest.input_name: batch})
        return out.astype(np.float64)

    def one_at_a_time() -> np.ndarray:
        return ensemble.predict(pages)

    ways = {"batch": as_batch, "one_at_a_time": one_at_a_time}
    probs = {name: way() for name, way in ways.items()}  # the warm-up
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, way in ways.items():
            started = time.perf_counter()
            way()
            seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "model": str(model_dir),
        "precision": ensemble.precision,
        "provider": ensemble.provider,
        "pages": len(pages),
        "repeats": repeats,
        "batch_s": round(medians["batch"], 4),
        "one_at_a_time_s": round(medians["one_at_a_time"], 4),
        "ratio": round(medians["one_at_a_time"] / medians["batch"], 3),
        "max_abs_dp_batch_vs_alone": float(np.abs(probs["batch"] - probs["one_at_a_time"]).max()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--input", type=Path, default=REPO / "test" / "input", help="case folder (default test/input)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    print(json.dumps(compare(args.model_dir, args.input, args.device, args.repeats), indent=2))


if __name__ == "__main__":
    main()
