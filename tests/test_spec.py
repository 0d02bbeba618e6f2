"""The typed model description (`slimvit.spec`): JSON round trip, clear errors, and no torch to read it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from slimvit.errors import ModelError
from slimvit.spec import BlockWidths, ModelSpec, Widths, read_spec

WIDTHS = Widths(48, {"blocks.0": BlockWidths(2, 16, 96), "blocks.1": BlockWidths(3, 8, 64)})
SPEC = ModelSpec(
    name="vit_tiny_patch16_224",
    num_classes=3,
    classes=("a", "b", "c"),
    input_size=(3, 32, 32),
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    kwargs={"depth": 2},
    stem="conv",
    widths=WIDTHS,
)


def test_json_round_trip_and_the_file_format(tmp_path):
    d = SPEC.to_json()
    assert d["format"] == "slimvit-model/1" and d["widths"]["blocks"]["blocks.1"]["attn_dim"] == 24
    # the key order of the files written before the typed spec: their digests (run fingerprints) stay put
    assert list(d) == [
        "format", "name", "kwargs", "stem", "num_classes", "classes", "input_size", "mean", "std",
        "interpolation", "widths",
    ]  # fmt: skip
    assert list(d["widths"]["blocks"]["blocks.0"]) == ["num_heads", "head_dim", "attn_dim", "mlp_hidden"]
    (tmp_path / "model.json").write_text(json.dumps(d))
    back = read_spec(tmp_path)
    assert back == SPEC and back.img_size == 32 and back.widths.blocks["blocks.0"].attn_dim == 32
    assert read_spec(tmp_path / "model.safetensors") == SPEC  # the weights' path finds its description
    assert SPEC.with_widths(None).to_json()["widths"] is None
    # locality attention is written (after the stem) and read back; the plain kind is not written at all
    lsa = dataclasses.replace(SPEC, attention="locality")
    assert list(lsa.to_json())[4] == "attention" and lsa.to_json()["attention"] == "locality"
    assert ModelSpec.from_json(lsa.to_json()) == lsa and ModelSpec.from_json(d).attention == "plain"
    assert WIDTHS.describe() == "embed 48, heads 2-3 x 8-16, mlp 64-96"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("classes"), "malformed.*KeyError.*classes"),
        (lambda d: d.update(format="other/2"), "not a slimvit model description"),
        (lambda d: d.update(num_classes=4), "num_classes=4 but 3 class names"),
        (lambda d: d.update(mean=[0.5]), "does not fit mean/std of 1 channels"),
        (lambda d: d.update(input_size="big"), "malformed.*ValueError"),
        (lambda d: d["widths"].update(embed_dim=0), "embed_dim=0 must be a positive integer"),
        (
            lambda d: d["widths"]["blocks"]["blocks.0"].update(attn_dim=5),
            "attn_dim=5 is not num_heads x head_dim",
        ),
        (
            lambda d: d["widths"]["blocks"]["blocks.0"].pop("mlp_hidden"),
            "'blocks.0' must have exactly the keys",
        ),
        (lambda d: d["widths"].update(format=2), "this version reads format 1"),
    ],
)
def test_malformed_descriptions_name_the_problem(tmp_path, edit, message):
    d = SPEC.to_json()
    edit(d)
    (tmp_path / "model.json").write_text(json.dumps(d))
    with pytest.raises(ModelError, match=message):
        read_spec(tmp_path)


def test_missing_or_corrupt_file(tmp_path):
    with pytest.raises(ModelError, match="no model.json"):
        read_spec(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        read_spec(tmp_path)


def test_quantize_bench_report_predict_read_specs_without_torch(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps(SPEC.to_json()))
    code = (
        "import sys\n"
        "for m in ('torch', 'timm', 'torchvision', 'torch_pruning', 'accelerate', 'onnx'):\n"
        "    sys.modules[m] = None\n"
        "import slimvit.bench, slimvit.deploy, slimvit.predict, slimvit.quantize, slimvit.report\n"
        "from slimvit.spec import read_spec\n"
        f"print(read_spec({str(tmp_path)!r}).widths.describe())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == WIDTHS.describe()


def test_saving_the_same_model_writes_the_same_bytes(tmp_path):
    """Identical weights must give an identical file (run fingerprints digest it): nothing in the
    safetensors header may depend on hash order."""
    import hashlib

    from test_prune import tiny_vit

    from slimvit import models

    model, spec = tiny_vit()
    digests = set()
    for i in range(8):
        models.save(model, spec, tmp_path / str(i))
        digests.add(hashlib.sha256((tmp_path / str(i) / "model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
