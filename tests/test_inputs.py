"""Odd inputs a real user hands slimvit (issue 13): each gets the right result or one clear line.

The config rows (a YAML with one key, non-finite numbers) are in test_config.py.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import make_imagefolder, write_image
from PIL import Image
from tiny_onnx import CLASSES, expected_class, write_gray, write_tiny_onnx

from slimvit import preprocess
from slimvit.cli import build_parser, load_cli_config, main
from slimvit.config import DataConfig
from slimvit.data import decode_all, discover, load_data
from slimvit.errors import DataError
from slimvit.preprocess import ImageDecodeError, load_rgb

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slimvit", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        **kw,
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_onnx(tmp_path_factory.mktemp("model") / "model.onnx")


# --------------------------------------------------------------------------- --data is a path


@pytest.mark.parametrize("value", ["#mine", "null", "2024", "a: b", "[x]", "~"])
def test_data_option_is_a_path_never_yaml(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / value).mkdir()  # a folder of that name: --data is checked to exist before anything runs
    cfg, _ = load_cli_config(build_parser().parse_args(["data", "--data", value]))
    assert cfg.data.path == value


def test_data_option_null_is_looked_up_as_a_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLIMVIT_DATA", str(tmp_path / "elsewhere"))
    assert main(["data", "--data", "null", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: dataset folder 'null' does not exist; pass --data PATH or set SLIMVIT_DATA "
        "(see README, 'Getting NEU-DET')"
    )


# --------------------------------------------------------------------------- names with rich markup


def _markup_folder(root: Path) -> Path:
    folder = root / "imgs"
    folder.mkdir(parents=True)
    for i, name in enumerate(["x[/b].png", "[red]x.png", ":smile: y.png"]):
        write_gray(folder / name, 10 + 100 * i)
    return folder


def test_predict_shows_and_writes_names_with_brackets(tmp_path, model):
    folder = _markup_folder(tmp_path)
    out_json, out_csv = tmp_path / "o.json", tmp_path / "o.csv"
    args = ["predict", str(model), str(folder), "--json", str(out_json), "--csv", str(out_csv)]
    r = _run(*args, env={"FORCE_COLOR": "1", "COLUMNS": "400"})  # the rich table of a terminal
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for name in ("x[/b].png", "[red]x.png", ":smile: y.png"):
        assert name in r.stdout
    names = {"x[/b].png", "[red]x.png", ":smile: y.png"}  # x[/b].png: b].png in a folder x[
    paths = {
        Path(p["path"]).relative_to(folder).as_posix()
        for p in json.loads(out_json.read_text())["predictions"]
    }
    assert paths == names
    assert {
        Path(row["path"]).relative_to(folder).as_posix() for row in csv.DictReader(out_csv.open())
    } == names
    piped = _run("predict", str(model), str(folder))  # tab-separated lines when piped
    assert piped.returncode == 0, piped.stderr
    assert sorted(line.split("\t")[0] for line in piped.stdout.splitlines()) == sorted(
        str(folder / n) for n in paths
    )


def test_data_shows_class_folders_with_brackets(tmp_path):
    root = make_imagefolder(tmp_path / "ds[b]", classes=("[red]styled", "[x]"), per_class=10, size=16)
    r = _run(
        "data",
        "--data",
        str(root),
        "--out",
        str(tmp_path / "run"),
        "--set",
        "data.img_size=16",
        env={"COLUMNS": "300"},
    )
    assert r.returncode == 0, r.stderr
    assert "[red]styled" in r.stdout and "[x]" in r.stdout and f"{root}  layout: imagefolder" in r.stdout


# --------------------------------------------------------------------------- 16-bit and transparent images


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)  # 0 .. 63960
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    got = load_rgb(path, 40)
    expected = ((values.astype(np.int64) + 128) // 257).astype(np.uint8)
    assert np.array_equal(got[..., 0], expected) and np.array_equal(got[..., 2], expected)
    assert (got == 255).mean() < 0.01
    tif = tmp_path / "g16.tif"
    Image.fromarray(values).save(tif)
    assert np.array_equal(load_rgb(tif, 40), got)


def test_16_bit_image_in_a_dataset_is_decoded_like_predict_sees_it(tmp_path):
    root = make_imagefolder(tmp_path / "ds", classes=("a", "b"), per_class=3, size=16)
    Image.fromarray(np.full((16, 16), 32896, np.uint16)).save(root / "a" / "deep.png")  # 128 * 257
    index = discover(root)
    images = decode_all(index, 16, progress=False)
    i = [s.path for s in index.samples].index("a/deep.png")
    assert (images[i] == 128).all()


def test_transparent_png_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere ...
    rgba[:4, :, 3] = 0  # ... invisible in the top half
    rgba[4:, :, 3] = 255  # opaque in the bottom half
    rgba[7, :, 3] = 128  # half transparent in the last row
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    got = load_rgb(path, 8)
    assert (got[:4] == preprocess.BACKGROUND).all()
    assert (got[4:7] == (200, 0, 0)).all()
    assert np.allclose(got[7], (228, 127, 127), atol=1)  # 128/255 of the colour over white
    la = tmp_path / "la.png"
    Image.fromarray(rgba[..., [1, 3]], "LA").save(la)  # gray 0 with the same alpha
    assert (load_rgb(la, 8)[:4] == 255).all() and (load_rgb(la, 8)[4:7] == 0).all()
    pal = Image.new("P", (8, 8))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putdata([0] * 32 + [1] * 32)  # red (transparent) top half, blue bottom half
    pal.save(tmp_path / "p.png", transparency=0)
    got = load_rgb(tmp_path / "p.png", 8)
    assert (got[:4] == 255).all() and (got[4:] == (0, 0, 255)).all()


# --------------------------------------------------------------------------- pixel limit


def _png_header_only_bomb(path: Path, w: int, h: int) -> Path:
    """A valid PNG of w x h black gray pixels, compressed to a few KB (as a decompression bomb is)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    comp = zlib.compressobj(9)
    row = b"\0" * (w + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def test_pixel_limit_refuses_before_decoding(tmp_path, monkeypatch):
    small = write_gray(tmp_path / "small.png", 50, size=10)
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 99)
    with pytest.raises(ImageDecodeError, match=r"10 x 10 = 100 pixels, over slimvit's limit of 99 pixels"):
        load_rgb(small, 8)
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 100)
    assert load_rgb(small, 8).shape == (8, 8, 3)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets slimvit's filter
