"""What a saved model is, as typed data without torch: `model.json` <-> `ModelSpec`.

A spec names the timm architecture and everything needed to feed and rebuild it: constructor kwargs,
the token stem, the classes, the input size and normalisation, and for a pruned ViT the width of every
block (`Widths`). Stdlib only, so quantize, bench, report and predict read it without torch;
`models.load` turns a spec and its safetensors file back into a module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from slimvit.errors import ModelError
from slimvit.layout import SPEC

FORMAT = "slimvit-model/1"
WIDTHS_FORMAT = 1
BLOCK_KEYS = ("num_heads", "head_dim", "attn_dim", "mlp_hidden")


def widths_error(msg: str) -> ModelError:
    return ModelError(
        f"pruned widths in model.json do not fit the model: {msg}. The artifact's model.json and "
        "weights must come from the same `slimvit prune` run; re-run it to rewrite them"
    )


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


@dataclass(frozen=True)
class BlockWidths:
    """One transformer block: attention heads x head width, and the MLP's hidden width."""

    num_heads: int
    head_dim: int
    mlp_hidden: int

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in BLOCK_KEYS}

    @classmethod
    def from_json(cls, d: Any, name: str) -> BlockWidths:
        if not isinstance(d, dict) or set(d) != set(BLOCK_KEYS):
            raise widths_error(f"'{name}' must have exactly the keys {', '.join(BLOCK_KEYS)}")
        bad = [k for k in BLOCK_KEYS if not _positive_int(d[k])]
        if bad:
            raise widths_error(f"{name}.{bad[0]}={d[bad[0]]!r} must be a positive integer")
        if d["attn_dim"] != d["num_heads"] * d["head_dim"]:
            raise widths_error(
                f"{name}: attn_dim={d['attn_dim']} is not num_heads x head_dim = {d['num_heads']} x {d['head_dim']}"
            )
        return cls(d["num_heads"], d["head_dim"], d["mlp_hidden"])


@dataclass(frozen=True)
class Widths:
    """The widths of a (pruned) ViT: the residual stream and each block by its module name."""

    embed_dim: int
    blocks: dict[str, BlockWidths]

    def to_json(self) -> dict:
        return {
            "format": WIDTHS_FORMAT,
            "embed_dim": self.embed_dim,
            "blocks": {n: b.to_json() for n, b in self.blocks.items()},
        }

    @classmethod
    def from_json(cls, d: Any) -> Widths:
        """Parse the structure (the fit to a model is `vit.validate_widths`); ModelError when malformed."""
        if not isinstance(d, dict):
            raise widths_error(f"expected a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {"format", "embed_dim", "blocks"})
        if unknown:
            raise widths_error(f"unknown key '{unknown[0]}' (known: format, embed_dim, blocks)")
        if d.get("format") != WIDTHS_FORMAT:
            raise widths_error(f"format {d.get('format')!r}, this version reads format {WIDTHS_FORMAT}")
        if not _positive_int(d.get("embed_dim")):
            raise widths_error(f"embed_dim={d.get('embed_dim')!r} must be a positive integer")
        blocks = d.get("blocks")
        if not isinstance(blocks, dict):
            raise widths_error("'blocks' must map block names (blocks.0, ...) to their widths")
        return cls(d["embed_dim"], {n: BlockWidths.from_json(b, n) for n, b in blocks.items()})

    def describe(self) -> str:
        """One line: embed width and the per-block heads x head_dim / MLP hidden (ranges if they vary)."""
        b = list(self.blocks.values())

        def span(key: str) -> str:
            lo, hi = min(getattr(x, key) for x in b), max(getattr(x, key) for x in b)
            return str(lo) if lo == hi else f"{lo}-{hi}"

        return f"embed {self.embed_dim}, heads {span('num_heads')} x {span('head_dim')}, mlp {span('mlp_hidden')}"


@dataclass(frozen=True)
class ModelSpec:
    """A saved model's description: what `model.json` holds (besides the weights' file)."""

    name: str
    num_classes: int
    classes: tuple[str, ...]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kwargs: dict = field(default_factory=dict)
    stem: str = "patch"
    attention: str = "plain"
    interpolation: str = "bilinear"
    widths: Widths | None = None

    @property
    def img_size(self) -> int:
        return self.input_size[-1]

    def with_widths(self, widths: Widths | None) -> ModelSpec:
        return replace(self, widths=widths)

    def to_json(self) -> dict:
        # "attention" only when it is not the plain kind: the files written before it keep their bytes
        # (and the run fingerprints built on their digests)
        attention = {} if self.attention == "plain" else {"attention": self.attention}
        return {
            "format": FORMAT,
            "name": self.name,
            "kwargs": dict(self.kwargs),
            "stem": self.stem,
            **attention,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "widths": None if self.widths is None else self.widths.to_json(),
        }

    @classmethod
    def from_json(cls, d: Any, where: str = "model.json") -> ModelSpec:
        """Parse a `model.json` mapping; ModelError naming `where` and the field when it is malformed."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ModelError(f"'{where}' is not a slimvit model description (format {got!r})")
        try:
            classes = tuple(str(c) for c in d["classes"])
            input_size = tuple(int(x) for x in d["input_size"])
            spec = cls(
                name=str(d["name"]),
                num_classes=int(d["num_classes"]),
                classes=classes,
                input_size=input_size,
                mean=tuple(float(x) for x in d["mean"]),
                std=tuple(float(x) for x in d["std"]),
                kwargs=dict(d.get("kwargs") or {}),
                stem=str(d.get("stem", "patch")),
                attention=str(d.get("attention", "plain")),
                interpolation=str(d.get("interpolation", "bilinear")),
                widths=None if d.get("widths") is None else Widths.from_json(d["widths"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(
                f"'{where}' is malformed ({type(e).__name__}: {e}); re-run the stage that wrote it"
            ) from None
        if len(input_size) != 3 or len(spec.mean) != input_size[0] or len(spec.std) != input_size[0]:
            raise ModelError(
                f"'{where}': input_size {list(input_size)} does not fit mean/std of {len(spec.mean)} channels"
            )
        if spec.num_classes != len(classes):
            raise ModelError(f"'{where}': num_classes={spec.num_classes} but {len(classes)} class names")
        return spec


def read_spec(path: str | Path) -> ModelSpec:
    """The spec of a saved model: its folder, or its `model.json` / `model.safetensors` path."""
    p = Path(path)
    js = p / SPEC if p.is_dir() else p.with_suffix(".json")
    if not js.is_file():
        raise ModelError(
            f"no model.json at '{p}'; point at a folder written by slimvit (teacher/, student/, ...)"
        )
    try:
        d = json.loads(js.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(
            f"'{js}' is not valid JSON ({e}); the artifact is corrupt, re-run the stage"
        ) from None
    return ModelSpec.from_json(d, str(js))
