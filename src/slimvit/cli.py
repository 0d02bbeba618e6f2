"""`slimvit <stage>`: one subcommand per stage, each a thin call into the stage's module."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from slimvit import layout
from slimvit.errors import SlimvitError

log = logging.getLogger("slimvit")

RUN_HELP = "every stage in order; up-to-date stages are skipped, stale ones redone"
FLAG_HELP = {
    "resume": "continue an interrupted training run",
    "force": "redo the stage (and accept a changed config)",
}


PREDICT_EPILOG = """\
output:
  stdout      on a terminal a table; piped, one tab-separated line per image:
              path, class, confidence (then class, confidence of the next ones with --top-k;
              then `review` or `ok` when the model was deployed with a review threshold)
  stderr      each image that could not be decoded ("error: ..."), then a summary line:
              images classified (and sent to review) and failed, images/s end to end
  --csv FILE  path, class, confidence, [review,] [class_2, confidence_2, ...], p_<class> per class
  --json FILE {"model", "predictions": [{"path", "class", "confidence", "probs"[, "top"][, "review"]}],
              "failed": [{"path", "error"}], "seconds", "images_per_s"}
confidence is calibrated: the softmax of the logits divided by the temperature the deploy step
fitted on validation (stored in the model).

exit codes:
  0  every image was classified
  1  some images could not be decoded (listed); the others were classified and written
  2  bad usage or a bad model (one line on stderr); nothing was classified

examples:
  slimvit predict runs/neu-det/deploy/ photo.png defects/
  find defects/ -name '*.png' | slimvit predict runs/neu-det/deploy/ - --csv out.csv
