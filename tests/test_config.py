"""Config: YAML + dotted overrides -> typed tree; one-line errors naming key and file."""

from pathlib import Path

import pytest
import yaml

from lsdr_repr.cli import main
from lsdr_repr.config import (
    AUGMENT_PRESETS,
    Config,
    check_required,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from lsdr_repr.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    check_required(cfg, str(path))
    dumped = tmp_path / "resolved.yaml"
    dump_config(cfg, dumped)
    assert load_config(dumped) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_shipped_configs_cover_the_documented_runs():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "resnet50_imagenet.yaml", "vit_small_imagenet.yaml"} <= names


def test_overrides_are_typed(tmp_path):
    path = write(tmp_path, {"train": {"run_dir": "r"}, "data": {"train_shards": "s"}})
    cfg = load_config(path, ["optim.lr=0.1", "data.batch_size=64", "model.stages=[1, 2]",
                             "log.wandb.name=my run", "optim.clip_grad=null"])
    assert cfg.optim.lr == 0.1 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 64
    assert cfg.model.stages == [1, 2]
    assert cfg.log.wandb.name == "my run"
    assert cfg.optim.clip_grad is None


def test_exponent_without_a_dot_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as a string; `optim.lr=1e-4` must still mean 0.0001
    path = write(tmp_path, "optim:\n  lr: 1e-4\n")
    assert load_config(path, ["optim.weight_decay=5E-2"]).optim.lr == 1e-4
    assert load_config(path, ["optim.weight_decay=5E-2"]).optim.weight_decay == 0.05
    with pytest.raises(ConfigError, match="optim.lr: expected float"):
        load_config(path, ["optim.lr=1e"])


def test_int_is_accepted_for_float_but_not_the_reverse(tmp_path):
    path = write(tmp_path, {"optim": {"lr": 1}})
    assert load_config(path).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected int, got 1\.5"):
        load_config(path, ["data.batch_size=1.5"])


@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [
        ({"optim": {"lrr": 0.1}}, [], r"run\.yaml: unknown key 'optim\.lrr'"),
        ({"nope": {}}, [], r"unknown key 'nope'"),
        ({}, ["data.batch_size=big"], r"override 'data\.batch_size=big': data\.batch_size: expected int, got 'big'"),
        ({}, ["optim.name=adam"], r"optim\.name: expected one of lars \| adamw \| sgd"),
        ({}, ["augment.scale.area=[0.1]"], r"augment\.scale\.area: expected 2 values"),
        ({}, ["augment.preset=fancy"], r"augment\.preset: unknown preset 'fancy'"),
        ({}, ["model.stages=3"], r"model\.stages: expected a list, got 3"),
        ({}, ["train.compile=yes please"], r"train\.compile: expected bool"),
        ({}, ["optim"], r"override 'optim' is not of the form key=value"),
        ({"data": 3}, [], r"data: expected a mapping"),
        ({"optim": {"lrr": 0.1}}, [], r"unknown key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"),
        ({}, ["data.batchsize=64"], r"did you mean 'data\.batch_size'\?"),
        ({}, ["data.image_size=32", "augment.crop_size=64"],
         (r"run\.yaml: data\.image_size=32 is smaller than augment\.crop_size=64; .*"
         r"augment\.upscale=true")),
    ],
)
def test_bad_values_name_the_key_and_the_file(tmp_path, data, overrides, message):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)


def test_an_override_typo_names_the_override_not_the_file(tmp_path):
    path = write(tmp_path, {"optim": {"lr": 0.1}})
    with pytest.raises(ConfigError) as info:
        load_config(path, ["optim.weight_decay=0.1", "optim.lrr=0.2"])
    assert str(info.value).startswith("override 'optim.lrr=0.2': unknown key 'optim.lrr' "
                                      "(did you mean 'optim.lr'?)")
    assert str(path) not in str(info.value)
    with pytest.raises(ConfigError, match=r"^override 'dat\.batch_size=8': unknown key 'dat' "
                                          r"\(did you mean 'data'\?\)"):
        load_config(path, ["dat.batch_size=8"])
    # below a free-form mapping any key is the user's (timm's keyword arguments)
    assert load_config(path, ["model.timm_kwargs.drop_rate=0.1"]).model.timm_kwargs == {
        "drop_rate": 0.1}


