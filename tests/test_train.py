import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slimvit import models
from slimvit.config import DistillConfig, TrainConfig
from slimvit.data import Data, DatasetIndex, Sample
from slimvit.errors import ModelError
from slimvit.io import read_jsonl
from slimvit.train import FitOptions, fit

CLASSES = ["a", "b", "c"]
TINY_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 3}


def synthetic_data(n_per_class: int = 24, size: int = 32, seed: int = 0) -> Data:
    """Three visually distinct classes (dark, bright, striped) so a tiny model can learn them."""
    rng = np.random.default_rng(seed)
    images, labels, samples = [], [], []
    for c in range(3):
        for i in range(n_per_class):
            img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            if c == 1:
                img += 150
            if c == 2:
                img[:, ::4] = 255
            images.append(img)
            labels.append(c)
            samples.append(Sample(f"{CLASSES[c]}/{i}.png", c))
    idx = np.arange(len(labels))
    split = {"train": [], "val": [], "test": []}
    for c in range(3):
        members = idx[np.asarray(labels) == c].tolist()
        split["train"] += members[: int(0.6 * n_per_class)]
        split["val"] += members[int(0.6 * n_per_class) : int(0.8 * n_per_class)]
        split["test"] += members[int(0.8 * n_per_class) :]
    index = DatasetIndex(Path("."), "synthetic", CLASSES, samples, [str(i) for i in idx])
    return Data(index, split, np.stack(images), np.asarray(labels, dtype=np.int64), size)


def tiny_student(size=32):
    spec = models.make_spec("vit_tiny_patch16_224", 3, CLASSES, size, "conv", TINY_VIT)
    torch.manual_seed(0)
    return models.build(spec), spec


FAST = TrainConfig(
    epochs=2, batch_size=16, lr=2e-3, warmup_epochs=0, crop_padding=2, threads=2, precision="no"
)


def test_loss_decreases_and_artifacts(tmp_path):
    data = synthetic_data()
    model, spec = tiny_student()
    model, summary = fit(model, spec, data, FAST, tmp_path / "s", FitOptions(epochs=4, lr=2e-3))
    rows = read_jsonl(tmp_path / "s" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert summary["best_val_acc"] == max(r["val_acc"] for r in rows)
    assert summary["best_val_acc"] > 0.6  # three easy classes
    for f in (
        "model.safetensors",
        "model.json",
        "train.json",
        "checkpoint.pt",
    ):
        assert (tmp_path / "s" / f).exists(), f


def test_ema_warms_up_instead_of_keeping_the_random_initialisation(tmp_path):
    # 60 steps at decay 0.999: a fixed-decay EMA is still 94% the random initialisation (best validation 0.67,
    # measured); warmed up, the EMA the run selects and saves learns like the model, a few epochs behind
    data = synthetic_data()
    model, spec = tiny_student()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    tcfg = dataclasses.replace(FAST, ema=True, ema_decay=0.999)
    model, summary = fit(model, spec, data, tcfg, tmp_path / "s", FitOptions(epochs=20, lr=2e-3))
    assert summary["best_val_acc"] >= 0.9
    moved = [
        k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, init[k])
    ]
    assert len(moved) > len(init) // 2


def test_checkpoint_round_trip_identical_outputs(tmp_path):
    data = synthetic_data(n_per_class=8)
    model, spec = tiny_student()
    model, _ = fit(model, spec, data, FAST, tmp_path / "s", FitOptions(epochs=1, lr=1e-3))
    loaded, spec2 = models.load(tmp_path / "s")
    assert spec2 == spec and list(spec2.classes) == CLASSES and spec2.stem == "conv"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


class _Killed(Exception):
    pass


