"""Occlusion heatmaps (forward passes only), their localisation scores, and `predict --explain` on the
core install (no torch, no matplotlib)."""

import numpy as np
from PIL import Image
from test_edge import _blocked

from slimvit.explain import localisation, occlusion

META = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "classes": ["bright", "dark"]}


def _top_left_model(x: np.ndarray) -> np.ndarray:
    """A 'model' that only looks at the top-left quadrant: its evidence is that quadrant's brightness."""
    h, w = x.shape[2:]
    m = x[:, :, : h // 2, : w // 2].mean((1, 2, 3))
    return np.stack([4 * m, -4 * m], 1)


def test_a_model_that_looks_at_one_quadrant_peaks_there():
    pixels = np.full((96, 96, 3), 230, np.uint8)
    r = occlusion(_top_left_model, META, pixels)
    heat = r["heat"]
    assert heat.shape == (6, 6) and r["class"] == 0
    iy, ix = np.unravel_index(heat.argmax(), heat.shape)
    assert iy < 3 and ix < 3  # the hottest cell lies in the top-left quadrant
    assert heat[:3, :3].sum() > 0 and heat[3:, :].sum() == 0 and heat[:, 3:].sum() == 0


def test_localisation_scores_a_box_on_the_hot_quadrant():
    pixels = np.full((96, 96, 3), 230, np.uint8)
    heat = occlusion(_top_left_model, META, pixels)["heat"]
    hit = localisation(heat, [("defect", 0, 0, 99, 99)], (200, 200))  # the top-left quarter of 200 x 200
    assert hit["hit"] and hit["energy"] == 1.0 and abs(hit["chance"] - 0.25) < 1e-9
    miss = localisation(heat, [("defect", 120, 120, 199, 199)], (200, 200))
    assert not miss["hit"] and miss["energy"] == 0.0
    assert localisation(heat, [], (200, 200)) is None


def test_predict_explain_writes_one_png_per_image_without_torch(tmp_path):
    from tiny_onnx import write_tiny_onnx

    model = tmp_path / "deploy" / "model.onnx"
    write_tiny_onnx(model)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, v in enumerate((20, 120, 220)):
        Image.fromarray(np.full((40, 40, 3), v, np.uint8)).save(imgs / f"{i}.png")
    out = tmp_path / "heat"
    r = _blocked(["predict", str(model.parent), str(imgs), "--explain", str(out)])  # torch etc. unimportable
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png"]
    assert "heatmaps: 3 written" in r.stderr and "ms per image" in r.stderr
    with Image.open(out / "0.png") as im:
        assert im.width == 512  # the image and the heatmap over it, side by side


def test_localisation_is_scored_on_an_even_sample_of_the_boxed_test_images():
    from slimvit.trust import localised

    boxes = [[("d", 0, 0, 9, 9)] if i % 3 else [] for i in range(300)]  # 200 boxed, in "class order"
    idx = localised({"boxes": boxes}, limit=50)
    assert len(idx) == 50 and len(set(idx)) == 50
    assert all(boxes[i] for i in idx)
    assert idx[0] < 10 and idx[-1] > 280  # spread over the whole list, so the last class is sampled too
    assert localised({"boxes": boxes}, limit=500) == [i for i in range(300) if i % 3]
