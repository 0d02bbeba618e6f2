"""Where a model looks, from forward passes only: occlusion heatmaps (Zeiler & Fergus 2014) that work for
whatever was deployed (ONNX Runtime or OpenVINO, FP32, FP16 or INT8, a CNN or a ViT), since a fused or
quantized graph exposes neither gradients nor attention weights. numpy + Pillow only (no torch): it runs
on the edge box in `slimvit predict --explain DIR`.

For an image at the model's input size, each cell of a `grid` x `grid` partition (6 x 6 at 96 px: the
ViT's own token grid) is replaced by the dataset mean (zero after normalisation), every occluded copy is
classified in one batched call, and a cell's heat is how much hiding it lowers the (calibrated)
log-probability of the class the model named. The localisation scores compare that map with defect boxes:
the pointing game (is the hottest cell inside a box) and the share of the heat inside the boxes, beside
the chance level (the boxes' share of the image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimvit.preprocess import normalize

GRID = 6


def occlusion(run, meta: dict, pixels: np.ndarray, grid: int = GRID) -> dict:
    """The occlusion heatmap of one uint8 (H, W, 3) image at the model's input size.

    Args:
        run: float32 (N, 3, H, W) -> logits (a `runtime.runner` predictor).
        meta: the model's slimvit metadata (mean, std, classes, temperature).

    Returns:
        {"heat": (grid, grid) float, >= 0, "class": index named, "probs": class probabilities}.
    """
    h, w = pixels.shape[:2]
    x = normalize(pixels[None], meta["mean"], meta["std"])  # (1, 3, H, W)
    cells = grid * grid
    batch = np.repeat(x, cells + 1, axis=0)
    ys = np.linspace(0, h, grid + 1).round().astype(int)
    xs = np.linspace(0, w, grid + 1).round().astype(int)
    for k in range(cells):
        i, j = divmod(k, grid)
        batch[k + 1, :, ys[i] : ys[i + 1], xs[j] : xs[j + 1]] = 0.0  # the dataset mean
    logits = np.asarray(run(batch), dtype=np.float64) / float(meta.get("temperature") or 1.0)
    logits -= logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    c = int(logp[0].argmax())
    # the fall in log-probability, not probability: a model 99.99% sure still shows which cells it needs
    heat = np.clip(logp[0, c] - logp[1:, c], 0, None).reshape(grid, grid)
    return {"heat": heat, "class": c, "probs": np.exp(logp[0])}


def upsample(heat: np.ndarray, size: tuple[int, int], smooth: bool = False) -> np.ndarray:
    """The (grid, grid) map at (width, height) pixels: each cell a block (what the occlusion measured,
    for scoring), or bilinear (`smooth`, for drawing)."""
    from PIL import Image

    w, h = size
    how = Image.BILINEAR if smooth else Image.NEAREST
    im = Image.fromarray(heat.astype(np.float32), mode="F").resize((w, h), how)
    return np.asarray(im, dtype=np.float64)


def localisation(heat: np.ndarray, boxes, size: tuple[int, int]) -> dict | None:
    """Pointing game, heat share inside the boxes and the chance level, for boxes (name, xmin, ymin, xmax,
    ymax) in the pixels of an image of `size` (width, height); None without boxes."""
    if not boxes:
        return None
    w, h = size
    inside = np.zeros((h, w), bool)
    for _, x0, y0, x1, y1 in boxes:
        inside[max(0, y0) : min(h, y1 + 1), max(0, x0) : min(w, x1 + 1)] = True
    big = upsample(heat, size)
    total = big.sum()
    iy, ix = np.unravel_index(int(np.argmax(big)), big.shape)
    return {
        "hit": bool(inside[iy, ix]) if total > 0 else False,
        "energy": float(big[inside].sum() / total) if total > 0 else 0.0,
        "chance": float(inside.mean()),
    }


def _colour(heat: np.ndarray) -> np.ndarray:
    """A black-red-yellow-white ramp of a [0, 1] map: uint8 (H, W, 3)."""
    t = np.clip(heat, 0, 1)[..., None]
    r = np.clip(3 * t, 0, 1)
    g = np.clip(3 * t - 1, 0, 1)
    b = np.clip(3 * t - 2, 0, 1)
    return (255 * np.concatenate([r, g, b], axis=-1)).astype(np.uint8)


def render(image_path: str | Path, heat: np.ndarray, caption: str, out: str | Path, width: int = 256) -> None:
    """The image, the heatmap over it and a caption, written as a PNG (atomically)."""
    from PIL import Image, ImageDraw

    from slimvit.io import atomic_path
    from slimvit.preprocess import open_rgb

    base = open_rgb(image_path)
    scale = width / base.width
    base = base.resize((width, max(1, round(base.height * scale))), Image.BILINEAR)
    m = heat / heat.max() if heat.max() > 0 else heat
    overlay = Image.fromarray(_colour(upsample(m, base.size, smooth=True)))
    blended = Image.blend(base, overlay, 0.45)
    canvas = Image.new("RGB", (base.width * 2, base.height + 22), "white")
    canvas.paste(base, (0, 0))
    canvas.paste(blended, (base.width, 0))
    ImageDraw.Draw(canvas).text((4, base.height + 5), caption, fill="black")
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG", compress_level=1)  # zlib level 6 took 38 of 46 ms a heatmap


def localise(
    model: str | Path, root: Path, paths: list[str], boxes: list, threads: int = 2
) -> list[dict | None]:
    """Each image's heatmap scored against its boxes (None for an image without boxes or not readable)."""
    from PIL import Image

    from slimvit import runtime
    from slimvit.preprocess import ImageDecodeError, load_rgb

    run, meta = runtime.runner(model, threads)
    size = int(meta["input_size"][-1])
    out: list[dict | None] = []
    for rel, bx in zip(paths, boxes, strict=True):
        if not bx:
            out.append(None)
            continue
        try:
            pixels = load_rgb(root / rel, size)
            with Image.open(root / rel) as im:
                wh = im.size
        except (ImageDecodeError, OSError):
            out.append(None)
            continue
        r = occlusion(run, meta, pixels)
        out.append({**localisation(r["heat"], [tuple(b) for b in bx], wh), "class": r["class"]})
    return out


