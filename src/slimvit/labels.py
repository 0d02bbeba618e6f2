"""How slimvit writes a share as a percentage, names a bench row and tables the pruning sweep: one set of
helpers, so that the report, bench.md, prune_sweep.md and the deploy sentences say the same thing the same
way. Torch-free, numpy-free."""

from __future__ import annotations

RUNTIMES = {"pytorch": "PyTorch", "onnxruntime": "ORT", "openvino": "OpenVINO"}
"""A runtime's short name in row labels."""


def pct(x: float | None, digits: int = 2, unit: str = "%") -> str:
    """A share as a percentage, e.g. `98.89%`; `unit=""` where the column header already says %."""
    return "-" if x is None else f"{100 * x:.{digits}f}{unit}"


def pct_ci(x: float | None, ci, unit: str = "%") -> str:
    """An accuracy with its 95% interval, e.g. `98.89% (97.2-99.6)`."""
    if x is None:
        return "-"
    return pct(x, unit=unit) + (f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci else "")


def row_label(r: dict) -> str:
    """A bench row in words: stage, runtime and precision, e.g. `pruned ORT int8-static`."""
    return f"{r['stage']} {RUNTIMES.get(r['runtime'], r['runtime'])} {r['precision']}"


def ratio_text(r: dict) -> str:
    """How a row's model was pruned, to follow its label: `, pruning ratio 0.3, 6 blocks`; "" if not."""
    if r.get("ratio") is None:
        return ""
    return f", pruning ratio {r['ratio']:g}" + (
        f", {r['depth']} blocks" if r.get("depth") is not None else ""
    )


def shape_label(r: dict) -> str:
    """How a candidate was pruned, in a few characters: "r=0.3", "r=0.3 d6" (6 blocks kept), "" if not."""
    if r.get("ratio") is None:
        return ""
    return f"r={r['ratio']:g}" + (f" d{r['depth']}" if r.get("depth") is not None else "")


def sweep_table(baseline: dict, rows: list[dict]) -> str:
    """The pruning sweep as a markdown table (prune_sweep.md and the report's Sweep): the student, then each
    pruned shape."""
    lines = [
        "| ratio | blocks | params (M) | MACs (M) | FP32 latency ms (p50) | val acc % | test acc % | fine-tune epochs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| 0 (student) | all | {baseline['params'] / 1e6:.3f} | {baseline['macs'] / 1e6:.1f} | "
        f"{baseline['latency_ms']:.2f} | {pct(baseline['val_acc'], unit='')} | {pct(baseline['test_acc'], unit='')} | - |",
    ]
    for r in rows:
        ep = r.get("finetune_epochs_run")
        lines.append(
            f"| {r['ratio']:g} | {r.get('depth') or 'all'} | {r['params_after'] / 1e6:.3f} | {r['macs_after'] / 1e6:.1f} | "
            f"{r['latency_ms_after']:.2f} | {pct(r['val_acc'], unit='')} | {pct(r['test_acc'], unit='')} | "
            f"{'-' if ep is None else ep} |"
        )
    return "\n".join(lines) + "\n"
