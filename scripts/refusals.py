"""A refused command changes nothing: every CLI command refused at least once on a finished run folder.

    .venv/bin/python scripts/refusals.py [WORK_DIR]

Runs the `smoke` preset on 3 classes x 10 generated images, then runs each refused command of the table
below as a user would (a subprocess), and prints, for each, the exit code, the one line it printed and
whether a digest of every file of the run folder (and of the folder a command must not create) is the
same before and after. Exit 0 when every row exits 2 with one `error:` line and changes nothing.
About 2 minutes on 2 idle cores (README, "Development").
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from stale_cases import SETTINGS, make_dataset  # noqa: E402

from slimvit import cli  # noqa: E402
from slimvit.runs import lock_run_dir  # noqa: E402


def digest(root: Path) -> str:
    h = hashlib.sha256()
    if root.exists():
        for p in sorted(root.rglob("*")):
            h.update(str(p.relative_to(root)).encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()[:12]


def slimvit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slimvit", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )


def cases(work: Path, run: Path, data: Path) -> list[tuple[str, list[str], Path]]:
    """(what is wrong, the command's arguments, the folder that must not change)."""
    common = ["--preset", "smoke", "--out", str(run), *SETTINGS]
    deploy = run / "deploy"
    return [
        ("data: a misspelt --data", ["data", *common, "--data", str(data) + "s"], run),
        (
            "data: a misspelt --data on a new folder",
            ["data", "--preset", "smoke", "--data", str(work / "nosuch"), "--out", str(work / "new")],
            work / "new",
        ),
        ("teacher: an unknown preset", ["teacher", "--preset", "nosuch", "--out", str(run)], run),
        ("distill: a bad --set value", ["distill", *common, "--set", "train.epochs=many"], run),
        ("prune: a value out of range", ["prune", *common, "--set", "prune.ratio=2"], run),
        ("export: an unknown config key", ["export", *common, "--set", "export.nosuch=1"], run),
        (
            "quantize: a missing --config file",
            ["quantize", *common, "--config", str(work / "nosuch.yaml")],
            run,
        ),
        ("bench: a missing --unlabeled folder", ["bench", *common, "--unlabeled", str(work / "nosuch")], run),
        ("deploy: a budget nothing meets", ["deploy", *common, "--budget-ms", "0.0001"], run),
        ("run: a budget nothing meets", ["run", *common, "--budget-ms", "0.0001"], run),
        ("run: a changed config without --force", ["run", *common, "--set", "train.seed=7"], run),
        ("report: a non-finite value", ["report", *common, "--set", "deploy.max_drop=.inf"], run),
        ("verify: a missing image folder", ["verify", str(deploy), str(work / "nosuch")], run),
        ("predict: a missing model", ["predict", str(work / "nosuch.onnx"), str(data)], run),
        ("subset: an existing output folder", ["subset", str(data), str(run), "--counts", "1,1,1"], run),
        ("config: an unknown key", ["config", "train.epoch"], run),
        (
            "deploy: review and target accuracy together",
            ["deploy", *common, "--review-rate", "0.05", "--target-accuracy", "99"],
            run,
        ),
    ]


def main() -> int:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="slimvit-refusals-"))
    data, run = work / "data", work / "run"
    if not (run / "deploy" / "model.onnx").exists():
        make_dataset(data)
        rc = cli.main(["run", "--preset", "smoke", "--data", str(data), "--out", str(run), *SETTINGS])
        if rc != 0:
            raise SystemExit(f"the smoke run exited {rc}")
    rows, failed = [], 0
    table = cases(work, run, data)
    # a second writer: the run folder is locked by this process while the command runs
    table.append(("run: a second writer", ["run", "--preset", "smoke", "--out", str(run), *SETTINGS], run))
    for what, args, folder in table:
        before = digest(folder)
        if what == "run: a second writer":
            with lock_run_dir(run, "scripts/refusals.py"):
                r = slimvit(*args)
        else:
            r = slimvit(*args)
        after = digest(folder)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        ok = r.returncode == 2 and len(errors) == 1 and before == after
        failed += not ok
        line = errors[0] if errors else (r.stderr.strip().splitlines() or ["(nothing)"])[-1]
        rows.append((what, r.returncode, line, before == after, ok))
    # a corrupt bench.json: `deploy` must leave the folder as it finds it
    bench = run / "bench.json"
    saved = bench.read_bytes()
    try:
        bench.write_text('{"rows": [')
        before = digest(run)
        r = slimvit("deploy", "--preset", "smoke", "--out", str(run), *SETTINGS)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        same = digest(run) == before
        ok = r.returncode == 2 and len(errors) == 1 and same
        failed += not ok
        rows.append(
            ("deploy: a corrupt bench.json", r.returncode, errors[0] if errors else r.stderr[-200:], same, ok)
        )
    finally:
        bench.write_bytes(saved)
    print("| refused command | exit | the line printed | folder unchanged | as expected |")
    print("|---|---:|---|---|---|")
    for what, rc, line, same, ok in rows:
        print(
            f"| {what} | {rc} | {line[:160]} | {'yes' if same else '**no**'} | {'yes' if ok else '**NO**'} |"
        )
    print(json.dumps({"cases": len(rows), "failed": failed}))
    print(f"refusals: {len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
