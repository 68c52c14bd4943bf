"""``python -m training <command>``: synth | case | describe | train | export | upload | predict | probe | evaluate |
experiment | cold-start | bench | bench-train | gpu-check | stacks | score."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from training.lab.commands import add_lab_commands

log = logging.getLogger("training")


def _synth(args: argparse.Namespace) -> None:
    from training.synthetic import write_atnorm, write_midog25

    if args.layout == "atnorm":
        write_atnorm(args.output, n=args.n, seed=args.seed)
    else:
        write_midog25(args.output, n=args.n, seed=args.seed, n_slides=args.slides)


def _case(args: argparse.Namespace) -> None:
    from training.synthetic import synthetic_figures, write_case

    pages, _ = synthetic_figures(args.pages, seed=args.seed, n_slides=2)
    path = write_case(args.output, pages, name=args.name, fmt=args.format)
    log.info("wrote a %d-page case to %s", args.pages, path)


def _train(args: argparse.Namespace) -> None:
    from training.config import load_config
    from training.train import train_run

    overrides = {key: value for key, value in (("epochs", args.epochs), ("seed", args.seed)) if value is not None}
    if args.hold_out_scanner:
        overrides["hold_out_scanners"] = args.hold_out_scanner
    cfg = load_config(args.config, overrides)
    folds = [args.fold] if args.fold is not None else None
    summary = train_run(cfg, args.data_root, args.output, folds=folds, cache_dir=args.cache_dir)
    if args.external and summary is not None:  # the run is finished: its threshold is fixed
        from training.external import score_run_externally

        score_run_externally(args.output, args.external)
    elif args.external:
        log.info("external sets are scored once every fold has finished (rerun the command then)")


def _export(args: argparse.Namespace) -> None:
    from training.export import export_run

    export_run(args.run_dirs, args.output, args.fold, parity_patches=args.parity_patches)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _upload(args: argparse.Namespace) -> None:
    from training.upload import write_upload

    write_upload(args.model_dir, args.output)


def _predict(args: argparse.Namespace) -> None:
    from training.evaluate import table
    from training.predict import predict_folder

    result = predict_folder(
        args.model_dir, args.data_root, args.output, device=args.device, precision=args.precision, scanners=args.scanner
    )
    print(table(result))  # the figures at the model's threshold, as evaluate prints them for this CSV


def _evaluate(args: argparse.Namespace) -> None:
    from training.evaluate import evaluate_file

    if args.report and len(args.predictions) > 1:
        raise ValueError("--report shows one predictions file")
    evaluate_file(args.predictions, args.json, args.threshold, args.column)
    if args.report:
        from training.pages import write_report

        write_report(args.predictions[0], args.report, args.threshold, args.column, args.data_root)


def _review(args: argparse.Namespace) -> None:
    from training.pages import write_review

    write_review(args.input_dir, args.model, args.output, args.device)


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    """The dataset and a case: synth, case."""
    p = sub.add_parser("synth", help="write a synthetic dataset in the MIDOG25 (or AtNorM) layout")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument(
        "--layout", choices=("midog25", "atnorm"), default="midog25", help="atnorm: an unseen lab's folder, to score"
    )
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


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the folds of a config on dataset folders")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument(
        "--data-root",
        type=Path,
        nargs="+",
        required=True,
        help="one or more dataset folders (MIDOG25, AMi-Br or OMG-Octo layout), merged",
    )
    p.add_argument("--output", type=Path, required=True, help="run folder")
    p.add_argument("--cache-dir", type=Path, help="keep the decoded patches here between runs")
    p.add_argument(
        "--external",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="dataset folders of labs never trained on (e.g. AtNorM-Br): once the run has finished, its ensemble is "
        "exported and scored on each, as served; figures in summary.json, predictions in RUN/external/",
    )
    p.add_argument("--fold", type=int, help="train only this fold (folds as independent jobs)")
    p.add_argument("--epochs", type=int, help="train this many epochs instead of the config's length (epochs or steps)")
    p.add_argument("--seed", type=int, help="override the config's seed (run-to-run spread)")
    p.add_argument(
        "--hold-out-scanner",
        action="append",
        metavar="SCANNER",
        help="leave its figures out of every fold (repeat for more; replaces the config's "
        "hold_out_scanners): test on it later",
    )
    p.set_defaults(func=_train)


def _add_export_and_upload(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="merge each fold's adapter and export one ONNX ensemble + manifest")
    p.add_argument(
        "run_dirs",
        type=Path,
        nargs="+",
        metavar="RUN_DIR",
        help="a run, or several trained on the same folds: one graph",
    )
    p.add_argument("--output", type=Path, required=True, help="model folder")
    p.add_argument(
        "--fold", type=int, action="append", help="of one run, export only this fold (repeat for more); default all"
    )
    p.add_argument(
        "--parity-patches",
        type=_positive_int,
        help="real patches the reduced precisions are checked on (default 128; the manifest records it)",
    )
    p.set_defaults(func=_export)

    p = sub.add_parser("upload", help="the folder a GPU platform is handed: the CUDA graph of an export + manifest")
    p.add_argument("model_dir", type=Path, help="an exported model folder")
    p.add_argument("--output", type=Path, required=True, help="upload folder (test.sh and export.sh use upload/)")
    p.set_defaults(func=_upload)


def _add_scoring(sub: argparse._SubParsersAction) -> None:
    """predict, evaluate, review: a model's answers, their metrics, one case's pages."""
    p = sub.add_parser("predict", help="run an exported model on a MIDOG25-layout folder, as the container does")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True, help="CSV: image_id, label, prob_atypical, pred, domain")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        help="another graph of the model folder than the one served on the device",
    )
    p.add_argument(
        "--scanner", action="append", metavar="SCANNER", help="score only this scanner's figures (repeat for more)"
    )
    p.set_defaults(func=_predict)

    p = sub.add_parser("evaluate", help="the challenge's metrics for a predictions CSV, pooled and per domain")
    p.add_argument(
        "--predictions",
        type=Path,
        nargs="+",
        required=True,
        help="image_id, label, prob_atypical, pred, domain; several: their mean per figure (needs --threshold)",
    )
    p.add_argument("--json", type=Path, help="also write the metrics here")
    p.add_argument("--threshold", type=float, help="classes from prob_atypical >= this instead of a pred column")
    p.add_argument(
        "--column",
        default="prob_atypical",
        help="the probability column to score (prob_atypical_no_tta: a tta run without it)",
    )
    p.add_argument("--report", type=Path, metavar="DIR", help="also write DIR/report.html: plots and the crops")
    p.add_argument(
        "--data-root",
        type=Path,
        nargs="+",
        default=[],
        help="where the report finds crops by image_id when the CSV has no path column (a run's oof.csv)",
    )
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("review", help="one case's pages as the model saw them, with its answers: DIR/review.html")
    p.add_argument("input_dir", type=Path, help="a case folder, as Grand Challenge mounts at /input")
    p.add_argument("--model", type=Path, required=True, help="an exported model folder")
    p.add_argument("--output", type=Path, required=True, help="folder for review.html, review.png, answer.json")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="cpu")
    p.set_defaults(func=_review)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_commands(sub)
    for add in (_add_train, _add_export_and_upload, _add_scoring):  # the way from data to a scored model
        add(sub)
    add_lab_commands(sub)
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
