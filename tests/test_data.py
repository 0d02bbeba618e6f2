import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_imagefolder, write_image

from slimvit.config import DataConfig
from slimvit.data import TrainDataset, describe, discover, load_data, make_split
from slimvit.errors import DataError


def _neu_layout(root, classes=("crazing", "rolled-in_scale"), per_class=10):
    for ci, c in enumerate(classes):
        for i in range(1, per_class + 1):
            write_image(root / "IMAGES" / f"{c}_{i}.jpg", seed=ci * 100 + i)
            (root / "ANNOTATIONS").mkdir(parents=True, exist_ok=True)
            (root / "ANNOTATIONS" / f"{c}_{i}.xml").write_text(
                f"<annotation><object><name>{c}</name><bndbox><xmin>1</xmin><ymin>2</ymin>"
                f"<xmax>10</xmax><ymax>12</ymax></bndbox></object></annotation>"
            )
    return root


def test_neu_det_layout_with_boxes(tmp_path):
    index = discover(_neu_layout(tmp_path / "neu"))
    assert index.layout == "neu-det"
    assert index.classes == ["crazing", "rolled-in_scale"]  # prefix before the last _<n>
    assert index.counts() == {"crazing": 10, "rolled-in_scale": 10}
    assert index.samples[0].boxes == (("crazing", 1, 2, 10, 12),)


def test_kaggle_layout_pools_train_and_validation(tmp_path):
    root = tmp_path / "kaggle"
    for split, n in (("train", 8), ("validation", 2)):
        for c in ("inclusion", "patches"):
            for i in range(n):
                write_image(
                    root / split / "images" / c / f"{c}_{split}_{i}.jpg", seed=hash((split, c, i)) % 1000
                )
    index = discover(root)
    assert index.layout == "kaggle"
    assert index.counts() == {"inclusion": 10, "patches": 10}


def test_imagefolder_and_flat_layouts(tmp_path):
    index = discover(make_imagefolder(tmp_path / "folder", per_class=4))
    assert index.layout == "imagefolder" and index.classes == ["a", "b", "c"]
    flat = tmp_path / "flat"
    for c in ("Cr", "Sc"):
        for i in range(1, 4):
            write_image(flat / f"{c}_{i}.bmp", seed=i + (10 if c == "Sc" else 0), ext=".bmp")
    index = discover(flat)
    assert index.layout == "flat" and index.counts() == {"Cr": 3, "Sc": 3}


def test_split_is_deterministic_stratified_and_keeps_duplicates_together(tmp_path):
    root = make_imagefolder(tmp_path / "d", classes=("a", "b"), per_class=20)
    shutil.copy(root / "a" / "a_0.png", root / "a" / "a_dup.png")  # byte-identical pair
    index = discover(root)
    s1 = make_split(index, (0.7, 0.1, 0.2), seed=0)
    s2 = make_split(index, (0.7, 0.1, 0.2), seed=0)
    assert s1 == s2
    assert make_split(index, (0.7, 0.1, 0.2), seed=1) != s1
    all_idx = sorted(i for s in s1.values() for i in s)
    assert all_idx == list(range(len(index.samples)))  # a partition
    labels = np.array([s.label for s in index.samples])
    for split, frac in (("test", 0.2), ("val", 0.1)):
        for c in (0, 1):
            n_c = int((labels == c).sum())
            assert int((labels[s1[split]] == c).sum()) == round(frac * n_c)
    paths = [s.path for s in index.samples]
    side = {p: name for name, idx in s1.items() for p in (paths[i] for i in idx)}
    assert side["a/a_0.png"] == side["a/a_dup.png"]


def test_sequence_split_keeps_runs_of_consecutive_files_on_one_side(tmp_path):
    root = make_imagefolder(tmp_path / "d", classes=("a", "b"), per_class=40)
    shutil.copy(root / "a" / "a_3.png", root / "a" / "a_dup.png")  # byte-identical pair
    index = discover(root)
    s = make_split(index, (0.7, 0.1, 0.2), seed=0, by="sequence")
    assert s == make_split(index, (0.7, 0.1, 0.2), seed=0, by="sequence")
    assert s != make_split(index, (0.7, 0.1, 0.2), seed=1, by="sequence")
    assert s != make_split(index, (0.7, 0.1, 0.2), seed=0)  # not the file split
    assert sorted(i for v in s.values() for i in v) == list(range(len(index.samples)))
    side = {index.samples[i].path: name for name, idx in s.items() for i in idx}
    assert side["a/a_3.png"] == side["a/a_dup.png"]
    for c in ("a", "b"):
        # b_0..b_39 in number order (b_10 after b_9): ten runs of four files, test two runs, val one
        order = [side[f"{c}/{c}_{i}.png"] for i in range(40)]
        if c == "b":
            runs = [order[4 * k : 4 * k + 4] for k in range(10)]
            assert all(len(set(r)) == 1 for r in runs)
            assert [r[0] for r in runs].count("test") == 2 and [r[0] for r in runs].count("val") == 1
        # few switches between sides along the sequence, where a file split has many
        switches = sum(a != b for a, b in zip(order, order[1:], strict=False))
        assert switches <= 6


def test_a_larger_validation_split_keeps_the_test_images(tmp_path):
    # README: `data.split=[0.6,0.2,0.2]` takes validation from training, never from test
    root = make_imagefolder(tmp_path / "d", classes=("a", "b"), per_class=30)
    index = discover(root)
    small, large = make_split(index, (0.7, 0.1, 0.2), seed=0), make_split(index, (0.6, 0.2, 0.2), seed=0)
    assert large["test"] == small["test"]
    assert set(small["val"]) < set(large["val"]) and len(large["val"]) == 2 * len(small["val"])
    assert set(large["train"]) < set(small["train"])


