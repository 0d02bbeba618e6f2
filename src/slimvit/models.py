"""Create timm models, and save/load them as `model.safetensors` + `model.json` (no pickle).

`model.json` (a `slimvit.spec.ModelSpec`) holds everything needed to rebuild the module: the timm
name, constructor kwargs, the token stem, the classes, input size and normalisation, and, for pruned
models, the width of every pruned layer. `load(path)` rebuilds the architecture, applies the widths,
and loads the weights with safetensors.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import timm
import torch
from torch import nn

from slimvit.errors import ModelError, first_line
from slimvit.io import atomic_path, atomic_write_json
from slimvit.layout import SPEC, WEIGHTS
from slimvit.spec import FORMAT, ModelSpec, read_spec
from slimvit.vit import ATTENTIONS, ConvStem, apply_widths

log = logging.getLogger(__name__)

VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")


STEMS: dict[str, type[nn.Module] | None] = {"patch": None, "conv": ConvStem}


def eval_logits(out) -> torch.Tensor:
    """The logits a model is judged by: a DeiT distilled model training with its distillation token
    returns (class head, distillation head), averaged here as timm averages them in eval mode."""
    if isinstance(out, (tuple, list)):
        return (out[0] + out[1]) / 2
    return out


def is_vit(name: str) -> bool:
    try:
        return timm.models.model_entrypoint(name).__module__ in VIT_MODULES
    except (RuntimeError, KeyError):
        return False


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else " See timm.list_models()."
        raise ModelError(f"unknown timm model '{name}'.{hint}")


def build(spec: ModelSpec) -> nn.Module:
    """Build the (unpruned) module described by an artifact spec, with random weights."""
    name = spec.name
    check_model_name(name)
    kwargs = dict(spec.kwargs)
    kwargs["num_classes"] = spec.num_classes
    if is_vit(name):
        kwargs["img_size"] = spec.img_size
        stem = spec.stem
        if stem not in STEMS:
            raise ModelError(f"unknown stem '{stem}'; known: {', '.join(STEMS)}")
        if STEMS[stem] is not None:
            kwargs["embed_layer"] = STEMS[stem]
        if spec.attention not in ATTENTIONS:
            raise ModelError(f"unknown attention '{spec.attention}'; known: {', '.join(ATTENTIONS)}")
        if spec.attention != "plain":
            kwargs["attn_layer"] = ATTENTIONS[spec.attention]
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ModelError(f"timm model '{name}' does not accept these arguments: {e}") from None


def make_spec(
    name: str,
    num_classes: int,
    classes: list[str],
    img_size: int,
    stem: str = "patch",
    kwargs: dict | None = None,
    attention: str = "plain",
) -> ModelSpec:
    """The description of a fresh model; mean/std come from the timm model's config."""
    check_model_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    mean = getattr(cfg, "mean", None) or timm.data.IMAGENET_DEFAULT_MEAN
    std = getattr(cfg, "std", None) or timm.data.IMAGENET_DEFAULT_STD
    return ModelSpec(
        name=name,
        num_classes=num_classes,
        classes=tuple(classes),
        input_size=(3, img_size, img_size),
        mean=tuple(float(x) for x in mean),
        std=tuple(float(x) for x in std),
        kwargs=dict(kwargs or {}),
        stem=stem if is_vit(name) else "patch",
        attention=attention if is_vit(name) else "plain",
    )


def create(spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    """A new model from a spec, optionally initialised from timm's pretrained weights or a local file."""
    if pretrained and weights:
        raise ModelError("set either pretrained: true or weights: FILE, not both")
    model = build(spec)
    if pretrained:
        model = _load_pretrained(spec, model)
    elif weights:
        load_weights_file(model, weights)
    return model


def _load_pretrained(spec: ModelSpec, model: nn.Module) -> nn.Module:
    name = spec.name
    kwargs = dict(spec.kwargs, num_classes=spec.num_classes)
    if is_vit(name):
        kwargs["img_size"] = spec.img_size
    try:
        pre = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # network errors come in many types (OSError, HF hub errors, ...)
        raise ModelError(
            f"could not download pretrained weights for '{name}' ({type(e).__name__}: {first_line(e, 200)}). "
            "Offline? Pass a local file with `weights: FILE` (--set model.teacher_weights=FILE) "
            "or set `pretrained: false`."
        ) from None
    if spec.stem == "patch" and spec.attention == "plain":
        return pre
    # Keep the pretrained transformer; a conv stem and locality attention's temperatures start fresh.
    sd = pre.state_dict()
    if spec.stem != "patch":
        sd = {k: v for k, v in sd.items() if not k.startswith("patch_embed.")}
    model.load_state_dict(sd, strict=False)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"cannot read weights file '{path}': {e}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ModelError(f"weights file '{path}' does not hold a state dict")
    return sd


def load_weights_file(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load a local weights file, saying which keys do not fit the architecture."""
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if shape or (strict and (missing or unexpected)):
        parts = []
        if shape:
            parts.append(f"shape mismatch: {'; '.join(shape[:3])}" + (" ..." if len(shape) > 3 else ""))
        if missing:
            parts.append(f"missing: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
        raise ModelError(f"weights file '{path}' does not fit the architecture ({'; '.join(parts)})")
    model.load_state_dict(sd, strict=strict)


def save(model: nn.Module, spec: ModelSpec, out_dir: str | Path) -> Path:
    """Write `model.safetensors` and `model.json` atomically into `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS) as tmp:
        # One metadata key: safetensors writes the metadata map in hash order, so two keys came out in
        # either order from one save to the next, and identical weights got a different file digest.
        save_file(sd, str(tmp), metadata={"format": FORMAT})
    atomic_write_json(out / SPEC, spec.to_json())
    return out


def load(path: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild a saved model (pruned or not) from its folder, without pickle. Returns (model, spec)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    spec = read_spec(p)
    st = (p / WEIGHTS) if p.is_dir() else p.with_suffix(".safetensors")
    if not st.is_file():
        raise ModelError(f"'{st}' is missing; the artifact is incomplete, re-run the stage that makes it")
    model = build(spec)
    if spec.widths is not None:
        apply_widths(model, spec.widths)
    try:
        sd = load_file(str(st))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"cannot read '{st}' ({e}); the file is corrupt, re-run the stage") from None
    own = model.state_dict()
    bad = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if bad or missing or unexpected:
        what = (
            f"{bad[0]}: saved {tuple(sd[bad[0]].shape)}, model.json widths give {tuple(own[bad[0]].shape)}"
            if bad
            else f"missing {missing[0]}"
            if missing
            else f"unexpected {unexpected[0]}"
        )
        raise ModelError(
            f"'{st}' does not match '{p}/model.json' ({what}); the widths recorded do not fit the weights"
        )
    model.load_state_dict(sd)
    model.eval()
    return model, spec


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