def test_decompression_bomb_is_one_line_in_predict_and_data(tmp_path, model):
    folder = tmp_path / "imgs"
    bomb = _png_header_only_bomb(folder / "bomb.png", 10000, 10000)
    assert bomb.stat().st_size < 200_000
    write_gray(folder / "fine.png", 10)
    r = _run("predict", str(model), str(folder))
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()
    assert err[0] == (
        f"error: image '{bomb}' is 10000 x 10000 = 100,000,000 pixels, over slimvit's limit of "
        "50,000,000 pixels (a decompression-bomb guard, preprocess.MAX_PIXELS); downscale it"
    )
    assert len(err) == 2 and err[1].startswith("1 images classified, 1 could not be decoded")
    assert r.stdout.split("\t")[:2] == [str(folder / "fine.png"), "dark"]
    ds = make_imagefolder(tmp_path / "ds", classes=("a", "b"), per_class=5, size=16)
    _png_header_only_bomb(ds / "a" / "bomb.png", 10000, 10000)
    with pytest.raises(DataError, match=r"bomb.png' is 10000 x 10000 = 100,000,000 pixels, over slimvit"):
        load_data(DataConfig(path=str(ds), img_size=16), None, progress=False)


# --------------------------------------------------------------------------- ONNX metadata


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"classes": ["a", "b"], "n_outputs": 3}, "classes"),
        ({"meta": {"input_size": 32}}, "input_size"),
        ({"meta": {"input_size": [3, 32]}}, "input_size"),
        ({"meta": {"input_size": [3, 16, 16]}}, "input_size"),  # not the model's input
        ({"meta": {"mean": [0.5, 0.5]}}, "mean"),
        ({"meta": {"std": [0.2, 0.0, 0.2]}}, "std"),
        ({"meta": {"classes": "abc"}}, "classes"),
        ({"meta": {"format": "slimvit-onnx/2"}}, "format"),
    ],
)
def test_bad_onnx_metadata_is_one_line_naming_the_field(tmp_path, capsys, kwargs, field):
    path = write_tiny_onnx(tmp_path / "m.onnx", **kwargs)
    write_gray(tmp_path / "imgs" / "a.png", 10)
    assert main(["predict", str(path), str(tmp_path / "imgs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the ONNX model's slimvit metadata field")
    assert f"field '{field}'" in err[0]


def test_onnx_metadata_without_format_or_not_an_object(tmp_path, capsys):
    meta = {"classes": CLASSES, "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}
    write_gray(tmp_path / "imgs" / "a.png", 10)
    for raw, match in ((json.dumps(meta), "lacks format"), ("[1, 2]", "not a JSON object")):
        path = write_tiny_onnx(tmp_path / "m.onnx", raw_meta=raw)
        assert main(["predict", str(path), str(tmp_path / "imgs")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0]


def test_bad_metadata_through_the_real_command_exits_2(tmp_path):
    path = write_tiny_onnx(tmp_path / "m.onnx", meta={"input_size": 32})
    write_gray(tmp_path / "a.png", 10)
    r = _run("predict", str(path), str(tmp_path / "a.png"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "error: the ONNX model's slimvit metadata field 'input_size' must be [3, H, W] with H = W "
        "(positive integers), got 32; re-export the model"
    )


# --------------------------------------------------------------------------- a class with one image


def test_class_with_one_image_is_refused_before_split_json_then_fixed_dataset_works(tmp_path):
    root = make_imagefolder(tmp_path / "ds", classes=("a",), per_class=10, size=16)
    write_image(root / "b" / "b_0.png", seed=500, size=16)
    run = tmp_path / "run"
    run.mkdir()
    cfg = DataConfig(path=str(root), img_size=16)
    with pytest.raises(DataError, match=r"the test split has no images of class 'b' \(1 image\(s\) in all\)"):
        load_data(cfg, run, progress=False)
    assert not (run / "split.json").exists()
    for i in range(1, 10):
        write_image(root / "b" / f"b_{i}.png", seed=500 + i, size=16)
    data = load_data(cfg, run, progress=False)
    assert (run / "split.json").exists() and data.index.counts() == {"a": 10, "b": 10}


# --------------------------------------------------------------------------- exit codes


def test_predict_exit_codes_0_1_2(tmp_path, model):
    folder = tmp_path / "imgs"
    for level in (10, 128, 245):
        write_gray(folder / f"{level}.png", level)
    ok = _run("predict", str(model), str(folder))
    assert ok.returncode == 0, ok.stderr
    assert [line.split("\t")[1] for line in ok.stdout.splitlines()] == [
        expected_class(v) for v in (10, 128, 245)
    ]
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    some = _run("predict", str(model), str(folder))
    assert some.returncode == 1 and "broken.png" in some.stderr and len(some.stdout.splitlines()) == 3
    for bad in (["predict", str(model)], ["predict", str(model), str(folder), "--threads", "0"]):
        usage = _run(*bad)
        assert usage.returncode == 2 and "Traceback" not in usage.stderr
    helptext = _run("predict", "--help").stdout
    assert "exit codes:" in helptext and "0  every image" in helptext and "2  bad usage" in helptext
