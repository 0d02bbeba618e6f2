import dataclasses
from pathlib import Path

import pytest
import yaml

from slimvit.config import Config, load_config, preset_names, read_config, save_config
from slimvit.errors import ConfigError


def test_presets_exist_and_validate():
    assert {"neu-det", "smoke", "reference"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.preset == name
    ref = load_config("reference")
    assert ref.model.teacher == "vit_base_patch16_224" and ref.data.img_size == 224
    assert ref.model.teacher_pretrained and ref.model.student_pretrained


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config("smoke", overrides=["prune.sweep=[0.1, 0.5]", "model.student_kwargs={depth: 3}"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    save_config(cfg, tmp_path / "config.yaml")
    assert read_config(tmp_path / "config.yaml") == cfg


def test_frozen():
    cfg = load_config("neu-det")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3


def test_overrides_and_types(tmp_path):
    user = tmp_path / "my.yaml"
    user.write_text("train:\n  epochs: 7\n  lr: 0.002\n")
    cfg = load_config("neu-det", user, ["train.epochs=9", "distill.loss=hard", "data.split=[0.8, 0.1, 0.1]"])
    assert cfg.train.epochs == 9  # --set wins over the file
    assert cfg.train.lr == 0.002  # the file wins over the preset
    assert cfg.distill.loss == "hard"
    assert cfg.data.split == (0.8, 0.1, 0.1)
    assert cfg.model.teacher == "resnet18"  # untouched preset value
    assert (
        load_config("neu-det", overrides=["prune.finetune_lr=1e-4"]).prune.finetune_lr == 1e-4
    )  # YAML 1.1 string


def test_yaml_yes_no_words_mean_what_was_typed(tmp_path):
    """YAML 1.1 reads an unquoted no/yes/off/on as a boolean: `--set train.precision=no` is the word "no",
    and a true/false key still takes yes/no; in a file the word must be quoted, and the error says so."""
    cfg = load_config("neu-det", overrides=["train.precision=no", "distill.ablation=yes", "train.ema=off"])
    assert cfg.train.precision == "no" and cfg.distill.ablation is True and cfg.train.ema is False
    assert load_config("neu-det", overrides=["train.ema=true"]).train.ema is True
    user = tmp_path / "my.yaml"
    user.write_text("train:\n  precision: no\n")
    with pytest.raises(
        ConfigError, match=r'train.precision=False must be a string.*quote it \(precision: "no"\)'
    ):
        load_config("neu-det", user)
    user.write_text('train:\n  precision: "no"\n')
    assert load_config("neu-det", user).train.precision == "no"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.epochz=3", r"unknown config key 'train.epochz'.*train.epochs"),
        ("trian.epochs=3", r"unknown section 'trian'.*train"),
        ("train.epochs=abc", r"train.epochs='abc' must be an integer"),
        ("train.lr=fast", r"train.lr='fast' must be a number"),
        ("train.epochs=0", r"train.epochs=0 must be >= 1"),
        ("train.precision=fp8", r"train.precision='fp8' is not one of \['auto', 'no', 'bf16', 'fp16'\]"),
        ("prune.ratio=1.5", r"prune.ratio=1.5 must be in \(0, 1\)"),
        ("train.select_from=1.5", r"train.select_from=1.5 must be in \[0, 1\]"),
        ("prune.select_from=-0.1", r"prune.select_from=-0.1 must be in \[0, 1\]"),
        ("distill.loss=magic", r"distill.loss='magic' is not one of"),
        (
            "model.student_attention=local",
            r"model.student_attention='local' is not one of \['plain', 'locality'\]",
        ),
        ("data.split=[0.5, 0.2, 0.2]", r"must sum to 1"),
        ("train.epochs", r"must look like section.key=value"),
        ("quantize.modes=[int4]", r"quantize.modes entry='int4'"),
        ("train.warmup_epochs=.inf", r"train.warmup_epochs=inf must be a finite number"),
        ("train.warmup_epochs=nan", r"train.warmup_epochs='nan' must be a finite number"),
        ("train.lr=-.inf", r"train.lr=-inf must be a finite number"),
        ("data.split=[0.5, .nan, 0.5]", r"data.split=nan must be a finite number"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("neu-det", overrides=[override])


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match=r"unknown preset 'neu_det'.*Did you mean 'neu-det'"):
        load_config("neu_det")


def test_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("neu-det", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("neu-det", bad)


def test_changed_run_config_names_the_force_that_redoes_it(tmp_path):
    """The refusal names a command that works: `slimvit run --force` takes the first stage to redo."""
    from slimvit.runs import prepare_run_dir

    run = tmp_path / "run"
    prepare_run_dir(load_config("smoke"), run)
    with pytest.raises(ConfigError, match=r"`slimvit run --force prune`"):
        prepare_run_dir(load_config("smoke", overrides=["prune.recover=false"]), run)
    with pytest.raises(ConfigError, match=r"`slimvit run --force teacher`"):
        prepare_run_dir(load_config("smoke", overrides=["train.teacher_epochs=3"]), run)


def test_unreadable_run_config_is_refused_then_redone_with_force(tmp_path):
    from slimvit.config import read_config
    from slimvit.io import atomic_write_json
    from slimvit.runs import prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train: [1, 2\n")
    (run / "split.json").write_text("{}")
    atomic_write_json(run / "manifest.json", {"stages": {"data": {"status": "done"}}})
    cfg = load_config("smoke")
    with pytest.raises(ConfigError, match=r"cannot be read .*--force"):
        prepare_run_dir(cfg, run)
    prepare_run_dir(cfg, run, force=True)
    assert read_config(run / "config.yaml") == cfg
    assert not (run / "split.json").exists()  # everything is redone from the data check on


@pytest.mark.parametrize(
    "text", ["train:\n  teacher_epochs: 25\n", "train.teacher_epochs: 25\n"], ids=["nested", "dotted"]
)
def test_config_file_alone_merges_over_the_default_preset(tmp_path, monkeypatch, text):
    from slimvit.cli import build_parser, load_cli_config

    monkeypatch.chdir(tmp_path)  # runs/neu-det of an earlier `make run` would lend its data.path
    user = tmp_path / "only_epochs.yaml"
    user.write_text(text)
    cfg, out = load_cli_config(build_parser().parse_args(["data", "--config", str(user)]))
    assert cfg == load_config("neu-det", overrides=["train.teacher_epochs=25"])
    assert cfg.data.img_size == 96 and cfg.prune.sweep == (0.2, 0.3, 0.5)
    assert cfg.preset == "neu-det" and out == Path("runs") / "neu-det"


def test_config_file_may_name_its_preset(tmp_path):
    user = tmp_path / "my.yaml"
    user.write_text("preset: smoke\ntrain:\n  epochs: 3\n")
    cfg = load_config(None, user)
    assert cfg.preset == "smoke" and cfg.data.img_size == 32 and cfg.train.epochs == 3
    assert load_config("reference", user).data.img_size == 224  # --preset wins over the file's
    saved = tmp_path / "config.yaml"  # a run folder's config.yaml is a valid --config file
    save_config(cfg, saved)
    assert load_config(None, saved) == cfg


def test_bad_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(None, bad)
    assert len(str(e.value).splitlines()) == 1 and "line " in str(e.value)


def test_a_key_added_later_reads_as_what_slimvit_did_before_it(tmp_path):
    """A run folder's config.yaml written before `prune.teacher` existed means the teacher (what the
    fine-tune used then); the neu-det preset's choice, the student, is then a config change."""
    d = load_config("neu-det").to_dict()
    assert d["prune"].pop("teacher") == "student"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(d))
    assert read_config(tmp_path / "config.yaml").prune.teacher == "teacher"


def test_a_saved_run_config_with_overrides_is_the_run_as_it_was_made(tmp_path):
    """read_config(path, overrides): a key the saved file lacks takes its dataclass default (what slimvit
    did before the key existed), not today's preset, as load_config reads a user's file; then the overrides,
    checked like --set."""
    d = load_config("neu-det").to_dict()
    assert d["train"].pop("select_from") == 1.0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(d))
    cfg = read_config(path, ["train.seed=2"])
    assert (cfg.train.select_from, cfg.train.seed) == (0.0, 2)
    assert cfg.train.epochs == d["train"]["epochs"]  # the file's own values kept
    assert load_config(config_file=path).train.select_from == 1.0  # a user's file: over the preset
    assert read_config(path, ["train.select_from=1"]).train.select_from == 1.0
    with pytest.raises(ConfigError, match="select_from"):
        read_config(path, ["train.select_from=2"])


def test_config_command_lists_every_key_of_every_section_with_its_description(capsys):
    """`slimvit config` is built from the dataclasses: a new key cannot be missing from it, and every key
    needs its one-line docstring."""
    import dataclasses

    from slimvit.cli import main
    from slimvit.config import SECTIONS, Config

    expected = [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(type(getattr(Config(), s)))]
    assert main(["config"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [c[0] for c in lines] == expected
    assert all(len(c) == 5 and c[4] for c in lines), [c[0] for c in lines if not c[4]]
    by_key = {c[0]: c for c in lines}
    assert by_key["prune.sweep"][2:4] == ["[]", "[0.2, 0.3, 0.5]"]  # default, then the neu-det preset's
    assert main(["config", "--preset", "smoke", "data.img_size"]) == 0
    assert capsys.readouterr().out.split("\t")[3] == "32"
    assert main(["config", "train.epoch"]) == 2
    assert "did you mean train.epochs" in capsys.readouterr().err