"""


EXTRA_MODULES = {
    "train": (
        "torch",
        "torchvision",
        "timm",
        "torch_pruning",
        "accelerate",
        "safetensors",
        "onnx",
        "onnxscript",
        "tqdm",
        "matplotlib",
    ),
    "openvino": ("openvino", "nncf"),
}
"""Top-level modules of each pip extra; the core install (onnxruntime, numpy, Pillow, rich) runs `predict`."""


def _extra_message(command: str, module: str) -> str | None:
    """One line naming the extra that provides `module` and the pip command; None if no extra does."""
    root = module.split(".")[0]
    extra = next((e for e, mods in EXTRA_MODULES.items() if root in mods), None)
    if extra is None:
        return None
    return (
        f"`slimvit {command}` needs the '{extra}' extra ({root} is not installed): "
        f"pip install 'slimvit[{extra}]'"
    )


def require_extra(command: str, extra: str = "train") -> None:
    """Refuse a command before it starts when a module of its extra is missing (see EXTRA_MODULES)."""
    import importlib.util

    for module in EXTRA_MODULES[extra]:
        if importlib.util.find_spec(module) is None:
            raise SlimvitError(_extra_message(command, module))


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return n


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
    _stage_commands(sub)
    _deploy_command(sub)
    _verify_command(sub)
    _config_command(sub)
    _subset_command(sub)
    _predict_command(sub)
    return parser


def _stage_commands(sub) -> None:
    """One subcommand per declared stage (the ablation and the sweep run under `distill` / `prune --sweep`),
    and `run`."""
    from slimvit.stages import STAGES

    for stage in STAGES:
        if stage.command or stage.flags is None:
            continue
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help)
        _common(p)
        for flag in stage.flags:
            if flag == "sweep":
                p.add_argument(
                    "--sweep", default=None, metavar="R1,R2,...", help="prune + fine-tune at several ratios"
                )
            else:
                p.add_argument(f"--{flag}", action="store_true", help=FLAG_HELP[flag])
    p = sub.add_parser("run", help=RUN_HELP, description=RUN_HELP)
    _common(p)
    p.add_argument(
        "--force",
        default=None,
        metavar="STAGE",
        help="redo STAGE and every stage built from its outputs ("
        + ", ".join(s.name for s in STAGES if s.name != "ablation")
        + "; ablation when distill.ablation=true)",
    )
    _budget_flags(sub.choices["run"])
    for name in ("run", "bench"):
        sub.choices[name].add_argument(
            "--unlabeled",
            default=None,
            metavar="DIR",
            help="images without labels (production images): every candidate's agreement with the student "
            "is also measured on them, so the deploy choice sees more than the validation split",
        )


def _deploy_command(sub) -> None:
    p = sub.add_parser(
        "deploy",
        help="re-choose the deployed model from bench.json for new budgets (seconds, no re-timing)",
        description="Choose the most accurate model on validation that fits the budgets, from an existing "
        "bench.json, and rewrite deploy/. Exit 0 when a model was deployed, 2 when none fits (the line "
        "names the budget and the closest candidate) or the run folder lacks a bench.",
    )
    _common(p)
    _budget_flags(p)


def _verify_command(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="re-measure a deployed model's accuracy and latency on this machine (no torch needed)",
        description="Re-measure the accuracy and batch-1 latency of DEPLOY_DIR on this machine and compare "
        "them with the figures recorded when it was built: on the run's own test images (a paired test) "
        "when they are here, else on LABELLED_IMAGES (<class>/<image>). Exit 0 when the accuracy agrees "
        "within the noise of that many images, 1 when it differs, 2 on bad input.",
    )
    p.add_argument("deploy_dir", help="a deploy folder written by slimvit (e.g. runs/neu-det/deploy)")
    p.add_argument(
        "images",
        nargs="?",
        default=None,
        metavar="LABELLED_IMAGES",
        help="a labelled image folder: <class>/<image>",
    )
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: as benchmarked)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _config_command(sub) -> None:
    p = sub.add_parser(
        "config",
        help="list every config key: type, default, the preset's value and what it does",
        description="List every config key (`--set SECTION.KEY=VALUE`, or a YAML file for --config) with "
        "its type, its default, the preset's value and its description. KEY: one key or a section.",
    )
    p.add_argument("key", nargs="?", default=None, metavar="KEY", help="e.g. train.epochs or prune")
    p.add_argument("--preset", default=None, help="the preset whose values are shown (default neu-det)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _subset_command(sub) -> None:
    p = sub.add_parser(
        "subset",
        help="copy a seeded subset of a dataset with chosen images per class (e.g. an imbalanced NEU-DET)",
        description="Copy COUNTS[i] images of the i-th class (classes in sorted order) of SRC, drawn with "
        "SEED, into OUT as <class>/<image> folders, with SUBSET.json naming every file. OUT must not exist.",
    )
    p.add_argument("src", help="dataset folder in any layout slimvit reads")
    p.add_argument("out", help="new folder to write")
    p.add_argument(
        "--counts", required=True, metavar="N1,N2,...", help="images per class, e.g. 300,200,120,80,50,30"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _predict_command(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="classify images with a deployed ONNX model (no torch needed)",
        description="Classify images with a deployed ONNX model: onnxruntime, numpy and Pillow only.",
        epilog=PREDICT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", help="ONNX model written by slimvit, or its deploy folder (e.g. runs/neu-det/deploy/)"
    )
    p.add_argument("paths", nargs="+", help="image files and/or folders; - reads file paths from stdin")
    p.add_argument("--json", default=None, metavar="FILE", help="also write predictions as JSON")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write predictions as CSV")
    p.add_argument(
        "--threads", type=_positive, default=2, metavar="N", help="ONNX Runtime and decoding threads"
    )
    p.add_argument("--batch", type=_positive, default=32, metavar="N", help="images per inference call")
    p.add_argument("--top-k", type=_positive, default=1, metavar="K", help="also show the next K-1 classes")
    p.add_argument(
        "--explain",
        default=None,
        metavar="DIR",
        help="also write, for each image, a PNG with the image and an occlusion heatmap of where the model looked",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _budget_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("deployment budgets (config section `deploy`; chosen on validation data)")
    g.add_argument("--budget-ms", type=float, default=None, metavar="MS", help="batch-1 latency budget (p50)")
    g.add_argument("--budget-mb", type=float, default=None, metavar="MB", help="model file size budget")
    g.add_argument(
        "--max-drop",
        type=float,
        default=None,
        metavar="POINTS",
        help="validation accuracy points the deployed model may lose against the student (default 0.5; "
        "never less than one validation image: with 18 validation images that is 5.56 points)",
    )
    g.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        metavar="PCT",
        help="share (%%) of validation views and unlabeled images on which the deployed model must name the "
        "student's class (default 95)",
    )
    g.add_argument(
        "--min-speedup",
        type=float,
        default=None,
        metavar="X",
        help="when validation cannot tell the candidates apart, the least compressed one at least this many "
        "times faster than the student's ONNX FP32 file is deployed (default 2)",
    )

    g = p.add_argument_group("review (config section `deploy`; the threshold is chosen on validation data)")
    g.add_argument(
        "--review-rate",
        type=float,
        default=None,
        metavar="R",
        help="send at most this fraction of images to a person (e.g. 0.05): `slimvit predict` flags them `review`",
    )
    g.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        metavar="PCT",
        help="instead: the accuracy wanted on the images not sent to review (e.g. 99.5)",
    )


def _budget_overrides(args: argparse.Namespace) -> list[str]:
    import dataclasses

    from slimvit.config import DeployConfig

    names = [f.name for f in dataclasses.fields(DeployConfig)]  # each key of `deploy` has its flag
    return [f"deploy.{k}={getattr(args, k)}" for k in names if getattr(args, k, None) is not None]


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    noisy = ("PIL", "matplotlib", "urllib3", "httpx", "huggingface_hub", "torch_pruning", "onnxscript")
    # onnx_ir: a line per deduplicated initializer of every export; the quantizer: a line per shape inference
    for name in (*noisy, "onnx_ir", "onnxruntime.quantization"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_library_noise)


EXPECTED_WARNINGS = (
    "Please check if the model is already quantized",
    "Please consider to run pre-processing before quantization",
)
"""Library warnings that slimvit's own steps cause on purpose, which a user cannot act on: int8-mixed
quantizes dynamically a model whose conv stem is already static QDQ; the pre-processing ONNX Runtime
asks for (`quant_pre_process`) is run before static calibration, and it asks again on the dynamic pass."""


def _library_noise(record: logging.LogRecord) -> bool:
    """Keep slimvit's own lines and other libraries' warnings; drop other libraries' INFO lines (ONNX
    Runtime's transformer optimizer and quantizer log to loggers of their own module names or the root
    logger: "Optimized operators: {...}", "Quantization parameters for tensor ... not specified")."""
    if record.name == "slimvit" or record.name.startswith("slimvit.") or record.name == "__main__":
        return True
    if record.levelno < logging.WARNING:
        return False
    return not any(str(record.msg).startswith(w) for w in EXPECTED_WARNINGS)


def load_cli_config(args: argparse.Namespace):
    from slimvit.config import load_config
    from slimvit.runs import dataset_of_run, unlabeled_of_run

    # --data is a path, taken literally (never read as YAML); with no --preset, load_config starts from
    # the config file's `preset:` or the default preset, and the file merges over it
    cfg = load_config(args.preset, args.config, args.overrides, data_path=args.data or None)
    out = Path(args.out) if args.out else Path("runs") / (args.preset or cfg.preset or "custom")
    cfg = dataset_of_run(cfg, out, args.data)
    cfg = unlabeled_of_run(cfg, out, getattr(args, "unlabeled", None), args.overrides)
    if getattr(args, "unlabeled", None):  # checked before anything is written
        import dataclasses

        from slimvit.fidelity import check_unlabeled

        root = Path(args.unlabeled)
        check_unlabeled(root)
        cfg = dataclasses.replace(cfg, bench=dataclasses.replace(cfg.bench, unlabeled=str(root.resolve())))
    return cfg, out


def _print_data(info: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Text, not markup strings: folder and class names such as `[red]styled` are shown as they are
    console = Console()
    console.print(
        Text.assemble(
            (str(info["root"]), "bold"),
            f"  layout: {info['layout']}  images: {info['images']}  "
            f"classes: {len(info['classes'])}  boxes: {info['boxes']}",
        )
    )
    sizes = ", ".join(f"{k} ({v})" for k, v in info["image_sizes"].items())
    console.print(
        f"image sizes (sampled): {sizes}; groups of byte-identical files: {info['duplicate_groups']}"
    )
    t = Table("class", "images", "train", "val", "test")
    for c in info["classes"]:
        t.add_row(
            Text(c),
            str(info["counts"][c]),
            *(str(info["split_per_class"][s][c]) for s in ("train", "val", "test")),
        )
    sp = info["split"]
    t.add_row("[bold]total", str(info["images"]), str(sp["train"]), str(sp["val"]), str(sp["test"]))
    console.print(t)
    console.print(
        Text(
            f"split: {sp['train']}/{sp['val']}/{sp['test']} (train/val/test), saved in {run_dir / layout.SPLIT}"
        )
    )


def cmd_data(args: argparse.Namespace) -> int:
    require_extra("data")
    from slimvit import pipeline
    from slimvit.io import read_json
    from slimvit.runs import deploy_of_run, lock_run_dir, prepare_run_dir

    cfg, out = load_cli_config(args)
    cfg = deploy_of_run(cfg, out, args.overrides)
    with lock_run_dir(out):
        run_dir = prepare_run_dir(cfg, out, force=args.force)
        pipeline.run_single("data", cfg, run_dir, args)  # --force redoes the split
        _print_data(read_json(run_dir / layout.DATA), run_dir)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    require_extra(args.command)
    from slimvit import pipeline
    from slimvit.runs import deploy_of_run, lock_run_dir, prepare_run_dir

    cfg, out = load_cli_config(args)
    if args.command != "run":
        cfg = deploy_of_run(cfg, out, args.overrides)
    with lock_run_dir(out):  # one writer per run folder, for the whole command
        if args.command == "run" and not args.force:  # with --force the bench may be redone
            pipeline.check_budgets(cfg, out)  # on a finished bench: refused before anything changes
        run_dir = prepare_run_dir(cfg, out, force=bool(getattr(args, "force", False)))
        if args.command == "run":
            return pipeline.run_pipeline(cfg, run_dir, force=args.force) or _deploy_outcome(run_dir)
        return pipeline.run_single(args.command, cfg, run_dir, args)


def cmd_deploy(args: argparse.Namespace) -> int:
    """Re-choose the deployed model for the budgets: the deploy stage only, always redone (seconds)."""
    from slimvit import pipeline
    from slimvit.errors import ModelError
    from slimvit.runs import lock_run_dir, prepare_run_dir, with_budgets

    cfg, out = load_cli_config(args)
    if not (out / layout.BENCH).exists():
        raise ModelError(f"no '{out / layout.BENCH}'; run `slimvit bench` (or `slimvit run`) first")
    cfg = with_budgets(cfg, out)
    with lock_run_dir(out):
        pipeline.check_budgets(cfg, out)  # budgets nothing meets: refused before anything changes
        run_dir = prepare_run_dir(cfg, out, force=False)  # budgets (deploy.*) may change freely
        pipeline.run_single("deploy", cfg, run_dir, args, redo_why="re-choosing for this command's budgets")
        if (run_dir / layout.REPORT).exists():  # the report describes what deploy/ now holds
            try:
                require_extra("report")  # the plots need matplotlib; `deploy` itself runs on the core install
            except SlimvitError:
                log.warning(
                    "REPORT.md still describes the model deployed before; run `slimvit report --out %s` where "
                    "slimvit[train] is installed",
                    run_dir,
                )
            else:
                pipeline.run_single("report", cfg, run_dir, args, redo_why="the deployed model was re-chosen")
    return _deploy_outcome(run_dir)


def _deploy_outcome(run_dir: Path) -> int:
    """2 with one line when the deploy stage found nothing that fits the budgets, else 0."""
    from slimvit.io import read_json

    rec = run_dir / layout.DEPLOYED
    if rec.exists():
        d = read_json(rec)
        if not d.get("deployed", True):
            print(f"error: nothing deployed: {d.get('error')}", file=sys.stderr)
            return 2
    return 0


def cmd_subset(args: argparse.Namespace) -> int:
    from slimvit.data import make_subset
    from slimvit.errors import ConfigError

    try:
        counts = [int(c) for c in args.counts.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--counts {args.counts!r} must be comma-separated integers") from None
    rec = make_subset(args.src, args.out, counts, args.seed)
    total = sum(rec["counts"].values())
    print(f"{args.out}: {total} images, " + ", ".join(f"{c} {n}" for c, n in rec["counts"].items()))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """`slimvit config [KEY]`: a table on a terminal; piped, one tab-separated line per key."""
    import json

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from slimvit.config import DEFAULT_PRESET, describe_keys, select_keys

    rows = select_keys(describe_keys(args.preset), args.key)
    preset = args.preset or DEFAULT_PRESET
    console = Console()
    if not console.is_terminal:
        for r in rows:
            cells = [r["key"], r["type"], json.dumps(r["default"]), json.dumps(r["preset"]), r["doc"]]
            sys.stdout.write("\t".join(cells) + "\n")
        return 0
    t = Table("key", "type", "default", preset, "description", show_lines=True)
    for r in rows:
        differs = r["preset"] != r["default"]
        t.add_row(
            Text(r["key"], style="bold"),
            Text(r["type"]),
            Text(json.dumps(r["default"])),
            Text(json.dumps(r["preset"]), style="bold" if differs else ""),
            Text(r["doc"]),
        )
    console.print(t)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from slimvit.io import atomic_write_json
    from slimvit.verify import verify

    result = verify(args.deploy_dir, args.images, threads=args.threads)
    if args.json:
        atomic_write_json(args.json, result)
    print(result["line"])
    return 0 if result["agrees"] else 1


def cmd_predict(args: argparse.Namespace) -> int:
    from slimvit.predict import main as predict_main

    return predict_main(
        args.model,
        args.paths,
        json_path=args.json,
        csv_path=args.csv,
        threads=args.threads,
        batch=args.batch,
        top_k=args.top_k,
        explain=args.explain,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    if hasattr(args, "budget_ms"):
        args.overrides = [*args.overrides, *_budget_overrides(args)]
    handler = {
        "data": cmd_data,
        "predict": cmd_predict,
        "deploy": cmd_deploy,
        "verify": cmd_verify,
        "subset": cmd_subset,
        "config": cmd_config,
    }.get(args.command, cmd_stage)
    try:
        return handler(args)
    except SlimvitError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # a module of an extra that is not installed (the check missed it)
        message = _extra_message(args.command, e.name or "")
        if args.debug or message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
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