def test_split_file_written_once_and_reused(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=10)
    run = tmp_path / "run"
    run.mkdir()
    cfg = DataConfig(path=str(root), img_size=16)
    d1 = load_data(cfg, run, progress=False)
    text = (run / "split.json").read_text()
    d2 = load_data(DataConfig(path=str(root), img_size=16, seed=5), run, progress=False)  # reuses the file
    assert d1.split == d2.split and (run / "split.json").read_text() == text
    assert d1.images.shape == (30, 16, 16, 3) and d1.images.dtype == np.uint8
    write_image(root / "a" / "a_new.png", seed=999, ext=".png")
    with pytest.raises(DataError, match="different copy of the dataset"):
        load_data(cfg, run, progress=False)


def test_train_dataset_augments_but_keeps_shape():
    images = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    from slimvit.config import TrainConfig

    ds = TrainDataset(images, np.arange(4), (0.5,) * 3, (0.5,) * 3, TrainConfig(crop_padding=2))
    x, y = ds[1]
    assert x.shape == (3, 16, 16) and int(y) == 1
    assert x.abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize("policy", ["trivial", "randaugment"])
def test_augment_policy_changes_pixel_values_and_follows_the_seed(policy):
    import torch

    from slimvit.config import TrainConfig

    images = np.random.default_rng(0).integers(0, 255, (1, 16, 16, 3), dtype=np.uint8)
    plain = dict(crop="none", flips=False, rot90=False)

    def views(cfg, seed):
        torch.manual_seed(seed)
        ds = TrainDataset(images, np.arange(1), (0.5,) * 3, (0.5,) * 3, cfg)
        return torch.stack([ds[0][0] for _ in range(12)])

    base = views(TrainConfig(**plain), 0)
    assert torch.equal(base[0], base[-1])  # nothing random left without the policy
    aug = views(TrainConfig(**plain, augment=policy), 0)
    assert aug.shape == base.shape
    # most views altered (identity is one of the policy's ops)
    assert sum(not torch.equal(v, base[0]) for v in aug) >= 6
    assert torch.equal(aug, views(TrainConfig(**plain, augment=policy), 0))  # same seed, same views


def test_bad_augment_policy_is_refused():
    from slimvit.config import TrainConfig
    from slimvit.errors import ConfigError

    with pytest.raises(ConfigError, match="train.augment"):
        TrainConfig(augment="autoaugment")


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is empty"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("x")), "unknown dataset layout"),
        (lambda p: (make_imagefolder(p, per_class=3), (p / "empty_class").mkdir()), "has no images"),
        (lambda p: make_imagefolder(p, classes=("only",), per_class=3), "single class"),
    ],
)
def test_bad_datasets(tmp_path, setup, match):
    path = tmp_path / "ds"
    setup(path)
    with pytest.raises(DataError, match=match):
        discover(path)


def test_corrupt_image_is_named(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=5)
    (root / "b" / "b_broken.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"cannot decode image '.*b_broken.png'"):
        load_data(DataConfig(path=str(root), img_size=16), None, progress=False)


def test_real_neu_det(neu_det, tmp_path):
    data = load_data(DataConfig(path=str(neu_det), img_size=32), tmp_path, progress=False)
    info = describe(data)
    assert info["layout"] == "neu-det" and info["images"] == 1800
    assert info["counts"] == dict.fromkeys(data.classes, 300) and len(data.classes) == 6
    assert info["split"] == {"train": 1260, "val": 180, "test": 360}
    assert info["duplicate_groups"] == 1  # patches_101 / patches_105
    paths = {s: {p.name for p in data.paths(s)} for s in ("train", "val", "test")}
    assert sum("patches_101.jpg" in v and "patches_105.jpg" in v for v in paths.values()) == 1


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "slimvit", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_data_on_real_dataset_is_stable(neu_det, tmp_path):
    r1 = _cli("data", "--data", str(neu_det), "--out", str(tmp_path / "r1"), "--set", "data.img_size=32")
    r2 = _cli("data", "--data", str(neu_det), "--out", str(tmp_path / "r2"), "--set", "data.img_size=32")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert "1260/180/360" in r1.stdout and "1800" in r1.stdout
    assert (tmp_path / "r1" / "split.json").read_text() == (tmp_path / "r2" / "split.json").read_text()
    assert (tmp_path / "r1" / "config.yaml").exists()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--data", "/nonexistent/ds"], "does not exist"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--set", "train.epochs=zero"], "must be an integer"),
        (["--set", "bogus.key=1"], "unknown section 'bogus'"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, args, match):
    r = _cli("data", "--out", str(tmp_path / "r"), *args)
    assert r.returncode == 2
    assert match in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_subset_draws_the_counts_atomically(tmp_path):
    from slimvit.data import make_subset

    src = make_imagefolder(tmp_path / "src", classes=("a", "b", "c"), per_class=10)
    rec = make_subset(src, tmp_path / "sub", [10, 4, 2], seed=1)
    index = discover(tmp_path / "sub")
    assert index.counts() == {"a": 10, "b": 4, "c": 2} and rec["counts"] == index.counts()
    again = make_subset(src, tmp_path / "sub2", [10, 4, 2], seed=1)
    assert again["files"] == rec["files"]  # seeded
    with pytest.raises(DataError, match="already exists"):
        make_subset(src, tmp_path / "sub", [1, 1, 1])
    with pytest.raises(DataError, match="3 classes"):
        make_subset(src, tmp_path / "x", [1, 1])
    with pytest.raises(DataError, match="cannot take 11"):
        make_subset(src, tmp_path / "x", [11, 1, 1])
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))