def _stop_after_checkpoints(monkeypatch, n: int) -> None:
    """Raise right after the n-th epoch checkpoint, as a kill between two epochs would stop training."""
    from slimvit import checkpoint

    real_save, calls = checkpoint.save_checkpoint, {"n": 0}

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == n:
            raise _Killed

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_is_identical_to_uninterrupted_with_mixup_and_cutmix(tmp_path, monkeypatch):
    """2 epochs in one go == 1 epoch, a stop, a resume, 1 more: same weights bit for bit, same metrics.

    Mixup/cutmix draw from numpy's RNG (timm), augmentations and dropout from torch's; each epoch
    seeds them all, so the epoch in the checkpoint determines them."""
    data = synthetic_data(n_per_class=12)
    cfg = dataclasses.replace(FAST, batch_size=8, mixup=0.8, cutmix=1.0, ema=True, ema_decay=0.9)
    m_full, spec = tiny_student()
    m_full, s_full = fit(m_full, spec, data, cfg, tmp_path / "full", FitOptions(epochs=2, lr=1e-3))

    with monkeypatch.context() as m:
        _stop_after_checkpoints(m, 1)
        with pytest.raises(_Killed):
            fit(tiny_student()[0], spec, data, cfg, tmp_path / "int", FitOptions(epochs=2, lr=1e-3))
    np.random.seed(123)  # whatever the process did meanwhile must not matter
    torch.manual_seed(123)
    m_res, s_res = fit(
        tiny_student()[0], spec, data, cfg, tmp_path / "int", FitOptions(epochs=2, lr=1e-3, resume=True)
    )
    assert _same_weights(m_res, m_full)

    def timeless(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert timeless(read_jsonl(tmp_path / "int" / "metrics.jsonl")) == timeless(
        read_jsonl(tmp_path / "full" / "metrics.jsonl")
    )
    assert s_res["best_epoch"] == s_full["best_epoch"]
    assert _same_weights(models.load(tmp_path / "int")[0], models.load(tmp_path / "full")[0])


def _killed_after_one_epoch(tmp_path, monkeypatch, epochs: int):
    """A training of `epochs` killed right after its first checkpoint: (data, cfg, out_dir, spec)."""
    data = synthetic_data(n_per_class=8)
    cfg = dataclasses.replace(FAST, ema=False)
    out = tmp_path / "s"
    model, spec = tiny_student()
    with monkeypatch.context() as m:
        _stop_after_checkpoints(m, 1)
        with pytest.raises(_Killed):
            fit(model, spec, data, cfg, out, FitOptions(epochs=epochs, lr=1e-3))
    return data, cfg, out, spec


def test_checkpoint_is_one_unit_and_temp_files_are_cleaned(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous checkpoint whole; a killed run's temp files go."""
    from slimvit.checkpoint import load_checkpoint

    data, cfg, out, spec = _killed_after_one_epoch(tmp_path, monkeypatch, epochs=3)
    before = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def dies_half_way(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        Path(f).write_bytes(Path(f).read_bytes()[:1000])  # the kill comes mid-write
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(torch, "save", dies_half_way)
        with pytest.raises(_Killed):
            fit(tiny_student()[0], spec, data, cfg, out, FitOptions(epochs=3, lr=1e-3, resume=True))
    assert (out / "checkpoint.pt").read_bytes() == before  # the old checkpoint, whole
    assert load_checkpoint(out)["epoch"] == 0
    (out / ".checkpoint.pt.x1y2z3.tmp").write_bytes(b"half")  # what a SIGKILL mid-write leaves
    (out / ".model.json.abc.tmp").write_bytes(b"half")
    _, summary = fit(tiny_student()[0], spec, data, cfg, out, FitOptions(epochs=3, lr=1e-3, resume=True))
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert not list(out.rglob("*.tmp"))


def test_resume_from_a_legacy_checkpoint_folder(tmp_path, monkeypatch):
    """Run folders from before the one-file checkpoint (last/ with three files) still resume."""
    from safetensors.torch import save_file

    from slimvit.checkpoint import load_checkpoint

    data, cfg, out, spec = _killed_after_one_epoch(tmp_path, monkeypatch, epochs=2)
    state = load_checkpoint(out)
    (out / "last").mkdir()
    save_file(
        {k: v.contiguous() for k, v in state.pop("model").items()}, str(out / "last" / "model.safetensors")
    )
    save_file({k: v.contiguous() for k, v in state.pop("best_model").items()}, str(out / "model.safetensors"))
    torch.save(state, out / "last" / "train_state.pt")
    (out / "checkpoint.pt").unlink()
    fit(tiny_student()[0], spec, data, cfg, out, FitOptions(epochs=2, lr=1e-3, resume=True))
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert (out / "checkpoint.pt").exists() and not (out / "last").exists()


def test_resume_without_checkpoint_or_corrupt(tmp_path):
    data = synthetic_data(n_per_class=8)
    model, spec = tiny_student()
    with pytest.raises(ModelError, match="no checkpoint to resume"):
        fit(model, spec, data, FAST, tmp_path / "none", FitOptions(epochs=1, lr=1e-3, resume=True))
    fit(model, spec, data, FAST, tmp_path / "s", FitOptions(epochs=1, lr=1e-3))
    (tmp_path / "s" / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="corrupt"):
        fit(model, spec, data, FAST, tmp_path / "s", FitOptions(epochs=1, lr=1e-3, resume=True))


def test_distillation_needs_teacher_and_runs(tmp_path):
    data = synthetic_data(n_per_class=8)
    student, spec = tiny_student()
    with pytest.raises(ModelError, match="needs a teacher"):
        fit(
            student,
            spec,
            data,
            FAST,
            tmp_path / "x",
            FitOptions(epochs=1, lr=1e-3, distill=DistillConfig(loss="soft")),
        )
    t_spec = models.make_spec("resnet10t", 3, CLASSES, 32)
    teacher = models.build(t_spec).eval()
    _, summary = fit(
        student,
        spec,
        data,
        FAST,
        tmp_path / "kd",
        FitOptions(epochs=1, lr=1e-3, distill=DistillConfig(loss="soft")),
        teacher=teacher,
    )
    row = read_jsonl(tmp_path / "kd" / "metrics.jsonl")[0]
    assert summary["distill"] == "soft" and row["kd_loss"] > 0


def test_distillation_token_student(tmp_path):
    data = synthetic_data(n_per_class=8)
    spec = models.make_spec("deit_tiny_distilled_patch16_224", 3, CLASSES, 32, "conv", TINY_VIT)
    student = models.build(spec)
    teacher = models.build(models.make_spec("resnet10t", 3, CLASSES, 32)).eval()
    student, _ = fit(
        student,
        spec,
        data,
        FAST,
        tmp_path / "tok",
        FitOptions(epochs=1, lr=1e-3, distill=DistillConfig(loss="token")),
        teacher=teacher,
    )
    out = student(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3)  # eval: the two heads averaged


def test_local_weights_file_and_offline_pretrained(tmp_path, monkeypatch):
    spec = models.make_spec("resnet10t", 3, CLASSES, 32)
    ref = models.build(spec)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        m = models.create(spec, weights=str(tmp_path / f))
        assert all(
            torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values(), strict=True)
        )
    wrong = models.make_spec("resnet10t", 5, list("abcde"), 32)
    with pytest.raises(ModelError, match=r"does not fit the architecture.*fc.weight"):
        models.create(wrong, weights=str(tmp_path / "w.safetensors"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here anyway
    with pytest.raises(ModelError, match="weights: FILE"):
        models.create(spec, pretrained=True)


def test_unknown_model_name_suggests():
    with pytest.raises(ModelError, match="vit_tiny_patch16_224"):
        models.make_spec("vit_tiny_patch16_22", 3, CLASSES, 32)


DIST_SCRIPT = """
import hashlib, json, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_train import synthetic_data, tiny_student, FAST
from slimvit.train import FitOptions, fit
data = synthetic_data(n_per_class=8)
model, spec = tiny_student()
model, summary = fit(model, spec, data, FAST, {out!r}, FitOptions(epochs=2, lr=1e-3))
flat = torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])
digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
digests = [None] * dist.get_world_size()
dist.all_gather_object(digests, digest)
if dist.get_rank() == 0:
    open({result!r}, "w").write(json.dumps({{"digests": digests, "world": dist.get_world_size(),
                                            "processes": summary["processes"]}}))
dist.destroy_process_group()  # as the CLI does: a live gloo group can abort the interpreter's exit
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_training(tmp_path):
    script = tmp_path / "dist_train.py"
    out, result = tmp_path / "run", tmp_path / "result.json"
    script.write_text(DIST_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out), result=str(result)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            str(script),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(result.read_text())
    assert res["world"] == 2 and res["processes"] == 2
    assert res["digests"][0] == res["digests"][1]  # ranks hold identical weights
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]  # written once (rank 0), not once per rank
    leftovers = [p.name for p in out.rglob("*.tmp")]
    assert not leftovers


def test_teacher_sees_its_own_normalisation(tmp_path):
    """A teacher with ImageNet mean/std fed a student's 0.5/0.5 batch must produce its own logits."""
    from slimvit.distill import Renormalize

    t_spec = models.make_spec("resnet10t", 3, CLASSES, 32)
    s_spec = models.make_spec("vit_tiny_patch16_224", 3, CLASSES, 32, "conv", TINY_VIT)
    assert t_spec.std != s_spec.std
    teacher = models.build(t_spec).eval()
    img = torch.rand(2, 3, 32, 32)
    as_teacher = (img - torch.tensor(t_spec.mean).view(1, 3, 1, 1)) / torch.tensor(t_spec.std).view(
        1, 3, 1, 1
    )
    as_student = (img - torch.tensor(s_spec.mean).view(1, 3, 1, 1)) / torch.tensor(s_spec.std).view(
        1, 3, 1, 1
    )
    wrapped = Renormalize(teacher, s_spec.mean, s_spec.std, t_spec.mean, t_spec.std)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(as_student), teacher(as_teacher), rtol=1e-4, atol=1e-5)


def test_select_initial_keeps_starting_weights_when_training_hurts(tmp_path):
    """Fine-tuning with select_initial can never end below where it started on validation."""
    data = synthetic_data()
    model, spec = tiny_student()
    model, _ = fit(model, spec, data, FAST, tmp_path / "s", FitOptions(epochs=4, lr=2e-3))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dataclasses.replace(FAST, grad_clip=0.0, label_smoothing=0.0)
    tuned, summary = fit(
        model, spec, data, bad, tmp_path / "ft", FitOptions(epochs=2, lr=0.9, select_initial=True)
    )
    rows = read_jsonl(tmp_path / "ft" / "metrics.jsonl")
    assert all(r["val_acc"] < summary["best_val_acc"] for r in rows)  # lr 0.9 wrecks the model
    assert summary["best_epoch"] == 0
    assert all(torch.equal(tuned.state_dict()[k], start[k]) for k in start)


AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 fma avx2\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    ("cpuinfo", "auto"), [(AVX512_BF16, "bf16"), (AVX2_ONLY, "no"), (ARM_BF16, "bf16"), ("", "no")]
)
def test_precision_auto_follows_native_bf16(monkeypatch, cpuinfo, auto):
    """`auto` picks bf16 only where the CPU computes it natively; explicit choices are kept."""
    from slimvit import timing
    from slimvit.recipe import resolve_precision

    monkeypatch.setattr(timing, "_cpuinfo", lambda: cpuinfo)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == auto
    assert resolve_precision("no", cpu) == "no" and resolve_precision("bf16", cpu) == "bf16"
    assert "avx2" not in timing.cpu_flags("model name\t: avx2 lookalike\n")  # only flag lines count


def test_auto_precision_trains_in_bf16_where_native(tmp_path, monkeypatch):
    """The resolved precision is what train.json records, and a bf16 epoch trains to finite weights."""
    from slimvit import timing

    monkeypatch.setattr(timing, "_cpuinfo", lambda: AVX512_BF16)
    model, spec = tiny_student()
    tcfg = dataclasses.replace(FAST, precision="auto")
    tuned, summary = fit(model, spec, synthetic_data(), tcfg, tmp_path, FitOptions(epochs=1, lr=1e-3))
    assert summary["precision"] == "bf16"
    assert json.loads((tmp_path / "train.json").read_text())["precision"] == "bf16"
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in tuned.parameters())
    assert all(np.isfinite(r["train_loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl"))


def test_cli_closes_the_process_group(tmp_path):
    """A command run under a distributed launch leaves no live process group to the interpreter's exit."""
    import torch.distributed as dist

    from slimvit import cli

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert cli.main(["predict", str(tmp_path / "missing.onnx"), str(tmp_path)]) == 2  # fails fast
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- class balance, stopping


def imbalanced_data(counts=(40, 12, 4), size: int = 32) -> Data:
    """synthetic_data's three classes with `counts` training images each (val/test: 4 per class)."""
    full = synthetic_data(n_per_class=max(counts) + 8, size=size)
    split = {"train": [], "val": [], "test": []}
    for c, n in enumerate(counts):
        members = np.flatnonzero(full.labels == c).tolist()
        split["train"] += members[:n]
        split["val"] += members[-8:-4]
        split["test"] += members[-4:]
    return Data(full.index, split, full.images, full.labels, size)


def test_balanced_sampler_draws_every_class_equally_and_deterministically():
    from slimvit.recipe import sample_weights
    from slimvit.train import epoch_batches

    labels = np.array([0] * 90 + [1] * 30 + [2] * 10)
    w = sample_weights(labels, 3)
    drawn = torch.cat([torch.cat(epoch_batches(len(labels), 10, 0, e, 0, 1, w)) for e in range(40)]).numpy()
    share = np.bincount(labels[drawn], minlength=3) / len(drawn)
    assert np.allclose(share, 1 / 3, atol=0.03), share  # unweighted it would be 0.69 / 0.23 / 0.08
    a = epoch_batches(len(labels), 10, 0, 3, 0, 1, w)
    b = epoch_batches(len(labels), 10, 0, 3, 0, 1, w)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert sum(len(x) for x in a) == 130  # an epoch is as many draws as there are images


def test_balance_auto_is_off_for_balanced_classes():
    from slimvit.recipe import resolve_balance

    assert resolve_balance("auto", [0, 0, 1, 1, 2, 2], 3) == "none"
    assert resolve_balance("auto", [0, 0, 0, 1, 1, 2, 2], 3) == "sampler"  # 1.5x
    assert resolve_balance("none", [0] * 10 + [1], 2) == "none"
    assert resolve_balance("sampler", [0, 1], 2) == "sampler"
    assert resolve_balance("logit", [0, 1], 2) == "logit"


def test_fit_applies_and_records_the_balance_mode(tmp_path, monkeypatch):
    from slimvit import train

    data = imbalanced_data()  # 40 / 12 / 4 training images
    real, weighted = train.epoch_batches, []
    real_loss, offsets = train.make_loss, []

    def spy(*a):
        weighted.append(a[-1] is not None)
        return real(*a)

    def loss_spy(cfg, smoothing, offset=None):
        offsets.append(offset)
        return real_loss(cfg, smoothing, offset)

    monkeypatch.setattr(train, "epoch_batches", spy)
    monkeypatch.setattr(train, "make_loss", loss_spy)
    for mode, expect in (("none", "none"), ("sampler", "sampler"), ("auto", "sampler"), ("logit", "logit")):
        weighted.clear()
        offsets.clear()
        model, spec = tiny_student()
        _, summary = fit(
            model,
            spec,
            data,
            dataclasses.replace(FAST, balance=mode),
            tmp_path / mode,
            FitOptions(epochs=1, lr=2e-3),
        )
        assert summary["balance"] == expect
        assert weighted and weighted[-1] == (expect == "sampler")
        if expect == "logit":  # every image once per epoch, the label term adjusted by the training prior
            assert torch.allclose(offsets[-1], torch.log(torch.tensor([40, 12, 4]) / 56))
        else:
            assert offsets == [None]


def test_selection_reads_balanced_accuracy(tmp_path):
    from slimvit.selection import best_record, improves

    # 9 of 10 common images and 0 of 2 rare beats neither: balanced accuracy 0.45 < 0.75
    common_right = {"acc": 10 / 12, "bal_acc": 0.45, "loss": 0.1}
    both_classes = {"acc": 8 / 12, "bal_acc": 0.75, "loss": 0.9}
    assert improves(both_classes, best_record(common_right, 1))
    assert not improves(common_right, best_record(both_classes, 1))


def test_fit_stops_when_recovered_and_resume_keeps_the_stop(tmp_path):
    data = synthetic_data()
    model, spec = tiny_student()
    model, summary = fit(model, spec, data, FAST, tmp_path / "s", FitOptions(epochs=5, lr=2e-3, stop_at=0.0))
    assert summary["epochs_run"] == 1 and summary["epochs"] == 5
    assert summary["stopped"].startswith("recovered")
    assert len(read_jsonl(tmp_path / "s" / "metrics.jsonl")) == 1
    # a resume of a stopped training trains nothing more
    model2, spec = tiny_student()
    _, again = fit(
        model2, spec, data, FAST, tmp_path / "s", FitOptions(epochs=5, lr=2e-3, stop_at=0.0, resume=True)
    )
    assert again["epochs_run"] == 1 and len(read_jsonl(tmp_path / "s" / "metrics.jsonl")) == 1
    # an unreachable target runs to the cap
    model3, spec = tiny_student()
    _, full = fit(model3, spec, data, FAST, tmp_path / "cap", FitOptions(epochs=2, lr=2e-3, stop_at=1.01))
    assert full["epochs_run"] == 2 and full["stopped"] is None


def test_recovered_needs_a_trained_epoch(tmp_path, monkeypatch):
    """A pruned model whose starting weights already tie the student on validation is still fine-tuned:
    the stop needs a trained epoch as the best, not the untrained cut model (epoch 0)."""
    from slimvit import train
    from slimvit.selection import stop_reason

    at_start = {"epoch": 0, "val_bal_acc": 1.0}
    assert stop_reason(at_start, 0.9, 0, 1, 5, 1) is None
    assert stop_reason({**at_start, "epoch": 1}, 0.9, 0, 1, 5, 1).startswith("recovered")
    # scripted validation: the cut model ties the student, the first epoch (mid warm-up) is worse, the
    # second better; the old rule stopped after epoch 1 and kept the untrained epoch 0
    scores = iter([(1.0, 0.5), (0.8, 0.7), (1.0, 0.3), (1.0, 0.2)])

    def scripted(*_a, **_k):
        bal, loss = next(scores)
        return {"acc": bal, "bal_acc": bal, "loss": loss}

    monkeypatch.setattr(train, "validate", scripted)
    model, spec = tiny_student()
    _, s = fit(
        model,
        spec,
        synthetic_data(),
        FAST,
        tmp_path / "ft",
        FitOptions(epochs=4, lr=1e-4, select_initial=True, stop_at=1.0),
    )
    assert (s["best_epoch"], s["epochs_run"]) == (2, 2) and s["stopped"].startswith("recovered")


def test_resume_refuses_a_checkpoint_that_kept_the_untrained_weights(tmp_path, monkeypatch):
    """A fine-tune checkpointed by a version whose starting weights competed as epoch 0 is not resumed
    into one where they do not (its best would be the untrained model)."""
    from slimvit import train
    from slimvit.errors import ConfigError

    scores = iter([(1.0, 0.1), (0.5, 0.9)])  # epoch 0 best, the trained epoch worse

    def scripted(*_a, **_k):
        bal, loss = next(scores)
        return {"acc": bal, "bal_acc": bal, "loss": loss}

    monkeypatch.setattr(train, "validate", scripted)
    model, spec = tiny_student()
    _, s = fit(
        model,
        spec,
        synthetic_data(),
        FAST,
        tmp_path / "ft",
        FitOptions(epochs=1, lr=1e-4, select_initial=True),
    )
    assert s["best_epoch"] == 0
    model, spec = tiny_student()
    with pytest.raises(ConfigError, match="untrained starting weights"):
        fit(model, spec, synthetic_data(), FAST, tmp_path / "ft", FitOptions(epochs=1, lr=1e-4, resume=True))


def test_patience_stops_a_plateau(tmp_path):
    data = synthetic_data()
    model, spec = tiny_student()
    bad = dataclasses.replace(FAST, grad_clip=0.0, label_smoothing=0.0, patience=2)
    # lr 0.9 wrecks the model after the initial weights: no epoch beats epoch 0
    model, _ = fit(model, spec, data, FAST, tmp_path / "pre", FitOptions(epochs=3, lr=2e-3))
    _, s = fit(model, spec, data, bad, tmp_path / "ft", FitOptions(epochs=6, lr=0.9, select_initial=True))
    assert s["best_epoch"] == 0 and s["epochs_run"] == 2 and "2 epochs" in s["stopped"]


def _scripted_validation(monkeypatch, accuracies: list[float], seen: list) -> None:
    """train.validate returns these accuracies epoch by epoch (the real model still trains)."""
    from slimvit import train

    scores = iter(accuracies)

    def scripted(model, *_a, **_k):
        seen.append("validated")
        a = next(scores)
        return {"acc": a, "bal_acc": a, "loss": 1 - a, "kl": None, "agree": None}

    monkeypatch.setattr(train, "validate", scripted)


def test_select_from_keeps_the_best_late_epoch_and_trains_the_same(tmp_path, monkeypatch):
    """`train.select_from`: only the epochs after that fraction compete for the kept weights (1 keeps the
    last); the kept file holds that epoch's weights, and the training itself is the same whatever the rule
    (its last weights identical), which is what lets scripts/epoch_rules.py read every rule from one training.
    `on_epoch` sees every epoch, after validation, in eval mode."""
    last = None
    for select_from, first, kept in [(0.0, 0, 1), (0.5, 3, 4), (0.75, 4, 4), (1.0, 5, 5)]:
        seen, weights = [], {}
        _scripted_validation(monkeypatch, [0.9, 0.5, 0.6, 0.7, 0.65], seen)

        def on_epoch(model, epoch, seen=seen, weights=weights):
            seen.append(("on_epoch", epoch, model.training))
            weights[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

        model, spec = tiny_student()
        out = tmp_path / str(select_from)
        opts = FitOptions(epochs=5, lr=2e-3, select_from=select_from, on_epoch=on_epoch)
        _, s = fit(model, spec, synthetic_data(), FAST, out, opts)
        assert (s["best_epoch"], s["first_competing_epoch"]) == (kept, first), select_from
        saved, _ = models.load(out)
        for k, v in saved.state_dict().items():
            assert torch.equal(v, weights[kept][k]), (select_from, k)
        assert seen == [x for e in range(1, 6) for x in ("validated", ("on_epoch", e, False))]
        state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
        for k, v in (last or state).items():
            assert torch.equal(v, state[k]), (select_from, k)
        last = state


def test_select_from_patience_counts_from_the_first_competing_epoch(tmp_path, monkeypatch):
    """Patience does not stop a training before any epoch may be kept (its best is then none at all)."""
    _scripted_validation(monkeypatch, [0.9, 0.5, 0.5, 0.6, 0.5, 0.5], [])
    model, spec = tiny_student()
    tcfg = dataclasses.replace(FAST, patience=1)
    _, s = fit(
        model, spec, synthetic_data(), tcfg, tmp_path / "s", FitOptions(epochs=6, lr=2e-3, select_from=0.5)
    )
    assert (s["best_epoch"], s["epochs_run"]) == (4, 5) and "1 epochs" in s["stopped"]


def test_select_from_a_fine_tune_stops_recovered_only_once_its_epochs_compete(tmp_path, monkeypatch):
    """`prune.select_from` (FitOptions.select_from with stop_at): an early epoch that ties the target is
    neither kept nor a reason to stop; the first competing epoch that recovers stops the fine-tune."""
    for select_from, kept in [(0.0, 1), (0.5, 5)]:
        _scripted_validation(monkeypatch, [0.95, 0.95, 0.9, 0.9, 0.95, 0.95], [])
        model, spec = tiny_student()
        opts = FitOptions(epochs=6, lr=2e-3, stop_at=0.95, select_from=select_from)
        _, s = fit(model, spec, synthetic_data(), FAST, tmp_path / str(select_from), opts)
        assert (s["best_epoch"], s["epochs_run"]) == (kept, kept), select_from
        assert s["stopped"].startswith("recovered")


def test_first_competing_epoch():
    from slimvit.selection import first_competing_epoch

    assert [first_competing_epoch(f, 60) for f in (0, 0.5, 0.75, 1)] == [0, 31, 46, 60]
    assert [first_competing_epoch(f, 138) for f in (0.75, 0.999, 1)] == [104, 138, 138]
    assert first_competing_epoch(0.01, 10) == 1  # never the starting weights once a fraction is set


class _Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.images = model, 0, 0

    def forward(self, x):
        self.calls += 1
        self.images += len(x)
        return self.model(x)


def test_views_are_the_eight_symmetries_of_the_square():
    from slimvit.recipe import views

    x = torch.arange(16.0).view(1, 1, 4, 4)
    eight = views(x, flips=True, rot90=True)
    assert len(eight) == 8 and len({tuple(v.flatten().tolist()) for v in eight}) == 8
    assert (
        len(views(x, True, False)) == 4
        and len(views(x, False, True)) == 4
        and len(views(x, False, False)) == 1
    )


def _teacher():
    """A small seeded CNN teacher for the distillation tests."""
    torch.manual_seed(0)
    return models.build(models.make_spec("resnet10t", 3, CLASSES, 32)).eval()


def _fit_counting(base, data, out, epochs: int, distill_cfg, **kw) -> tuple[int, dict]:
    """Distil a tiny student from `base`; (images the teacher saw, the fit's summary)."""
    teacher = _Counting(base)
    student, spec = tiny_student()
    _, summary = fit(
        student,
        spec,
        data,
        FAST,
        out,
        FitOptions(epochs=epochs, lr=1e-3, distill=distill_cfg),
        teacher=teacher,
        **kw,
    )
    return teacher.images, summary


def test_cached_teacher_logits_run_the_teacher_once_per_image_and_view(tmp_path):
    """The default: the teacher sees every training image in its 8 flips/rotations once, before training;
    the steps use the averaged logits. `live` runs it on every augmented batch."""
    from slimvit.distill import teacher_logits
    from slimvit.recipe import views

    data = synthetic_data(n_per_class=8)
    n_train = len(data.split["train"])
    base = _teacher()
    for mode in ("cached", "live"):
        images, summary = _fit_counting(
            base, data, tmp_path / mode, 2, DistillConfig(loss="soft", teacher_logits=mode)
        )
        assert summary["teacher_logits"] == mode
        if mode == "cached":
            assert images == 8 * n_train  # once per image and view, none during the 2 epochs
        else:
            assert images >= 2 * (n_train // FAST.batch_size) * FAST.batch_size
    # the cache is the mean of the logits over the views
    from slimvit.data import EvalDataset

    spec = tiny_student()[1]
    ds = EvalDataset(*data.arrays("train"), spec.mean, spec.std)
    cached = teacher_logits(base, ds, FAST, "no", torch.device("cpu"))
    with torch.no_grad():
        expect = torch.stack([base(v) for v in views(ds.x, True, True)]).mean(0)
    assert torch.allclose(cached, expect, atol=1e-4)
    # mixup has no per-image logits: the teacher runs live
    student, spec = tiny_student()
    _, s = fit(
        student,
        spec,
        data,
        dataclasses.replace(FAST, mixup=0.2),
        tmp_path / "mix",
        FitOptions(epochs=1, lr=1e-3, distill=DistillConfig(loss="soft")),
        teacher=base,
    )
    assert s["teacher_logits"] == "live"


def test_scale_epochs_keeps_the_optimizer_steps_of_the_floor():
    from slimvit.recipe import scale_epochs

    t = dataclasses.replace(FAST, steps_floor_images=1260)
    assert scale_epochs(30, t, 1260) == 30 and scale_epochs(30, t, 1259) == 30  # one image short: unchanged
    assert scale_epochs(30, t, 546) == 69 and scale_epochs(40, t, 546) == 92  # the imbalanced subset
    assert scale_epochs(30, t, 5000) == 30  # larger data: never fewer epochs
    assert scale_epochs(0, t, 100) == 0  # no fine-tune stays none
    assert scale_epochs(30, FAST, 100) == 30  # 0: off


def test_a_logits_memo_computes_the_teacher_once_across_fits_and_stages(tmp_path, caplog):
    """The sweep's fine-tunes share one memo: the second fit with the same teacher and images reuses the
    logits; another teacher's weights are computed anew. The prune stage's memo writes its file, and a new
    memo reading it (the sweep, in another process) reuses them; a file of another key, or a corrupt one,
    is not used."""
    from slimvit.distill import LogitsMemo

    data = synthetic_data(n_per_class=8)
    n_train = len(data.split["train"])
    base = _teacher()
    path = tmp_path / "pruned" / "teacher_logits.safetensors"
    memo = LogitsMemo(path, write=True)
    seen = []
    for i, weights_from in enumerate(("base", "base", "changed")):
        if weights_from == "changed":
            with torch.no_grad():
                base.fc.bias.add_(1.0)
        images, summary = _fit_counting(
            base, data, tmp_path / str(i), 1, DistillConfig(loss="soft"), logits_memo=memo
        )
        seen.append(images)
        assert summary["teacher_logits"] == "cached"
    assert seen == [8 * n_train, 0, 8 * n_train]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # one file: the last teacher's
    # a later stage's memo (read only) finds them on disk: the same teacher computes nothing
    reader = LogitsMemo(path)
    images, _ = _fit_counting(base, data, tmp_path / "3", 1, DistillConfig(loss="soft"), logits_memo=reader)
    assert images == 0 and torch.equal(reader.logits, memo.logits)
    written = path.stat().st_mtime_ns
    with torch.no_grad():
        base.fc.bias.add_(1.0)  # another teacher: the file is of another key
    images, _ = _fit_counting(
        base, data, tmp_path / "4", 1, DistillConfig(loss="soft"), logits_memo=LogitsMemo(path)
    )
    assert images == 8 * n_train and path.stat().st_mtime_ns == written  # computed; a reader writes nothing
    path.write_bytes(b"not a safetensors file")
    with caplog.at_level("WARNING"):
        images, _ = _fit_counting(
            base, data, tmp_path / "5", 1, DistillConfig(loss="soft"), logits_memo=LogitsMemo(path)
        )
    assert images == 8 * n_train and "not read" in caplog.text


def test_progressive_resizing_schedule_and_config():
    from slimvit.errors import ConfigError
    from slimvit.recipe import epoch_size, full_size_epochs

    t = dataclasses.replace(FAST, resize_from=64, resize_until=0.5)
    sizes = [epoch_size(e, 40, 96, t) for e in range(40)]
    assert sizes == [64] * 10 + [80] * 10 + [96] * 20
    assert [epoch_size(e, 30, 96, dataclasses.replace(t, resize_until=0.75)) for e in range(30)] == (
        [64] * 12 + [80] * 11 + [96] * 7
    )

    def cost(size):  # a step's cost at `size` px against 96 px
        return 1 / 3 + 2 / 3 * (size / 96) ** 2

    assert full_size_epochs(40, 96, t) == pytest.approx(10 * cost(64) + 10 * cost(80) + 20)
    assert full_size_epochs(40, 96, t, start=20) == 20
    assert full_size_epochs(40, 96, t, 0, 10) == pytest.approx(10 * cost(64))
    assert [epoch_size(e, 4, 96, FAST) for e in range(4)] == [96] * 4  # off by default
    assert {epoch_size(e, 4, 64, t) for e in range(4)} == {64}  # already at (or below) the start size
    for bad in ({"resize_from": 70}, {"resize_from": 8}, {"resize_until": 0.0}, {"resize_until": 1.5}):
        with pytest.raises(ConfigError, match="train.resize_"):
            TrainConfig(**bad)


def test_any_input_size_lets_a_vit_take_smaller_images_and_restores_it():
    from slimvit.vit import any_input_size

    for stem in ("conv", "patch"):
        spec = models.make_spec("vit_tiny_patch16_224", 3, CLASSES, 64, stem, TINY_VIT)
        model = models.build(spec).eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            before = model(x)
            with any_input_size(model):
                assert torch.allclose(model(x), before, atol=1e-5)  # same size: the same model
                assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
            assert torch.equal(model(x), before)
            assert not model.dynamic_img_size
            with pytest.raises((RuntimeError, AssertionError)):  # fixed size again
                model(torch.randn(2, 3, 32, 32))
    cnn = _teacher()
    with any_input_size(cnn) as m:
        assert m is cnn


def test_fit_trains_early_epochs_small_and_keeps_a_fixed_size_model(tmp_path):
    """Progressive resizing: the logged sizes follow the schedule, validation and the saved model stay at
    the full size, and a live teacher of fixed size (a ViT) sees the full-size batch."""
    data = synthetic_data(n_per_class=12)
    t = dataclasses.replace(FAST, resize_from=16, resize_until=0.5)
    teacher, _ = tiny_student()
    student, spec = tiny_student()
    model, summary = fit(
        student,
        spec,
        data,
        t,
        tmp_path / "s",
        FitOptions(epochs=4, lr=2e-3, distill=DistillConfig(loss="soft", teacher_logits="live"), resize=True),
        teacher=teacher.eval(),
    )
    rows = read_jsonl(tmp_path / "s" / "metrics.jsonl")
    assert [r["img_size"] for r in rows] == [16, 16, 32, 32]
    assert not model.dynamic_img_size and model.patch_embed.output_fmt is None
    loaded, _ = models.load(tmp_path / "s")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # without resize=True (the fine-tunes) every epoch is full size
    fit(tiny_student()[0], spec, data, t, tmp_path / "ft", FitOptions(epochs=2, lr=1e-3))
    assert [r["img_size"] for r in read_jsonl(tmp_path / "ft" / "metrics.jsonl")] == [32, 32]


def test_explicit_attention_is_the_same_function_and_restores_the_model():
    from slimvit.vit import explicit_attention

    model, _ = tiny_student()
    model.eval()
    layers = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert layers and all(m.fused_attn for m in layers)  # timm's default here: the fused kernel
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        with explicit_attention(model) as m:
            assert m is model and not any(m.fused_attn for m in layers)
            assert torch.allclose(model(x), fused, atol=1e-5)
        assert all(m.fused_attn for m in layers)
        with explicit_attention(model, on=False):
            assert all(m.fused_attn for m in layers)
    layers[0].fused_attn = False  # a layer's own setting is what comes back, not a blanket True
    with explicit_attention(model):
        pass
    assert not layers[0].fused_attn and all(m.fused_attn for m in layers[1:])


def test_fit_on_a_cpu_trains_without_the_fused_attention_kernel(tmp_path, monkeypatch):
    """Training steps on a CPU take the explicit attention (the fused kernel's backward is slow there);
    validation and the returned model keep the fused one."""
    import torch.nn.functional as F

    calls = {"train": 0, "eval": 0}
    sdpa = F.scaled_dot_product_attention

    def counting(*a, **kw):
        calls["train" if torch.is_grad_enabled() else "eval"] += 1
        return sdpa(*a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    model, spec = tiny_student()
    model, _ = fit(
        model, spec, synthetic_data(n_per_class=8), FAST, tmp_path / "s", FitOptions(epochs=1, lr=1e-3)
    )
    assert calls["train"] == 0 and calls["eval"] > 0
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))


def test_saturated_validation_does_not_stop_a_fine_tune_after_one_epoch(tmp_path):
    """Validation at its ceiling from the first epoch (stop_at=0: every epoch 'recovers' on accuracy): the
    fine-tune still runs its floor of epochs, and with an agreement floor no tiny fine-tune of a
    randomly initialised model stops before it names the reference's class on every validation view."""

    from slimvit.selection import stop_reason

    best = {"epoch": 1, "val_bal_acc": 1.0, "val_agree": 0.60}
    assert stop_reason(best, 1.0, 0, 1, 10, 1) is not None  # the old rule: stopped after epoch 1
    assert stop_reason(best, 1.0, 0, 1, 10, 1, min_epochs=5) is None  # the floor of optimizer steps
    assert stop_reason(best, 1.0, 0, 5, 10, 1, min_epochs=5, agreement=0.99) is None  # function not back
    ok = stop_reason({**best, "val_agree": 0.995}, 1.0, 0, 5, 10, 1, min_epochs=5, agreement=0.99)
    assert ok.startswith("recovered") and "agreement" in ok

    model, spec = tiny_student()
    reference = copy.deepcopy(model)
    _, s = fit(
        model,
        spec,
        synthetic_data(),
        FAST,
        tmp_path / "ft",
        FitOptions(epochs=4, lr=1e-4, stop_at=0.0, min_epochs=3),
        reference=reference,
    )
    assert s["epochs_run"] >= 3 and s["min_epochs"] == 3
    rows = read_jsonl(tmp_path / "ft" / "metrics.jsonl")
    assert all(0 <= r["val_agree"] <= 1 and r["val_kl"] >= 0 for r in rows)
    assert s["fidelity_views"] == 4 * len(synthetic_data().split["val"])  # the image, 2 flips, 180 degrees


def test_fidelity_runs_only_on_the_epochs_that_may_be_kept(tmp_path, monkeypatch):
    """The views' KL and agreement rank the competing epochs and feed the stop rule: under `select_from: 1`
    only the last epoch is scored on them (each a forward pass over 4x the validation images), and the kept
    record still carries them; with every epoch competing, every epoch is scored."""
    from slimvit import selection

    calls = []
    scored = selection.Fidelity.__call__
    monkeypatch.setattr(selection.Fidelity, "__call__", lambda self, m: calls.append(1) or scored(self, m))
    for select_from, scored_epochs in [(1.0, [4]), (0.0, [1, 2, 3, 4])]:
        calls.clear()
        model, spec = tiny_student()
        out = tmp_path / str(select_from)
        _, s = fit(
            model,
            spec,
            synthetic_data(),
            FAST,
            out,
            FitOptions(epochs=4, lr=1e-4, select_from=select_from, stop_at=0.0, min_epochs=4),
            reference=copy.deepcopy(model),
        )
        rows = read_jsonl(out / "metrics.jsonl")
        assert [r["epoch"] for r in rows if "val_agree" in r] == scored_epochs, select_from
        assert len(calls) == len(scored_epochs), select_from
        assert s["best_val_agree"] is not None and s["stopped"].startswith("recovered"), select_from


def test_fidelity_breaks_ties_of_validation_accuracy(tmp_path, monkeypatch):
    """Two epochs with the same validation accuracy: the one closer to the reference (lower KL on the
    validation views) is kept, not the one with the lower label loss."""
    from slimvit import train

    scores = iter([(1.0, 0.2, 0.30), (1.0, 0.4, 0.05), (1.0, 0.1, 0.50)])  # (bal acc, loss, kl)

    def scripted(*_a, **_k):
        bal, loss, kl = next(scores)
        return {"acc": bal, "bal_acc": bal, "loss": loss, "kl": kl, "agree": 1 - kl}

    monkeypatch.setattr(train, "validate", scripted)
    model, spec = tiny_student()
    _, s = fit(model, spec, synthetic_data(), FAST, tmp_path / "ft", FitOptions(epochs=3, lr=1e-4))
    assert s["best_epoch"] == 2 and s["best_val_kl"] == 0.05