def explain_files(model: str | Path, paths: list[Path], out_dir: str | Path, threads: int = 2) -> dict:
    """A heatmap PNG per decodable image in `out_dir` (named after the image, numbered where names
    collide); returns the files written, those that failed and the milliseconds per image (decoding,
    the batched occlusion call and drawing)."""
    import time

    from slimvit import runtime
    from slimvit.preprocess import ImageDecodeError, load_rgb

    run, meta = runtime.runner(model, threads)  # an ONNX file (predict resolves a deploy folder to it)
    size = int(meta["input_size"][-1])
    threshold = meta.get("review_threshold")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, failed, used = [], [], set()
    t0 = time.perf_counter()
    for p in paths:
        try:
            pixels = load_rgb(p, size)
        except ImageDecodeError as e:
            failed.append({"path": str(p), "error": str(e)})
            continue
        r = occlusion(run, meta, pixels)
        conf = float(r["probs"][r["class"]])
        flag = " review" if threshold is not None and conf < threshold else ""
        name = Path(p).stem
        k = 1
        while name in used:
            k += 1
            name = f"{Path(p).stem}-{k}"
        used.add(name)
        dst = out_dir / f"{name}.png"
        render(p, r["heat"], f"{meta['classes'][r['class']]} {conf:.2f}{flag}", dst)
        written.append(str(dst))
    ms = 1000 * (time.perf_counter() - t0) / max(1, len(written))
    return {"written": written, "failed": failed, "ms_per_image": ms, "grid": GRID}
