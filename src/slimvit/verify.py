"""`slimvit verify`: a deploy folder re-checked on images where it runs, and the same check run by `slimvit
deploy` in a fresh, torch-free process right after it writes `deploy/`.

Torch-free (numpy + onnxruntime + Pillow): it runs on the edge box itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from slimvit.errors import ModelError
from slimvit.io import read_json
from slimvit.layout import DEPLOY_RECORD

log = logging.getLogger(__name__)


def standalone_check(deploy_dir: Path, chosen: dict) -> dict | None:
    """`slimvit verify` on the deployed model in a fresh process (torch-free, as deployed)."""
    import json
    import subprocess
    import sys
    import tempfile

    rec = read_json(deploy_dir / DEPLOY_RECORD)
    t = rec.get("test_images")
    if not t or not all((Path(t["root"]) / q).exists() for q in t["paths"][:1]):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "verify.json"
        r = subprocess.run(
            [sys.executable, "-m", "slimvit", "verify", str(deploy_dir), "--json", str(out)],
            capture_output=True,
            text=True,
        )
        if r.returncode not in (0, 1) or not out.exists():
            msg = (r.stderr.strip().splitlines() or ["no output"])[-1]
            log.warning("deploy: the standalone check failed: %s", msg)
            return {"agrees": False, "error": msg}
        v = json.loads(out.read_text())
    return {
        "n": v["n"],
        "failed": v["failed"],
        "accuracy": v["accuracy"],
        # verify's own verdict (a paired test on the same images): exact equality is not to be had, since
        # dynamic INT8 scales activations per call and bench and verify batch the images differently
        "agrees": bool(v["agrees"]),
        "identical": abs(v["accuracy"] - chosen["accuracy"]) < 1e-9 and not v["failed"],
        "paired": v.get("paired"),
        "latency_ms_p50": v["latency_ms_p50"],
        "bench_latency_ms_p50": chosen["latency_ms_p50"],
        "torch_loaded": v.get("torch_loaded"),
        "line": v["line"],
    }


def verify(deploy_dir: str | Path, images: str | Path | None = None, threads: int | None = None) -> dict:
    """Re-measure the deployed model's accuracy and batch-1 latency here, against its recorded figures.

    On the run's own test images (paired: exact McNemar on the same images) when no folder is given,
    else on a labelled image folder (`<class>/<image>`; unpaired: the recorded test accuracy must lie
    in this measurement's 95% interval). Returns the figures and a one-line verdict.
    """
    import sys

    from slimvit import runtime
    from slimvit.evaluate import mcnemar, wilson
    from slimvit.predict import predict_files, resolve_model
    from slimvit.preprocess import IMAGE_EXTENSIONS
    from slimvit.timing import ISA_FLAGS, cpu_flags, cpu_name, time_calls

    deploy_dir = Path(deploy_dir)
    rec_path = deploy_dir / DEPLOY_RECORD
    if not rec_path.exists():
        raise ModelError(f"no deploy.json in '{deploy_dir}'; point at a folder written by `slimvit deploy`")
    rec = read_json(rec_path)
    if not rec.get("deployed", True):
        raise ModelError(f"nothing is deployed in '{deploy_dir}': {rec.get('error')}")
    model = resolve_model(deploy_dir)
    threads = threads or rec.get("threads", 2)
    if images is None:
        t = rec.get("test_images")
        if not t:
            raise ModelError(
                f"'{rec_path}' records no test images; pass a labelled image folder: slimvit verify {deploy_dir} IMAGES"
            )
        root = Path(t["root"])
        paths = [root / p for p in t["paths"]]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise ModelError(
                f"the run's test images are not here ('{missing[0]}' is missing); "
                f"pass a labelled image folder: slimvit verify {deploy_dir} IMAGES"
            )
        labels = t["labels"]
        source = f"the run's {len(paths)} test images"
    else:
        root = Path(images)
        if not root.is_dir():
            raise ModelError(f"'{root}' is not a folder of class subfolders (<class>/<image>)")
        paths, labels = [], []
        for cdir in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(cdir.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    paths.append(f)
                    labels.append(cdir.name)
        if not paths:
            raise ModelError(f"'{root}' has no images in class subfolders (<class>/<image>)")
        source = f"{len(paths)} labelled images in '{root}'"
    results, failed = predict_files(model, paths, threads=threads)
    by_path = {r["path"]: r["class"] for r in results}
    pred = [by_path.get(str(p)) for p in paths]
    correct = np.array([p == y for p, y in zip(pred, labels, strict=True)])
    acc = float(correct.mean())
    lo, hi = wilson(int(correct.sum()), len(correct))
    predict, meta = runtime.runner(model, threads)
    x = np.random.default_rng(0).standard_normal((1, 3, *meta["input_size"][-2:]), dtype=np.float32)
    ms = float(np.median(time_calls(lambda: predict(x), 200, 20)))
    out = {
        "source": source,
        "n": len(paths),
        "failed": len(failed),
        "accuracy": acc,
        "accuracy_ci": [lo, hi],
        "recorded_accuracy": rec["accuracy"],
        "latency_ms_p50": ms,
        "recorded_latency_ms_p50": rec["latency_ms_p50"],
        "threads": threads,
        "cpu": cpu_name(),
        "isa": sorted(set(ISA_FLAGS) & cpu_flags(), key=ISA_FLAGS.index),
        "validated_on": rec.get("validated_on"),
        "torch_loaded": "torch" in sys.modules,
    }
    if images is None:
        recorded = np.array([p == y for p, y in zip(rec["test_images"]["pred"], labels, strict=True)])
        test = mcnemar(correct, recorded)
        out["paired"] = test
        out["agrees"] = test["p"] >= 0.05 and not failed
        noise = f"paired test p={test['p']:.2g}: {test['a_only']} images right only here, {test['b_only']} only there"
    else:
        out["agrees"] = lo - 1e-9 <= rec["accuracy"] <= hi + 1e-9 and not failed
        noise = f"95% interval {100 * lo:.1f}-{100 * hi:.1f}%"
    ratio = ms / rec["latency_ms_p50"]
    out["line"] = (
        f"{'agrees' if out['agrees'] else 'DIFFERS'}: accuracy {100 * acc:.2f}% on {source} "
        f"(recorded {100 * rec['accuracy']:.2f}% on {', '.join(rec.get('validated_on', {}).get('isa', [])) or '?'}"
        f"; {noise}); batch-1 p50 {ms:.2f} ms at {threads} threads here vs {rec['latency_ms_p50']:.2f} ms "
        f"recorded ({ratio:.2f}x; {out['cpu']})"
        + (f"; {len(failed)} images could not be decoded" if failed else "")
    )
    return out
