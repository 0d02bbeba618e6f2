"""Test-time augmentation as a lever: finished runs' models scored on the average of their inputs' flips/rotations.

    python scripts/tta.py --group NAME=RUN[,RUN ...] [--group ...] [--out runs/tta]

For each finished run (`slimvit run` through deploy), the student's ONNX FP32 file and the deployed file are run
through ONNX Runtime on every validation and test image and on its flips/rotations: the views the training
augmentation draws from (`fidelity.val_views`, 8 with `train.flips` and `train.rot90`), and the 4 of them the
fine-tunes compare (the image, its two mirror images, its 180-degree rotation). A model "with TTA" names the class
of the mean log-probability over the views; nothing is retrained, so the comparison is paired on the same images.

Validation decides (pooled per group and over all runs, exact McNemar against the plain model); test is
reported. A model file that stands in several runs on the same split (a copied run folder, a student shared by two
recipes) counts once. The cost is measured as it would run: the deployed file at batch 1 against the batch of
4 or 8 views one image would take, timed in interleaved rounds on this CPU (2 threads).

Writes OUT/TTA.md and OUT/tta.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from finetune_levers import all_groups, parse_groups  # noqa: E402

from slimvit import runtime  # noqa: E402
from slimvit.config import read_config  # noqa: E402
from slimvit.data import load_data  # noqa: E402
from slimvit.fidelity import spread, val_views  # noqa: E402
from slimvit.io import atomic_write_json, atomic_write_text  # noqa: E402
from slimvit.preprocess import normalize  # noqa: E402
from slimvit.report.stats import accuracy_text, paired_text  # noqa: E402

MODELS = {"student": "onnx/student_fp32.onnx", "deployed": "deploy/model.onnx"}
VIEWS = (4, 8)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _key(run: Path) -> str:
    """A run's entry in tta.json: its folder and the files scored, so a run redone since is scored again."""
    return "|".join(
        [str(run.resolve()), _sha(run / "split.json"), *(_sha(run / rel) for rel in MODELS.values())]
    )


def _log_probs(sess, x: np.ndarray, batch: int = 64) -> np.ndarray:
    name = sess.get_inputs()[0].name
    z = np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])
    z = z.astype(np.float64) - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def score_run(run: Path) -> dict:
    """Per model and split: right/wrong per image, plain and with TTA over 4 and 8 views."""
    cfg = read_config(run / "config.yaml")
    data = load_data(cfg.data, run, progress=False)
    spec = json.loads((run / "student" / "model.json").read_text())
    split_id = _sha(run / "split.json")
    out = {"deployed_key": json.loads((run / "deploy" / "deploy.json").read_text())["key"], "models": {}}
    inputs = {}  # each split's views, made once for both models: (V*N, 3, H, W) view by view, the images first
    for split in ("val", "test"):
        images, y = data.arrays(split)
        inputs[split] = (
            normalize(val_views(images, cfg.train.flips, cfg.train.rot90), spec["mean"], spec["std"]),
            y,
        )
    for name, rel in MODELS.items():
        sess = runtime.session(run / rel, threads=2)
        rec = {"id": f"{_sha(run / rel)}-{split_id}"}
        for split, (x, y) in inputs.items():
            lp = _log_probs(sess, x).reshape(-1, len(y), len(data.classes))
            four = spread(lp, 4)  # the fine-tunes' 4 views
            rec[split] = {
                "plain": (lp[0].argmax(1) == y).tolist(),
                "4": (four.mean(0).argmax(1) == y).tolist(),
                **({"8": (lp.mean(0).argmax(1) == y).tolist()} if len(lp) == 8 else {}),
            }
        out["models"][name] = rec
    out["latency_ms"] = latency(run / MODELS["deployed"], spec["input_size"])
    return out


