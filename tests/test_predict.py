"""`slimvit predict`: the torch-free edge path, corrupt images, outputs, bad input."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import write_image
from test_export import CLASSES, tiny

from slimvit.errors import DataError, ModelError
from slimvit.export import export_onnx
from slimvit.predict import collect, predict_files
from slimvit.preprocess import load_rgb, normalize


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy")
    model, spec = tiny(pruned=True)
    export_onnx(model, spec, d / "model.onnx", stage="pruned")
    return d / "model.onnx", model, spec


def _folder_with_one_corrupt(root):
    for i in range(5):
        write_image(root / "imgs" / f"ok_{i}.{'webp' if i == 4 else 'png'}", seed=i, size=40)
    (root / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "imgs" / "notes.txt").write_text("not an image, ignored")
    return root / "imgs"


def test_predict_folder_with_corrupt_image(tmp_path, deployed):
    model_path, model, spec = deployed
    folder = _folder_with_one_corrupt(tmp_path)
    results, failed = predict_files(model_path, [folder], threads=1)
    assert [f["path"] for f in failed] == [str(folder / "broken.jpg")]
    assert len(results) == 5 and all(r["class"] in CLASSES for r in results)
    # the same pixels through PyTorch give the same classes
    x = torch.from_numpy(normalize(np.stack([load_rgb(r["path"], 32) for r in results]), spec.mean, spec.std))
    expected = [CLASSES[i] for i in model(x).argmax(1).tolist()]
    assert [r["class"] for r in results] == expected
    for r in results:
        assert abs(sum(r["probs"].values()) - 1) < 1e-5 and r["confidence"] == max(r["probs"].values())


def test_cli_outputs_exit_code_and_no_torch(tmp_path, deployed):
    model_path, _, _ = deployed
    folder = _folder_with_one_corrupt(tmp_path)
    out_json, out_csv = tmp_path / "p.json", tmp_path / "p.csv"
    code = (
        "import sys\n"
        "from slimvit.cli import main\n"
        f"rc = main(['predict', {str(model_path)!r}, {str(folder)!r}, '--json', {str(out_json)!r}, '--csv', {str(out_csv)!r}])\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "sys.exit(rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr  # one image failed: non-zero at the end, after the rest
    assert "broken.jpg" in r.stderr and "Traceback" not in r.stderr
    js = json.loads(out_json.read_text())
    assert len(js["predictions"]) == 5 and len(js["failed"]) == 1
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 5 and set(rows[0]) >= {"path", "class", "confidence", *(f"p_{c}" for c in CLASSES)}


def test_bad_input(tmp_path, deployed):
    model_path, _, _ = deployed
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        collect([tmp_path / "empty"])
    assert collect([tmp_path / "nope.jpg"]) == [tmp_path / "nope.jpg"]  # listed as not decodable later
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("hello")
    with pytest.raises(ModelError, match="not an ONNX model"):
        predict_files(not_onnx, [model_path])
    r = subprocess.run(
        [sys.executable, "-m", "slimvit", "predict", str(not_onnx), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
