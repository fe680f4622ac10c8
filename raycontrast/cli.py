"""`raycontrast train|tune|analyze|check-data`: the command-line entry point.

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
from raycontrast.config import Config, ConfigError, apply_overrides, load_config, parse_overrides

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
    return _absolute_paths(cfg)


def _absolute_paths(cfg: Config) -> Config:
    """Make local storage, data and weights paths absolute: Ray workers do not share the driver's cwd."""
    fixes = {}
    if "://" not in cfg.run.storage_path:
        fixes["run.storage_path"] = str(Path(cfg.run.storage_path).expanduser().resolve())
    if "://" not in cfg.data.root:
        fixes["data.root"] = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.model.pretrained:
        fixes["model.pretrained"] = str(Path(cfg.model.pretrained).expanduser().resolve())
    return apply_overrides(cfg, fixes) if fixes else cfg


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
    return parser


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


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "analyze":
        from raycontrast.checkpoint import storage_location

        path, fs = storage_location(args.path, s3_endpoint=args.s3_endpoint, s3_scheme=args.s3_scheme)
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

        fit(cfg, resume=args.resume, address=args.address)
        return 0
    from raycontrast.tune import run_search

    outcome = run_search(cfg, resume=args.resume, address=args.address)
    if not args.no_analyze and outcome.num_finished > 0:
        from raycontrast.train import resolve_storage

        root, fs = resolve_storage(cfg)
        _run_analyze(f"{root}/{cfg.run.name}", None, 5, fs)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors print one clear message and exit 2, never a traceback."""
    try:
        code = run(argv)
    except (ConfigError, UserError, FileNotFoundError) as exc:
        print(f"raycontrast: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("raycontrast: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
