"""`slimvit <stage>`: one subcommand per stage, each a thin call into the stage's module."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from slimvit.errors import SlimvitError

log = logging.getLogger("slimvit")

STAGE_HELP = {
    "data": "check the dataset: classes, counts, image sizes, the split",
    "teacher": "train the teacher",
    "distill": "train the student from the teacher (and the no-distillation ablation)",
    "prune": "structured pruning + fine-tuning (--sweep for several ratios)",
    "export": "export the pruned model to ONNX with a parity check",
    "quantize": "INT8 dynamic / static and FP16 variants of the pruned ONNX model",
    "bench": "size, params, MACs, accuracy and latency of every artifact",
    "report": "write REPORT.md with tables and plots",
    "run": "every stage in order; finished stages are skipped",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="built-in preset: neu-det (default), smoke, reference")
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML file merged over the preset")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set train.epochs=10",
    )
    p.add_argument("--data", default=None, help="dataset folder (default: $SLIMVIT_DATA or data/NEU-DET)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<preset>)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimvit", description="Compress a ViT for CPU/edge inference.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_ in STAGE_HELP.items():
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p)
        if name in ("teacher", "distill", "prune"):
            p.add_argument("--resume", action="store_true", help="continue an interrupted training run")
        if name == "prune":
            p.add_argument(
                "--sweep", default=None, metavar="R1,R2,...", help="prune + fine-tune at several ratios"
            )
        if name in ("teacher", "distill", "prune", "export", "quantize", "bench", "report", "data"):
            p.add_argument(
                "--force", action="store_true", help="redo the stage (and accept a changed config)"
            )
        if name == "run":
            p.add_argument(
                "--force", default=None, metavar="STAGE", help="redo STAGE and every stage after it"
            )
    p = sub.add_parser("predict", help="classify images with a deployed ONNX model (no torch needed)")
    p.add_argument("model", help="ONNX model written by slimvit (e.g. runs/neu-det/deploy/model.onnx)")
    p.add_argument("paths", nargs="+", help="image files and/or folders")
    p.add_argument("--json", default=None, metavar="FILE", help="also write predictions as JSON")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write predictions as CSV")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("PIL", "matplotlib", "urllib3", "httpx", "huggingface_hub", "torch_pruning", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load_cli_config(args: argparse.Namespace):
    from slimvit.config import load_config

    preset = args.preset or ("neu-det" if not args.config else None)
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    cfg = load_config(preset, args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / (args.preset or cfg.preset or "custom")
    return cfg, out


def _print_data(info: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{info['root']}[/bold]  layout: {info['layout']}  images: {info['images']}  "
        f"classes: {len(info['classes'])}  boxes: {info['boxes']}"
    )
    sizes = ", ".join(f"{k} ({v})" for k, v in info["image_sizes"].items())
    console.print(
        f"image sizes (sampled): {sizes}; groups of byte-identical files: {info['duplicate_groups']}"
    )
    t = Table("class", "images", "train", "val", "test")
    for c in info["classes"]:
        t.add_row(
            c, str(info["counts"][c]), *(str(info["split_per_class"][s][c]) for s in ("train", "val", "test"))
        )
    sp = info["split"]
    t.add_row("[bold]total", str(info["images"]), str(sp["train"]), str(sp["val"]), str(sp["test"]))
    console.print(t)
    console.print(
        f"split: {sp['train']}/{sp['val']}/{sp['test']} (train/val/test), saved in {run_dir / 'split.json'}"
    )


def cmd_data(args: argparse.Namespace) -> int:
    from slimvit.data import describe, load_data
    from slimvit.runs import prepare_run_dir

    cfg, out = load_cli_config(args)
    run_dir = prepare_run_dir(cfg, out, force=args.force)
    data = load_data(cfg.data, run_dir)
    _print_data(describe(data), run_dir)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from slimvit import pipeline
    from slimvit.runs import prepare_run_dir

    cfg, out = load_cli_config(args)
    run_dir = prepare_run_dir(cfg, out, force=bool(getattr(args, "force", False)))
    if args.command == "run":
        return pipeline.run_pipeline(cfg, run_dir, force=args.force)
    return pipeline.run_single(args.command, cfg, run_dir, args)


def cmd_predict(args: argparse.Namespace) -> int:
    from slimvit.predict import main as predict_main

    return predict_main(args.model, args.paths, json_path=args.json, csv_path=args.csv, threads=args.threads)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    handler = {"data": cmd_data, "predict": cmd_predict}.get(args.command, cmd_stage)
    try:
        return handler(args)
    except SlimvitError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if args.debug or e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(
            f"error: no space left on the device ({e.filename or 'writing an artifact'}); nothing half-written "
            "was kept under a final name: free some space and run the same command to resume",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            "interrupted: finished work and the last checkpoint are kept; run the same command to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        _end_distributed()


def _end_distributed() -> None:
    """Close the process group a distributed launch opened: a live gloo group left to the interpreter's
    exit sometimes aborts it ("terminate called without an active exception", exit -6)."""
    dist = sys.modules.get("torch.distributed")  # never imports torch (`predict` runs without it)
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # never mask the command's own outcome
            logging.getLogger(__name__).warning("could not close the distributed process group: %s", e)


if __name__ == "__main__":
    sys.exit(main())
