"""Compare a container's answer with an expected one: same length, classes exact, confidences within a tolerance.

With ``--threshold`` (the model's), a page whose expected confidence lies within the tolerance of the threshold
may take either class, the one its own confidence gives: a reduced-precision graph (fp16 on CUDA, int8 on the
CPU) that moves P(atypical) by less than the tolerance can carry such a page across it. Every other page's class
must match.

Standard library only: ``test.sh`` runs it with the host's python3, outside any virtual environment.
Usage: python3 test/compare_answer.py GOT.json EXPECTED.json [--tolerance 0.02] [--threshold T]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def answer_mismatches(got: object, expected: list, tolerance: float, threshold: float | None = None) -> list[str]:
    if not isinstance(got, list):
        return [f"answer is a {type(got).__name__}, not a list"]
    if len(got) != len(expected):
        return [f"{len(got)} entries, expected {len(expected)}"]
    problems = []
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if not isinstance(g, dict) or set(g) != {"class", "confidence"}:
            problems.append(f"page {i}: entry {g!r} does not have exactly the keys class and confidence")
            continue
        if not isinstance(g["confidence"], float):
            problems.append(f"page {i}: confidence {g['confidence']!r} is not a float")
            continue
        borderline = threshold is not None and abs(e["confidence"] - threshold) <= tolerance
        own_class = None if threshold is None else ("atypical" if g["confidence"] >= threshold else "normal")
        if borderline and g["class"] != own_class:
            problems.append(f"page {i}: class {g['class']!r} contradicts its confidence {g['confidence']:.6f}")
        elif g["class"] != e["class"] and not borderline:
            problems.append(f"page {i}: class {g['class']!r}, expected {e['class']!r}")
        if abs(g["confidence"] - e["confidence"]) > tolerance:
            off = f"confidence {g['confidence']:.6f}, expected {e['confidence']:.6f} +- {tolerance}"
            problems.append(f"page {i}: {off}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("got", type=Path)
    parser.add_argument("expected", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--threshold", type=float, help="the model's threshold: borderline pages may flip class")
    args = parser.parse_args(argv)
    try:
        got = json.loads(args.got.read_text())
    except (OSError, ValueError) as err:
        print(f"FAIL: cannot read {args.got}: {err}", file=sys.stderr)
        return 1
    problems = answer_mismatches(got, json.loads(args.expected.read_text()), args.tolerance, args.threshold)
    for line in problems:
        print(f"FAIL: {line}", file=sys.stderr)
    if not problems:
        print(f"OK: {len(got)} answers match {args.expected} (confidence tolerance {args.tolerance})")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
