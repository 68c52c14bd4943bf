"""``python -m training <command>``: synth | case | describe | train | export | predict | probe | evaluate |
experiment | cold-start | bench | bench-train | stacks | score."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("training")


def _synth(args: argparse.Namespace) -> None:
    from training.synthetic import write_midog25

    write_midog25(args.output, n=args.n, seed=args.seed, n_slides=args.slides)


def _case(args: argparse.Namespace) -> None:
    from training.synthetic import synthetic_figures, write_case

    pages, _ = synthetic_figures(args.pages, seed=args.seed, n_slides=2)
    path = write_case(args.output, pages, name=args.name, fmt=args.format)
    log.info("wrote a %d-page case to %s", args.pages, path)


def _describe(args: argparse.Namespace) -> None:
    import json

    from training.data import at_pixel_size, decode_figures, describe_domains, read_datasets

    figures = read_datasets(args.data_root)
    pixels = decode_figures(figures)
    if args.pixel_size_um is not None:
        pixels = at_pixel_size(figures, pixels, args.pixel_size_um)
    domains = describe_domains(figures, pixels)
    print(f"{'scanner':24}" + "".join(f"{k:>15}" for k in next(iter(domains.values()))))
    for scanner, figs in domains.items():
        print(f"{scanner[:24]:24}" + "".join(f"{v:>15.3f}" if isinstance(v, float) else f"{v:>15d}" for v in
                                              figs.values()))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(domains, indent=1) + "\n")


def _train(args: argparse.Namespace) -> None:
    from training.config import load_config
    from training.train import train_run

    overrides = {key: value for key, value in (("epochs", args.epochs), ("seed", args.seed)) if value is not None}
    if args.hold_out_scanner:
        overrides["hold_out_scanners"] = args.hold_out_scanner
    cfg = load_config(args.config, overrides)
    folds = [args.fold] if args.fold is not None else None
    train_run(cfg, args.data_root, args.output, folds=folds, cache_dir=args.cache_dir)


def _export(args: argparse.Namespace) -> None:
    from training.export import export_run

    export_run(args.run_dir, args.output, args.fold)


def _predict(args: argparse.Namespace) -> None:
    from training.predict import predict_folder

    predict_folder(
        args.model_dir, args.data_root, args.output, device=args.device, precision=args.precision, scanners=args.scanner
    )


def _probe(args: argparse.Namespace) -> None:
    import json

    from training.evaluate import nan_as_null
    from training.probe import probe

    results = probe(args.model_dir, args.data_root, args.scanner, args.device)
    columns = ("mean_prob_normal", "mean_prob_atypical", "sensitivity", "specificity", "balanced_accuracy", "roc_auc")
    print(f"{'rendering':18}" + "".join(f"{c:>19}" for c in columns))
    for name, row in results.items():
        print(f"{name:18}" + "".join(f"{row[c]:>19.3f}" for c in columns))
    if args.json:
        args.json.write_text(json.dumps(nan_as_null(results), indent=1, allow_nan=False) + "\n")


def _evaluate(args: argparse.Namespace) -> None:
    from training.evaluate import evaluate_file

    evaluate_file(args.predictions, args.json, args.threshold, args.column)


def _stacks(args: argparse.Namespace) -> None:
    from training.score import build_stacks

    build_stacks(args.data_root, args.output, args.stack_size, args.stacks, args.seed, args.domain)


def _score(args: argparse.Namespace) -> None:
    from training.score import run_and_score, score_folder

    if args.image:
        cases = args.cases or args.ground_truth.parent
        run_and_score(args.image, cases, args.ground_truth, args.answers, args.json, args.device, args.domains)
    else:
        score_folder(args.ground_truth, args.answers, args.json, args.domains)


def _experiment(args: argparse.Namespace) -> None:
    from training.experiment import run_grid

    run_grid(args.config, args.data_root, args.output, args.report_dir, args.shard, args.report_only)


def _cold_start(args: argparse.Namespace) -> None:
    from training.bench import cold_start, report

    report(cold_start(args.model_dir, args.input, args.device, args.repeats), args.json)


def _bench(args: argparse.Namespace) -> None:
    from training.bench import bench_stack, report

    report(bench_stack(args.device, args.backbone, args.repeats, args.input, peak_tflops=args.peak_tflops), args.json)


def _bench_train(args: argparse.Namespace) -> None:
    from training.bench import report
    from training.bench_train import bench_train

    result = bench_train(args.device, args.backbone, args.batch_size, args.steps, args.peak_tflops)
    report(result, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic dataset in the MIDOG25 layout")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--n", type=int, default=600, help="number of figures")
    p.add_argument("--slides", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)

    p = sub.add_parser("case", help="write a synthetic Grand Challenge input folder (inputs.json + stack)")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--pages", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--name", default="stack")
    p.add_argument("--format", choices=("tiff", "tif", "mha"), default="tiff")
    p.set_defaults(func=_case)

    p = sub.add_parser("describe", help="per scanner: figures, atypical share, mean colour, sharpness, "
                       "detail and mid band, JPEG block grid")  # fmt: skip
    p.add_argument("--data-root", type=Path, nargs="+", required=True)
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--pixel-size-um", type=float, help="describe the figures resampled to this pixel size, as a "
                   "config's pixel_size_um trains on them (default: as scanned)")  # fmt: skip
    p.set_defaults(func=_describe)

    p = sub.add_parser("train", help="train the folds of a config on dataset folders")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--data-root", type=Path, nargs="+", required=True,
                   help="one or more dataset folders (MIDOG25, AMi-Br or OMG-Octo layout), merged")  # fmt: skip
    p.add_argument("--output", type=Path, required=True, help="run folder")
    p.add_argument("--cache-dir", type=Path, help="keep the decoded patches here between runs")
    p.add_argument("--fold", type=int, help="train only this fold (folds as independent jobs)")
    p.add_argument("--epochs", type=int, help="train this many epochs instead of the config's length (epochs or steps)")
    p.add_argument("--seed", type=int, help="override the config's seed (run-to-run spread)")
    p.add_argument("--hold-out-scanner", action="append", metavar="SCANNER",
                   help="leave its figures out of every fold (repeat for more; replaces the config's "
                        "hold_out_scanners): test on it later")  # fmt: skip
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="merge each fold's adapter and export one ONNX ensemble + manifest")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--output", type=Path, required=True, help="model folder")
    p.add_argument("--fold", type=int, action="append", help="export only this fold (repeat for more); default all")
    p.set_defaults(func=_export)

    p = sub.add_parser("predict", help="run an exported model on a MIDOG25-layout folder, as the container does")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True, help="CSV: image_id, label, prob_atypical, pred, domain")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"),
                   help="another graph of the model folder than the one served on the device")  # fmt: skip
    p.add_argument("--scanner", action="append", metavar="SCANNER",
                   help="score only this scanner's figures (repeat for more)")  # fmt: skip
    p.set_defaults(func=_predict)

    p = sub.add_parser("probe", help="an exported model's scores with the figures rendered otherwise (JPEG, noise, "
                       "tone, stain, focus, pixel size): what an unseen scanner's shift could be")  # fmt: skip
    p.add_argument("model_dir", type=Path)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--scanner", action="append", metavar="SCANNER", help="probe only this scanner's figures")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="cpu")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=_probe)

    p = sub.add_parser("evaluate", help="the challenge's figures for a predictions CSV, pooled and per domain")
    p.add_argument("--predictions", type=Path, required=True, help="image_id, label, prob_atypical, pred, domain")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--threshold", type=float, help="classes from prob_atypical >= this instead of a pred column")
    p.add_argument("--column", default="prob_atypical",
                   help="the probability column to score (prob_atypical_no_tta: a tta run without it)")  # fmt: skip
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("stacks", help="Grand Challenge cases (stacks of figures) + their ground truth in the "
                       "official evaluation's format, from dataset folders")  # fmt: skip
    p.add_argument("--data-root", type=Path, nargs="+", required=True)
    p.add_argument("--output", type=Path, required=True, help="new folder: stack_<k>/, ground_truth.json, "
                   "domains.json, figures.csv")  # fmt: skip
    p.add_argument("--stack-size", type=int, default=16, help="pages per stack (1..16; a group's last is shorter)")
    p.add_argument("--stacks", type=int, help="write only the first N stacks (default: every figure)")
    p.add_argument("--seed", type=int, default=0, help="shuffles the figures")
    p.add_argument("--domain", choices=("tumor", "scanner"), default="tumor",
                   help="what the ground truth's tumordomains number (local ids, in domains.json)")  # fmt: skip
    p.set_defaults(func=_stacks)

    p = sub.add_parser("score", help="the official Track 2 evaluation's figures for answers to cases "
                       "(optionally running a container image over the cases first)")  # fmt: skip
    p.add_argument("--ground-truth", type=Path, required=True, help="ground_truth.json in the official format")
    p.add_argument("--answers", type=Path, required=True, help="<stack>/<answer>.json per stack, or Grand "
                   "Challenge's predictions.json + <job pk>/output/ (with --image: written here)")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--domains", type=Path, help="domain id -> name JSON (default: domains.json beside the ground "
                   "truth, else the official tumor domains)")  # fmt: skip
    p.add_argument("--image", help="run this container image over --cases first, one docker run per case")
    p.add_argument("--cases", type=Path, help="the case folders (default: the ground truth's folder)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda",
                   help="cpu: run the image with MIDOG_DEVICE=cpu, for a host without a GPU")  # fmt: skip
    p.set_defaults(func=_score)

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

    p = sub.add_parser("bench", help="one stack: ours (merged, one ONNX graph, batched) against the peer approach")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backbone", choices=("tiny-virchow", "vit-base", "virchow-size"), default="tiny-virchow",
                   help="Virchow's blocks, random weights: a few small ones, ViT-B size, Virchow's 632M")  # fmt: skip
    p.add_argument("--input", type=Path, default=Path("test/input"), help="case folder (default: test/input)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, help="the device's peak, where the built-in GPU table lacks it")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=_bench)

    p = sub.add_parser("bench-train", help="LoRA training steps: bf16 + fused attention + checkpointing vs naive")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backbone", choices=("tiny-virchow", "vit-base", "virchow-size"), default="tiny-virchow")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per recipe, after one warm-up step each")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU where not built in")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=_bench_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for chatty in ("onnx_ir", "onnxscript"):  # a line per deduplicated initializer or rewritten slice otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        args.func(args)
    except (OSError, ValueError, RuntimeError) as err:
        if args.verbose:
            raise
        print(f"python -m training {args.command}: {err}", file=sys.stderr)
        return 1
    return 0
