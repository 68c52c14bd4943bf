"""The lab's commands of ``python -m training``: describe, probe, stacks, score, experiment, cold-start, bench,
bench-train, gpu-check (``training.cli`` adds them beside the product's)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_lab_commands(sub: argparse._SubParsersAction) -> None:
    for add in (_add_data_measures, _add_cases_and_score):
        add(sub)
    _add_experiment_commands(sub)


def _describe(args: argparse.Namespace) -> None:
    import json

    from training.data import read_datasets
    from training.lab.describe import describe_domains, table
    from training.pixels import at_pixel_size, decode_figures

    figures = read_datasets(args.data_root)
    pixels = decode_figures(figures)
    if args.pixel_size_um is not None:
        pixels = at_pixel_size(figures, pixels, args.pixel_size_um)
    domains = describe_domains(figures, pixels)
    print(table(domains))
    if args.json:
        args.json.write_text(json.dumps(domains, indent=1) + "\n")


def _probe(args: argparse.Namespace) -> None:
    import json

    from training.evaluate import nan_as_null
    from training.lab.probe import probe

    results = probe(args.model_dir, args.data_root, args.scanner, args.device)
    columns = ("mean_prob_normal", "mean_prob_atypical", "sensitivity", "specificity", "balanced_accuracy", "roc_auc")
    print(f"{'rendering':18}" + "".join(f"{c:>19}" for c in columns))
    for name, row in results.items():
        print(f"{name:18}" + "".join(f"{row[c]:>19.3f}" for c in columns))
    if args.json:
        args.json.write_text(json.dumps(nan_as_null(results), indent=1, allow_nan=False) + "\n")


def _stacks(args: argparse.Namespace) -> None:
    from training.lab.cases import build_stacks

    build_stacks(args.data_root, args.output, args.stack_size, args.stacks, args.seed, args.domain)


def _score(args: argparse.Namespace) -> None:
    from training.lab.cases import run_and_score, score_folder

    if args.image:
        cases = args.cases or args.ground_truth.parent
        run_and_score(
            args.image, cases, args.ground_truth, args.answers, args.json, args.device, args.domains, args.report
        )
    else:
        score_folder(args.ground_truth, args.answers, args.json, args.domains, args.report)


def _experiment(args: argparse.Namespace) -> None:
    from training.lab.experiment import run_grid

    run_grid(args.config, args.data_root, args.output, args.report_dir, args.shard, args.report_only)


def _cold_start(args: argparse.Namespace) -> None:
    from training.lab.cold_start import cold_start, report

    report(cold_start(args.model_dir, args.input, args.device, args.repeats), args.json)


def _bench(args: argparse.Namespace) -> None:
    from training.lab.bench import bench_stack
    from training.lab.cold_start import report

    report(bench_stack(args.device, args.backbone, args.repeats, args.input, peak_tflops=args.peak_tflops), args.json)


def _gpu_check(args: argparse.Namespace) -> None:
    from training.lab.cold_start import report
    from training.lab.gpu_check import gpu_check

    report(gpu_check(args.device, args.backbone, args.repeats, train_batch_size=args.train_batch_size), args.json)


def _bench_train(args: argparse.Namespace) -> None:
    from training.lab.bench_train import bench_train
    from training.lab.cold_start import report

    result = bench_train(args.device, args.backbone, args.batch_size, args.steps, args.peak_tflops)
    report(result, args.json)


def _add_data_measures(sub: argparse._SubParsersAction) -> None:
    """The lab's measurements of data and of a model's robustness: describe, probe."""
    p = sub.add_parser(
        "describe",
        help="per scanner: figures, atypical share, mean colour, sharpness, detail and mid band, JPEG block grid",
    )
    p.add_argument("--data-root", type=Path, nargs="+", required=True)
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument(
        "--pixel-size-um",
        type=float,
        help="describe the figures resampled to this pixel size, as a "
        "config's pixel_size_um trains on them (default: as scanned)",
    )
    p.set_defaults(func=_describe)

    p = sub.add_parser(
        "probe",
        help="an exported model's scores with the figures rendered otherwise (JPEG, noise, "
        "tone, stain, focus, pixel size): what an unseen scanner's shift could be",
    )
    p.add_argument("model_dir", type=Path)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--scanner", action="append", metavar="SCANNER", help="probe only this scanner's figures")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="cpu")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=_probe)


def _add_cases_and_score(sub: argparse._SubParsersAction) -> None:
    """Cases as the leaderboard builds them, and the official evaluation's metrics: stacks, score."""
    p = sub.add_parser(
        "stacks",
        help="Grand Challenge cases (stacks of figures) + their ground truth in the "
        "official evaluation's format, from dataset folders",
    )
    p.add_argument("--data-root", type=Path, nargs="+", required=True)
    p.add_argument(
        "--output",
        type=Path,
        required=True,
        help="new folder: stack_<k>/, ground_truth.json, domains.json, figures.csv",
    )
    p.add_argument("--stack-size", type=int, default=16, help="pages per stack (1..16; a group's last is shorter)")
    p.add_argument("--stacks", type=int, help="write only the first N stacks (default: every figure)")
    p.add_argument("--seed", type=int, default=0, help="shuffles the figures")
    p.add_argument(
        "--domain",
        choices=("tumor", "scanner"),
        default="tumor",
        help="what the ground truth's tumordomains number (local ids, in domains.json)",
    )
    p.set_defaults(func=_stacks)

    p = sub.add_parser(
        "score",
        help="the official Track 2 evaluation's metrics for answers to cases "
        "(optionally running a container image over the cases first)",
    )
    p.add_argument("--ground-truth", type=Path, required=True, help="ground_truth.json in the official format")
    p.add_argument(
        "--answers",
        type=Path,
        required=True,
        help="<stack>/<answer>.json per stack, or Grand "
        "Challenge's predictions.json + <job pk>/output/ (with --image: written here)",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument(
        "--domains",
        type=Path,
        help="domain id -> name JSON (default: domains.json beside the ground truth, else the official tumor domains)",
    )
    p.add_argument(
        "--report", type=Path, metavar="DIR", help="also DIR/report.html: the pages themselves with their answers"
    )
    p.add_argument("--image", help="run this container image over --cases first, one docker run per case")
    p.add_argument("--cases", type=Path, help="the case folders (default: the ground truth's folder)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda",
        help="cpu: run the image with MIDOG_DEVICE=cpu, for a host without a GPU",
    )
    p.set_defaults(func=_score)


def _add_device_and_backbone(p: argparse.ArgumentParser, device: str, backbone: str) -> None:
    """The benchmarks' device and model: Virchow's blocks at three sizes, random weights (bench.BENCH_BACKBONES)."""
    from training.lab.bench import BENCH_BACKBONES

    p.add_argument("--device", choices=("cpu", "cuda"), default=device)
    p.add_argument(
        "--backbone",
        choices=BENCH_BACKBONES,
        default=backbone,
        help="Virchow's blocks, random weights: a few small ones, ViT-B size, Virchow's 632M",
    )


def _add_experiment_commands(sub: argparse._SubParsersAction) -> None:
    """The lab's grids and benchmarks: experiment, cold-start, bench, bench-train."""
    p = sub.add_parser("experiment", help="train, measure and report a grid of runs (training/configs/experiments)")
    p.add_argument("--config", type=Path, required=True, help="grid file")
    p.add_argument("--data-root", type=Path, nargs="+", required=True)
    p.add_argument("--output", type=Path, required=True, help="grid folder: cells/<cell>/ run folders, cost.json")
    p.add_argument("--report-dir", type=Path, help="where results.csv, report.md and the plots go (default: output)")
    p.add_argument("--shard", help="K/N: train only every N-th cell, from the K-th (grids split across machines)")
    p.add_argument("--report-only", action="store_true", help="train nothing; report the finished cells")
    p.set_defaults(func=_experiment)

    p = sub.add_parser("cold-start", help="time process.py from process start to the answer written, and its parts")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--input", type=Path, default=Path("test/input"), help="case folder (default: test/input)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=_cold_start)

    p = sub.add_parser("bench", help="one stack: ours (merged, one ONNX graph, as process.py serves) against the peer")
    _add_device_and_backbone(p, "cpu", "tiny-virchow")
    p.add_argument("--input", type=Path, default=Path("test/input"), help="case folder (default: test/input)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, help="the device's peak, where the built-in GPU table lacks it")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=_bench)

    p = sub.add_parser("bench-train", help="LoRA training steps: bf16 + fused attention + checkpointing vs naive")
    _add_device_and_backbone(p, "cpu", "tiny-virchow")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per recipe, after one warm-up step each")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU where not built in")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=_bench_train)

    p = sub.add_parser("gpu-check", help="the Virchow-size ensemble on one GPU: serving, peer, cold start, VRAM, MFU")
    _add_device_and_backbone(p, "cuda", "virchow-size-random")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-batch-size", type=int, default=32, help="LoRA training steps' batch")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=_gpu_check)
