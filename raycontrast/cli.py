"""`raycontrast train|tune|analyze|check-data|eval|predict|export`: the command-line entry point.

Configs are loaded and validated here, and `raycontrast.preflight` checks the data, weights, storage and
local resources they point at, before anything imports Ray: a wrong key, value or file fails in seconds with
a message that names it. Ray-facing modules are imported lazily per subcommand.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from raycontrast import preflight
from raycontrast.config import Config, ConfigError, load_config, parse_overrides
from raycontrast.experiment import ACCEPTABLE, SearchStateError
from raycontrast.storage import absolute_paths, locate

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


class UserError(Exception):
    """An error caused by input the user can fix; printed without a traceback."""


def _resolve_config(path: str | None, sets: Sequence[str]) -> Config:
    if path is None:
        if not DEFAULT_CONFIG.is_file():
            raise UserError(
                "no --config given and the default configs/demo.yaml is not here; pass --config FILE"
            )
        path = str(DEFAULT_CONFIG)
    cfg = load_config(path, parse_overrides(sets))
    preflight.check_job_storage(cfg.run.storage_path)  # before paths are made absolute
    return absolute_paths(cfg)


def _add_config_args(p: argparse.ArgumentParser, run_args: bool = True) -> None:
    p.add_argument("--config", "-c", help="YAML config (default: configs/demo.yaml)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, repeatable: --set loss.temperature=0.2 --set train.workers=2",
    )
    if not run_args:
        return
    p.add_argument("--resume", action="store_true", help="continue the run/search named run.name")
    p.add_argument(
        "--accept",
        action="append",
        default=[],
        metavar="KEY",
        help=f"with --resume: a config key that may differ from the start ({', '.join(ACCEPTABLE)}), "
        "repeatable; raising tune.num_samples or tune.confirm.* extends even a finished search",
    )
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raycontrast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_config_args(sub.add_parser("train", help="train one model (Ray Train; train.workers=0: in-process)"))
    tune = sub.add_parser("tune", help="search hyperparameters (Ray Tune + Optuna + ASHA), then analyze")
    _add_config_args(tune)
    tune.add_argument("--no-analyze", action="store_true", help="skip the report and plots at the end")
    an = sub.add_parser("analyze", help="best config, importance, plots and a report from the result tables")
    an.add_argument("path", help="experiment dir (<storage_path>/<run.name>) or its tables/ dir; s3:// works")
    an.add_argument("--out", help="output dir (default: <experiment>/analysis)")
    an.add_argument("--top-k", type=int, default=5)
    an.add_argument("--s3-endpoint", help="host:port of an S3-compatible store")
    an.add_argument("--s3-scheme", default="https", choices=["http", "https"])
    check = sub.add_parser("check-data", help="decode every image and label of the configured data (no Ray)")
    _add_config_args(check, run_args=False)
    _add_model_commands(sub)
    return parser


_SOURCE_HELP = (
    "a checkpoint folder, a Train run folder (its best checkpoint), an experiment folder (its best trial's "
    "best checkpoint) or an exported .safetensors file; s3:// works"
)


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help=_SOURCE_HELP)
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)"
    )
    p.add_argument("--s3-endpoint", help="host:port of an S3-compatible store")
    p.add_argument("--s3-scheme", default="https", choices=["http", "https"])


def _add_tta_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mode", choices=["whole", "slide"], help="whole image or sliding window (default: as trained)"
    )
    p.add_argument(
        "--scales", type=float, nargs="+", default=[1.0], metavar="S",
        help="test-time scales, logits averaged at full resolution (the paper: 0.5 0.75 1.0 1.25 1.5 1.75)",
    )  # fmt: skip
    p.add_argument("--flip", action="store_true", help="also average the horizontally flipped image's logits")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override the model's saved config, e.g. --set data.root=/data/cityscapes")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_model_commands(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    ev = sub.add_parser("eval", help="evaluate a trained model on a split (multi-scale + flip if asked)")
    _add_source_args(ev)
    _add_tta_args(ev)
    ev.add_argument("--split", default="val", help="dataset split (default: val)")
    ev.add_argument("--out", help="per-class IoU Parquet file (default: next to the checkpoint)")
    ev.add_argument(
        "--workers", type=int, default=0,
        help="evaluate N shards in parallel as Ray tasks (1 GPU each with --device cuda; 0: in this process)",
    )  # fmt: skip
    ev.add_argument(
        "--address", help="with --workers: Ray cluster address (default: RAY_ADDRESS, else local)"
    )
    pr = sub.add_parser("predict", help="segment images: trainId, colour and overlay PNGs (+ labelIds)")
    _add_source_args(pr)
    pr.add_argument("inputs", nargs="*", help="image files or folders (or use --split)")
    _add_tta_args(pr)
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--split", help="predict this split of the model's own dataset instead of INPUTS")
    pr.add_argument("--limit", type=int, help="with --split: only its first N images")
    ex = sub.add_parser("export", help="inference weights + config as one .safetensors file")
    _add_source_args(ex)
    ex.add_argument("--out", required=True, help="the .safetensors file to write")


def _run_analyze(path: str, out: str | None, top_k: int, filesystem=None) -> None:  # noqa: ANN001
    from raycontrast.analyze import analyze

    report = analyze(path, out_dir=out, top_k=top_k, filesystem=filesystem)
    lines = [f"\nanalysis of {report.num_trials} trial(s) in {report.experiment}"]
    if report.best_trial_id is not None:
        lines.append(f"  best trial {report.best_trial_id}: val mIoU {report.best_val_miou:.4f}")
    if report.importance:
        shares = ", ".join(f"{k} {v:.2f}" for k, v in report.importance.items())
        lines.append(f"  importance: {shares}")
    else:
        lines.append(f"  importance: {report.importance_note}")
    lines += [f"  {name:<12} {where}" for name, where in report.paths.items()]
    print("\n".join(lines), flush=True)


def _s3(args: argparse.Namespace) -> dict[str, str | None]:
    return {"s3_endpoint": args.s3_endpoint, "s3_scheme": args.s3_scheme}


def _load_model(args: argparse.Namespace):  # noqa: ANN202 - a TrainedModel
    import torch

    from raycontrast.config import apply_overrides
    from raycontrast.inference import load_model

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    fs, path = locate(args.source, **_s3(args))
    try:
        model = load_model(fs, path, device=device)
    except ValueError as e:  # a damaged checkpoint or a file of another kind: named in the message
        raise UserError(str(e)) from None
    sets = parse_overrides(getattr(args, "sets", []))
    if sets:
        model.config = absolute_paths(apply_overrides(model.config, sets))
    saved = f"val mIoU {model.val_miou:.4f}" if model.val_miou is not None else "saved between evaluations"
    where = f" (iteration {model.iteration}, {saved})" if model.iteration is not None else ""
    print(f"model: {model.source}{where}", flush=True)
    return fs, model


def _run_model_command(args: argparse.Namespace) -> int:
    fs, model = _load_model(args)
    if args.command == "export":
        from raycontrast.inference import export_model

        if not args.out.endswith(".safetensors"):
            raise UserError(f"export --out {args.out}: the file must end in .safetensors")
        out_fs, out = locate(args.out, **_s3(args))
        size = export_model(model, out_fs, out)
        print(f"exported {size / 2**20:.1f} MiB of inference weights to {out}", flush=True)
        return 0
    tta = {"mode": args.mode, "scales": args.scales, "flip": args.flip}
    if args.command == "eval":
        from raycontrast.evaluation import evaluate_model, write_eval

        if args.workers > 0:
            from raycontrast.remote_eval import evaluate_on_ray

            print(f"evaluating {args.split} in {args.workers} shards on Ray", flush=True)
            result = evaluate_on_ray(
                fs, model.source, args.workers, sets=parse_overrides(args.sets), address=args.address,
                use_gpu=next(model.net.parameters()).device.type == "cuda", split=args.split, **tta,
            )  # fmt: skip
        else:
            result = evaluate_model(model, split=args.split, progress=not args.no_progress, **tta)
        out_fs, out = (fs, None) if args.out is None else locate(args.out, **_s3(args))
        written = write_eval(result, out_fs, out)
        print(result.describe() + f"\nper-class IoU table: {written}", flush=True)
        return 0
    from raycontrast.predict import predict

    if not args.inputs and args.split is None:
        raise UserError("predict: give image files or folders, or --split SPLIT")
    summary = predict(
        model, args.inputs, args.out, split=args.split, limit=args.limit, progress=not args.no_progress, **tta
    )
    print(f"predicted {len(summary.written)} image(s) into {summary.out_dir}", flush=True)
    for _, why in summary.failed:
        print(f"  failed: {why}", file=sys.stderr)
    if summary.failed:
        print(f"raycontrast: {len(summary.failed)} image(s) could not be read (above)", file=sys.stderr)
    return 1 if summary.failed else 0


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("eval", "predict", "export"):
        return _run_model_command(args)
    if args.command == "analyze":
        fs, path = locate(args.path, s3_endpoint=args.s3_endpoint, s3_scheme=args.s3_scheme)
        _run_analyze(path, args.out, args.top_k, fs)
        return 0
    cfg = _resolve_config(args.config, args.sets)
    if args.command == "check-data":
        counts = preflight.check_data(cfg.data.dataset, cfg.data.root, full=True, progress=print)
        found = ", ".join(f"{n} {split}" for split, n in counts.items()) or "generated on demand"
        print(f"data ok: {cfg.data.dataset} at {cfg.data.root} ({found})")
        return 0
    # Everything knowable up front fails here, before Ray is imported (exit 2, no partial results).
    preflight.check(cfg, args.command, resume=args.resume, address=args.address)
    if args.command == "train":
        from raycontrast.train import fit

        fit(cfg, resume=args.resume, address=args.address, accept=args.accept)
        return 0
    from raycontrast.tune import run_search

    outcome = run_search(cfg, resume=args.resume, address=args.address, accept=args.accept)
    if not args.no_analyze and outcome.num_finished > 0:
        _run_analyze(outcome.experiment_path, None, 5, outcome.filesystem)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors print one clear message and exit 2, never a traceback."""
    try:
        code = run(argv)
    except (ConfigError, UserError, FileNotFoundError, SearchStateError) as exc:
        print(f"raycontrast: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("raycontrast: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
