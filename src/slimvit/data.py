"""NEU-DET and other image-classification layouts -> one indexed dataset, a fixed split, tensors.

Layouts (detected in this order):

- ``neu-det``: ``IMAGES/<class>_<n>.jpg`` + ``ANNOTATIONS/<class>_<n>.xml`` (Pascal VOC boxes).
- ``kaggle``: ``{train,validation}/images/<class>/*.jpg`` (+ ``annotations/*.xml``); the two
  folders are pooled and re-split, so every layout gets the same train/val/test protocol.
- ``imagefolder``: ``<class>/*.{jpg,png,bmp,...}``.
- ``flat``: one folder of ``<class>_<n>.<ext>`` files (e.g. NEU-CLS).

The split is stratified per class, seeded, keeps byte-identical files on one side (NEU-DET ships
such a pair), and is written once to ``split.json`` in the run folder; every stage reuses it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slimvit.config import DataConfig
from slimvit.errors import DataError
from slimvit.io import atomic_write_json, is_main_process, read_json
from slimvit.layout import SPLIT
from slimvit.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, load_rgb

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
KAGGLE_SPLITS = ("train", "validation", "valid", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: str
    """Path relative to the dataset root (POSIX separators)."""
    label: int
    boxes: tuple = ()
    """Pascal VOC boxes as (name, xmin, ymin, xmax, ymax) tuples, where the layout has them."""


@dataclass
class DatasetIndex:
    root: Path
    layout: str
    classes: list[str]
    samples: list[Sample]
    hashes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        c = Counter(s.label for s in self.samples)
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}


def resolve_data_path(path: str | os.PathLike | None) -> Path:
    """`--data`, else $SLIMVIT_DATA, else data/NEU-DET under the working directory."""
    if path:
        return Path(path)
    env = os.environ.get("SLIMVIT_DATA")
    return Path(env) if env else Path("data") / "NEU-DET"


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _prefix_class(stem: str) -> str:
    """`rolled-in_scale_12` -> `rolled-in_scale`; a name without `_<n>` is its own class."""
    head, sep, tail = stem.rpartition("_")
    return head if sep and tail.isdigit() and head else stem


def _parse_voc(path: Path) -> tuple:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataError(f"annotation '{path}' is not valid Pascal VOC XML ({e}); fix or remove it") from None
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            coords = tuple(int(float(bb.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise DataError(f"annotation '{path}' has a box without numeric xmin/ymin/xmax/ymax") from None
        boxes.append((obj.findtext("name") or "", *coords))
    return tuple(boxes)


def _index_from_files(
    root: Path, files: list[tuple[Path, str]], layout: str, ann_dirs: list[Path]
) -> DatasetIndex:
    """files: (absolute path, class name). Classes are sorted by name."""
    if not files:
        raise DataError(
            f"no images found in '{root}' ({layout} layout); expected {', '.join(IMAGE_EXTENSIONS)} files"
        )
    classes = sorted({c for _, c in files})
    cid = {c: i for i, c in enumerate(classes)}
    samples = []
    for p, c in sorted(files, key=lambda t: t[0].relative_to(root).as_posix()):
        boxes: tuple = ()
        for d in ann_dirs:
            xml = d / f"{p.stem}.xml"
            if xml.is_file():
                boxes = _parse_voc(xml)
                break
        samples.append(Sample(p.relative_to(root).as_posix(), cid[c], boxes))
    return DatasetIndex(root, layout, classes, samples)


def _discover_neu(root: Path) -> DatasetIndex:
    img_dir = root / "IMAGES"
    files = [(p, _prefix_class(p.stem)) for p in img_dir.iterdir() if _is_image(p)]
    return _index_from_files(root, files, "neu-det", [root / "ANNOTATIONS"])


def _discover_kaggle(root: Path, split_dirs: list[Path]) -> DatasetIndex:
    files, ann_dirs, empty = [], [], []
    for sd in split_dirs:
        ann_dirs.append(sd / "annotations")
        for cdir in sorted(p for p in (sd / "images").iterdir() if p.is_dir()):
            imgs = [p for p in cdir.iterdir() if _is_image(p)]
            if not imgs:
                empty.append(cdir)
            files += [(p, cdir.name) for p in imgs]
    if empty:
        raise DataError(f"class folder '{empty[0]}' has no images; add images or remove the folder")
    return _index_from_files(root, files, "kaggle", ann_dirs)


def _discover_imagefolder(root: Path, class_dirs: list[Path]) -> DatasetIndex:
    files = []
    for cdir in class_dirs:
        imgs = [p for p in cdir.rglob("*") if _is_image(p)]
        if not imgs:
            raise DataError(f"class folder '{cdir}' has no images; add images or remove the folder")
        files += [(p, cdir.name) for p in imgs]
    return _index_from_files(root, files, "imagefolder", [])


def discover(path: str | os.PathLike) -> DatasetIndex:
    """Find the layout of `path` and index every image with its class (and boxes)."""
    root = Path(path)
    if not root.exists():
        raise DataError(
            f"dataset folder '{root}' does not exist; pass --data PATH or set SLIMVIT_DATA "
            "(see README, 'Getting NEU-DET')"
        )
    if not root.is_dir():
        raise DataError(f"--data '{root}' is a file; it must be the dataset folder")
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise DataError(
            f"dataset folder '{root}' is empty; put NEU-DET (IMAGES/, ANNOTATIONS/) or <class>/ folders in it"
        )
    if (root / "IMAGES").is_dir():
        index = _discover_neu(root)
    else:
        split_dirs = [root / s for s in KAGGLE_SPLITS if (root / s / "images").is_dir()]
        dirs = sorted(p for p in entries if p.is_dir())
        if split_dirs:
            index = _discover_kaggle(root, split_dirs)
        elif dirs and any(_is_image(q) for d in dirs for q in d.rglob("*")):
            index = _discover_imagefolder(
                root, [d for d in dirs if d.name not in ("ANNOTATIONS", "annotations")]
            )
        elif any(_is_image(p) for p in entries):
            files = [(p, _prefix_class(p.stem)) for p in entries if _is_image(p)]
            index = _index_from_files(root, files, "flat", [])
        else:
            raise DataError(
                f"unknown dataset layout in '{root}': expected IMAGES/ + ANNOTATIONS/ (NEU-DET), "
                "train|validation/images/<class>/ (Kaggle), <class>/<images> (ImageFolder), "
                "or <class>_<n>.<ext> files"
            )
    if len(index.classes) < 2:
        raise DataError(
            f"'{root}' has a single class ({index.classes[0]}); classification needs at least two"
        )
    index.hashes = [hashlib.sha256((root / s.path).read_bytes()).hexdigest() for s in index.samples]
    return index


def fingerprint(index: DatasetIndex) -> str:
    h = hashlib.sha256()
    for s, fh in zip(index.samples, index.hashes, strict=True):
        h.update(f"{s.path}\t{index.classes[s.label]}\t{fh}\n".encode())
    return h.hexdigest()


SEQUENCE_RUNS = 10
"""`data.split_by: sequence` cuts each class's files, in name order, into this many runs of consecutive files (more
where a split fraction is below a tenth), so the default 70/10/20 gives test two runs and validation one."""


def _natural_key(path: str) -> list:
    """`crazing_2.jpg` before `crazing_10.jpg`: digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def make_split(
    index: DatasetIndex, fractions: tuple[float, float, float], seed: int, by: str = "file"
) -> dict[str, list[int]]:
    """Stratified, seeded split into sample indices; byte-identical files stay on one side. `by="sequence"`
    keeps runs of consecutive files (name order) on one side, so images taken one after another (the same
    strip, the same coil) are not split between training and test."""
    groups: dict[str, list[int]] = {}
    for i, fh in enumerate(index.hashes):
        groups.setdefault(fh, []).append(i)
    by_class: dict[int, list[list[int]]] = {}
    for members in groups.values():
        by_class.setdefault(index.samples[members[0]].label, []).append(members)
    runs = max(SEQUENCE_RUNS, round(1 / min(fractions)))
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for label in sorted(by_class):
        class_groups = sorted(by_class[label], key=lambda g: index.samples[g[0]].path)
        n = sum(len(g) for g in class_groups)
        if by == "sequence":  # a duplicate pair joins the run of its first file in name order
            class_groups.sort(key=lambda g: _natural_key(index.samples[g[0]].path))
            chunks: list[list[int]] = [[] for _ in range(min(runs, len(class_groups)))]
            for j, g in enumerate(class_groups):
                chunks[j * len(chunks) // len(class_groups)] += g
            class_groups = chunks
        random.Random(f"{seed}:{index.classes[label]}").shuffle(class_groups)
        n_test = round(fractions[2] * n)
        n_val = round(fractions[1] * n)
        targets = {"test": n_test, "val": n_val, "train": n - n_test - n_val}
        filled = dict.fromkeys(SPLITS, 0)
        for g in class_groups:
            # The first split (test, val, train) with room for the whole group takes it.
            dest = next((s for s in ("test", "val", "train") if filled[s] + len(g) <= targets[s]), "train")
            out[dest] += g
            filled[dest] += len(g)
    return {s: sorted(v) for s, v in out.items()}


def load_or_create_split(index: DatasetIndex, cfg: DataConfig, run_dir: Path | None) -> dict[str, list[int]]:
    """Read `split.json` from the run folder, or make the split and write it there once."""
    fp = fingerprint(index)
    path = run_dir / SPLIT if run_dir is not None else None
    if path is not None and path.exists():
        try:
            saved = read_json(path)
            by_path = {s.path: i for i, s in enumerate(index.samples)}
            split = {s: [by_path[p] for p in saved[s]] for s in SPLITS}
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(
                f"'{path}' does not match the dataset at '{index.root}' (missing {e}); "
                "use another --out or delete split.json to make a new split"
            ) from None
        if saved.get("fingerprint") != fp:
            raise DataError(
                f"'{path}' was made for a different copy of the dataset (fingerprint differs); "
                "use another --out or delete split.json to make a new split"
            )
        return split
    # deterministic: every rank computes the same
    split = make_split(index, cfg.split, cfg.seed, cfg.split_by)
    check_split_classes(index, split)  # before the write: a refused split must not be kept for later
    if path is not None and is_main_process():
        atomic_write_json(
            path,
            {
                "seed": cfg.seed,
                "fractions": list(cfg.split),
                "split_by": cfg.split_by,
                "classes": index.classes,
                "fingerprint": fp,
                **{s: [index.samples[i].path for i in split[s]] for s in SPLITS},
            },
        )
    return split


def check_split_classes(index: DatasetIndex, split: dict[str, list[int]]) -> None:
    """Every class must have images in the train and test splits (val may lack a rare class)."""
    counts = index.counts()
    for s in SPLITS:
        present = {index.samples[i].label for i in split[s]}
        if len(present) < len(index.classes) and s != "val":
            missing = [c for i, c in enumerate(index.classes) if i not in present]
            raise DataError(
                f"the {s} split has no images of class '{missing[0]}' ({counts[missing[0]]} image(s) "
                f"in all); the class needs more images"
            )


def decode_all(index: DatasetIndex, size: int, progress: bool = True) -> np.ndarray:
    """Decode every image to uint8 (N, size, size, 3); one error lists every unreadable file."""
    from tqdm.auto import tqdm

    paths = [index.root / s.path for s in index.samples]
    out = np.empty((len(paths), size, size, 3), np.uint8)
    bad: list[tuple[str, str]] = []

    def work(i: int) -> None:
        try:
            out[i] = load_rgb(paths[i], size)
        except ImageDecodeError as e:
            bad.append((str(paths[i]), str(e)))

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:
        list(
            tqdm(
                ex.map(work, range(len(paths))),
                total=len(paths),
                desc="decode",
                disable=not (progress and sys.stderr.isatty()),
                leave=False,
            )
        )
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{sorted(bad)[0][1]}{more}; remove or replace the file(s)")
    return out


@dataclass
class Data:
    """Everything the stages need: the index, the split, and decoded images in memory."""

    index: DatasetIndex
    split: dict[str, list[int]]
    images: np.ndarray
    """uint8 (N, H, W, 3) at the run's image size."""
    labels: np.ndarray
    img_size: int

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(self.split[split], dtype=np.int64)
        return self.images[idx], self.labels[idx]

    def paths(self, split: str) -> list[Path]:
        return [self.index.root / self.index.samples[i].path for i in self.split[split]]


def load_data(
    cfg: DataConfig, run_dir: Path | None = None, path: str | None = None, progress: bool = True
) -> Data:
    """Index, split and decode the dataset named by `path`, `cfg.path`, $SLIMVIT_DATA or the default."""
    root = resolve_data_path(path or cfg.path)
    index = discover(root)
    split = load_or_create_split(index, cfg, run_dir)
    check_split_classes(index, split)  # again for a split.json written by an older version
    images = decode_all(index, cfg.img_size, progress=progress)
    labels = np.asarray([s.label for s in index.samples], dtype=np.int64)
    return Data(index, split, images, labels, cfg.img_size)


def describe(data: Data) -> dict:
    """Facts `slimvit data` prints and the report quotes."""
    from PIL import Image

    sizes: Counter = Counter()
    for s in data.index.samples[:: max(1, len(data.index.samples) // 200)]:
        with Image.open(data.index.root / s.path) as im:
            sizes[f"{im.size[0]}x{im.size[1]}"] += 1
    counts = data.index.counts()
    per_split = {
        s: {c: int(np.sum(data.labels[data.split[s]] == i)) for i, c in enumerate(data.classes)}
        for s in SPLITS
    }
    hashes = Counter(data.index.hashes)
    return {
        "root": str(data.index.root),
        "layout": data.index.layout,
        "images": len(data.index.samples),
        "classes": data.classes,
        "counts": counts,
        "image_sizes": dict(sizes.most_common()),
        "boxes": sum(len(s.boxes) for s in data.index.samples),
        "duplicate_groups": sum(1 for v in hashes.values() if v > 1),
        "split": {s: len(data.split[s]) for s in SPLITS},
        "split_per_class": per_split,
    }


def make_subset(src: str | os.PathLike, out: str | os.PathLike, counts: list[int], seed: int = 0) -> dict:
    """Copy a seeded subset of `src` with `counts[i]` images of its i-th class (sorted names) into `out`
    as an ImageFolder (<class>/<file>), e.g. an imbalanced NEU-DET. Written to a temporary folder and
    renamed, so `out` is complete or absent. Returns what SUBSET.json in `out` records."""
    index = discover(src)
    out = Path(out)
    if len(counts) != len(index.classes):
        raise DataError(
            f"--counts has {len(counts)} numbers; '{src}' has {len(index.classes)} classes ({', '.join(index.classes)})"
        )
    have = index.counts()
    for c, n in zip(index.classes, counts, strict=True):
        if not 1 <= n <= have[c]:
            raise DataError(
                f"class '{c}' has {have[c]} images; cannot take {n} (each count must be 1..{have[c]})"
            )
    if out.exists():
        raise DataError(f"'{out}' already exists; remove it or choose another folder")
    import shutil

    rng = random.Random(seed)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    picked = {}
    for label, (c, n) in enumerate(zip(index.classes, counts, strict=True)):
        members = sorted(s.path for s in index.samples if s.label == label)
        picked[c] = sorted(rng.sample(members, n))
        (tmp / c).mkdir(parents=True)
        for rel in picked[c]:
            shutil.copyfile(index.root / rel, tmp / c / Path(rel).name)
    record = {
        "source": str(Path(src).resolve()),
        "seed": seed,
        "counts": dict(zip(index.classes, counts, strict=True)),
        "files": picked,
    }
    atomic_write_json(tmp / "SUBSET.json", record)
    tmp.rename(out)
    return record


# --------------------------------------------------------------------------- torch side


def to_tensor_batch(images: np.ndarray, mean, std):
    """uint8 (N, H, W, 3) -> normalised float32 torch (N, 3, H, W), via the shared numpy path."""
    import torch

    from slimvit.preprocess import normalize

    return torch.from_numpy(normalize(images, mean, std))


class TrainDataset:
    """Augmented training samples from the in-memory uint8 array.

    Augmentations suit texture/defect images: flips, 90-degree rotations, pad-and-crop or
    random resized crop, and optionally a TrivialAugment / RandAugment policy before them.
    Randomness comes from torch's global RNG, which the training loop seeds per epoch, so a
    resumed run sees the same augmentations as an uninterrupted one.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, train_cfg) -> None:
        import torch

        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
        self.labels = torch.from_numpy(labels)
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.std = torch.tensor(std).view(3, 1, 1) * 255
        self.cfg = train_cfg
        self._rrc = self._policy = None
        if train_cfg.crop == "rrc" or train_cfg.augment != "none":
            from torchvision.transforms import v2

            if train_cfg.crop == "rrc":
                size = images.shape[1]
                self._rrc = v2.RandomResizedCrop(size, scale=tuple(train_cfg.rrc_scale), antialias=True)
            if train_cfg.augment == "trivial":
                self._policy = v2.TrivialAugmentWide()
            elif train_cfg.augment == "randaugment":
                self._policy = v2.RandAugment()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        import torch
        import torch.nn.functional as F

        x = self.images[i]
        cfg = self.cfg
        if self._policy is not None:
            x = self._policy(x)  # on the uint8 image, as the policies' magnitudes assume
        if cfg.crop == "pad" and cfg.crop_padding > 0:
            p = cfg.crop_padding
            h, w = x.shape[1:]
            xp = F.pad(x.unsqueeze(0).float(), (p, p, p, p), mode="reflect").squeeze(0)
            dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = xp[:, dy : dy + h, dx : dx + w]
        elif self._rrc is not None:
            x = self._rrc(x)
        if cfg.flips:
            if torch.rand(()) < 0.5:
                x = x.flip(2)
            if torch.rand(()) < 0.5:
                x = x.flip(1)
        if cfg.rot90:
            k = int(torch.randint(0, 4, ()))
            if k:
                x = torch.rot90(x, k, (1, 2))
        x = (x.float() - self.mean) / self.std
        return x.contiguous(), self.labels[i]


class EvalDataset:
    """Un-augmented samples, normalised by the same numpy code the edge path uses."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std) -> None:
        import torch

        self.x = to_tensor_batch(images, mean, std)
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.x[i], self.labels[i]