def latency(path: Path, input_size: list[int], rounds: int = 10, calls: int = 20) -> dict:
    """Batch-1 and batch-of-views p50 of one ONNX file, in interleaved rounds (ms per call)."""
    sess = runtime.session(path, threads=2)
    name = sess.get_inputs()[0].name
    xs = {
        b: np.random.default_rng(0).standard_normal((b, *input_size)).astype(np.float32) for b in (1, *VIEWS)
    }
    times: dict[int, list[float]] = {b: [] for b in xs}
    for x in xs.values():
        sess.run(None, {name: x})  # warm-up
    for _ in range(rounds):
        for b, x in xs.items():
            for _ in range(calls):
                t = time.perf_counter()
                sess.run(None, {name: x})
                times[b].append(time.perf_counter() - t)
    return {str(b): 1e3 * float(np.median(t)) for b, t in times.items()}


def _pooled(results: dict, runs: list[str], model: str, split: str) -> dict[str, np.ndarray]:
    """Right/wrong per image over `runs`, each model file on its split once."""
    seen, out = set(), {}
    for r in runs:
        rec = results[r]["models"][model]
        if rec["id"] in seen:
            continue
        seen.add(rec["id"])
        for k, v in rec[split].items():
            out.setdefault(k, []).append(np.asarray(v, bool))
    return {k: np.concatenate(v) for k, v in out.items()}


def tables(results: dict, groups: dict[str, list[str]], bases: dict[str, Path]) -> list[str]:
    out = [
        "| group | model | split | files (images) | plain % (95% CI) | TTA 4 views (vs plain) | TTA 8 views (vs plain) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for gname, names in all_groups(groups):
        for model in MODELS:
            for split in ("val", "test"):
                a = _pooled(results, names, model, split)
                files = len({results[n]["models"][model]["id"] for n in names})
                cells = [
                    f"{accuracy_text(a[k])[:5]}: {paired_text(a[k], a['plain'])}" if k in a else "-"
                    for k in map(str, VIEWS)
                ]
                out.append(
                    f"| {gname} | {model} | {split} | {files} ({len(a['plain'])}) | {accuracy_text(a['plain'])} | "
                    + " | ".join(cells)
                    + " |"
                )
    out += [
        "",
        "The deployed file's latency (p50 ms at batch 1, and at the batch of views one image takes with TTA; "
        "2 threads, interleaved rounds, this CPU):",
        "",
        "| run | deployed | batch 1 | 4 views | 8 views |",
        "|---|---|---:|---:|---:|",
    ]
    for name, base in bases.items():
        t = results[name]["latency_ms"]
        out.append(
            f"| {base} | {results[name]['deployed_key']} | {t['1']:.2f} | {t['4']:.2f} ({t['4'] / t['1']:.1f}x) | "
            f"{t['8']:.2f} ({t['8'] / t['1']:.1f}x) |"
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--group", action="append", required=True, help="NAME=RUN[,RUN...]: finished runs pooled together"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/tta"))
    args = ap.parse_args()
    groups, bases = parse_groups(args.group)
    for base in bases.values():
        missing = [rel for rel in MODELS.values() if not (base / rel).exists()]
        if missing:
            raise SystemExit(f"{base}: no {missing[0]} (a run finished through deploy is needed)")
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "tta.json"
    results = json.loads(cache.read_text()) if cache.exists() else {}
    keys = {name: _key(base) for name, base in bases.items()}
    for name, base in bases.items():
        if keys[name] not in results:  # resumable: a run's files scored once are not scored again
            print(f"scoring {base}", flush=True)
            results[keys[name]] = score_run(base)
            atomic_write_json(cache, results)
    by_name = {name: results[keys[name]] for name, base in bases.items()}
    cmd = "python scripts/tta.py " + " ".join(f"--group {g}" for g in args.group) + f" --out {args.out}"
    text = [
        "# Test-time augmentation on finished runs",
        "",
        f"`{cmd}`",
        "",
        "Each cell: accuracy with TTA, then TTA minus plain in points on the same images (images only TTA got "
        "right / only plain, exact McNemar p). Validation decides; test is reported.",
        "",
        *tables(by_name, groups, bases),
        "",
    ]
    atomic_write_text(args.out / "TTA.md", "\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