def test_upscaling_views_is_allowed_when_asked_for(tmp_path):
    cfg = load_config(write(tmp_path, {}), ["data.image_size=32", "augment.crop_size=64",
                                            "augment.upscale=true"])
    assert (cfg.data.image_size, cfg.augment.crop_size) == (32, 64)
    # no close name: no guess
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {}), ["data.zzzz=1"])
    assert "did you mean" not in str(info.value)


def test_missing_required_values(tmp_path):
    cfg = load_config(write(tmp_path, {"data": {"train_shards": "x"}}))
    with pytest.raises(ConfigError, match=r"train\.run_dir is required"):
        check_required(cfg, "run.yaml")


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_preset_is_a_base_that_explicit_keys_override(tmp_path):
    path = write(tmp_path, {"augment": {"preset": "lsdr-invariance", "rotation": {"degrees": 30}}})
    cfg = load_config(path)
    preset = AUGMENT_PRESETS["lsdr-invariance"]
    assert cfg.augment.rotation.degrees == 30.0
    assert cfg.augment.rotation.p == preset["rotation"]["p"]
    assert cfg.augment.lighting.gamma == preset["lighting"]["gamma"]
    # the resolved config keeps the preset name and its values: loading it again is identical
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_default_config_round_trips():
    cfg = Config()
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    path = write(tmp_path, {"optim": {"lrr": 0.1}})
    assert main(["config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'optim.lrr'" in err and str(path) in err


def test_cli_config_prints_resolved_yaml(tmp_path, capsys):
    path = write(tmp_path, {"train": {"run_dir": "r"}})
    assert main(["config", str(path), "optim.lr=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.5 and printed["train"]["run_dir"] == "r"


# ----------------------------------------------------------- one-line errors (issue 15)
def test_a_yaml_syntax_error_names_the_parser_reason_and_the_lines(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  batch_size: 16\noptim:\n  lr: [0.1\n  name: lars\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text
    assert "expected ',' or ']'" in text  # the parser's reason (was hidden)
    assert "line 4" in text  # where the unclosed bracket is (only line 5 was named)


def test_an_override_whose_value_yaml_would_cut_at_a_comment_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("log:\n  wandb:\n    name: x\n")
    with pytest.raises(ConfigError, match=r"log\.wandb\.name=run #3.*comment"):
        load_config(path, ["log.wandb.name=run #3"])
    assert load_config(path, ['log.wandb.name="run #3"']).log.wandb.name == "run #3"
    assert load_config(path, ["log.wandb.name=run#3"]).log.wandb.name == "run#3"


@pytest.mark.parametrize("size", [0, 1, -4])
def test_a_batch_below_two_names_the_key_and_where_it_was_set(tmp_path, size):
    """In the file: the file; on the command line: the override (it is not in the file)."""
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  batch_size: {size}\n")
    with pytest.raises(ConfigError, match=rf"{path}: data\.batch_size: must be at least 2"):
        load_config(path)
    path.write_text("data:\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=rf"^override 'data\.batch_size={size}': "
                                          rf"data\.batch_size: must be at least 2"):
        load_config(path, [f"data.batch_size={size}"])


@pytest.mark.parametrize("override, complaint", [
    ("augment.fill=reflection", "augment.fill: expected a list, got 'reflection'"),
    ("augment.kornia={op: RandomGamma}", "augment.kornia: expected a list, got {'op'"),
    ("augment.kornia=[RandomGamma]",
     "augment.kornia[0]: expected a mapping such as {op: ..., ...}, got 'RandomGamma'"),
])
def test_a_list_given_a_scalar_or_a_mapping_is_one_line(tmp_path, override, complaint):
    """dacite iterated over the string's characters or the mapping's keys: a ValueError
    traceback, or a message quoting a generator object."""
    path = tmp_path / "c.yaml"
    path.write_text("augment:\n  flip_p: 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert str(info.value).startswith(f"override '{override}': {complaint}"), str(info.value)
    assert "generator" not in str(info.value)
