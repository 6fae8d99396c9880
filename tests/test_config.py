from pathlib import Path

import pytest

from pipeline.config import Config, load_config, parse_override, to_dict
from pipeline.errors import UserError
from pipeline.trainer import _check

BASE = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


def test_defaults_then_yaml_then_overrides(tmp_path):
    (tmp_path / "exp.yaml").write_text("data:\n  batch_size: 32\n  image_size: 128\n")
    cfg = load_config(tmp_path / "exp.yaml", ["data.batch_size=16", "data.crop=center", "data.hw_decoder_load=1"])
    assert (cfg.data.batch_size, cfg.data.image_size, cfg.data.crop) == (16, 128, "center")
    assert cfg.data.hw_decoder_load == 1.0 and isinstance(cfg.data.hw_decoder_load, float)
    assert cfg.data.loader == Config().data.loader  # untouched keys keep their defaults


def test_the_shipped_base_config_loads():
    assert to_dict(load_config(BASE))["data"]["batch_size"] == 128


def test_an_unknown_key_in_a_file_names_the_file_and_the_key(tmp_path):
    (tmp_path / "exp.yaml").write_text("data:\n  batchsize: 32\n")
    with pytest.raises(UserError, match=r"exp.yaml: unknown key data.batchsize; the keys here are data.shards, "):
        load_config(tmp_path / "exp.yaml")


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=big", r"override 'data.batch_size=big': data.batch_size must be int, not 'big'"),
    ("data.flip=1", r"data.flip must be bool, not 1"),
    ("data.batch_size=true", r"data.batch_size must be int, not True"),
    ("optim.lr=1", r"unknown key optim; the keys here are data, model, train, log"),
    ("data=3", r"data must be a mapping"),
    ("data.batch_size", r"is not key=value"),
    ("data..x=1", r"is not key=value"),
    ("data.shards=[/a,/b", r"override 'data.shards=\[/a,/b': its value is not valid YAML .* quote it as text, as in data.shards='\[/a,/b'"),
    ("train.name=*x", r"its value is not valid YAML"),
    ("train.lr_G=nan", r"train.lr_G must be a finite number, not nan"),
    ("train.ema_beta=.inf", r"train.ema_beta must be a finite number"),
    ("train.betas=[0.5, fast]", r"train.betas\[1\] must be float, not 'fast'"),
    ("log.tags=[smoke, 2024]", r"log.tags\[1\] must be str, not 2024: fix that value \(quote a text value"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_a_missing_or_broken_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [1,\n")
    with pytest.raises(UserError, match=r"bad.yaml is not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_a_broken_inherit_line_or_an_unreadable_file_names_the_file(tmp_path):
    (tmp_path / "child.yaml").write_text("inherit: nope.yaml\n")
    with pytest.raises(UserError, match=r"child.yaml inherits from .*nope.yaml, which does not exist: fix its inherit line"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "child.yaml").write_text("inherit: [base.yaml]\n")
    with pytest.raises(UserError, match=r"child.yaml: inherit must name one file, not \['base.yaml'\]"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "latin1.yaml").write_bytes("train:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"config file .*latin1.yaml cannot be read .*: pass a readable UTF-8 text file"):
        load_config(tmp_path / "latin1.yaml")


def test_a_section_with_no_keys_changes_nothing(tmp_path):
    (tmp_path / "exp.yaml").write_text("data:\n  batch_size: 32\ntrain:\n  # lr_D: 1e-3\n")
    assert load_config(tmp_path / "exp.yaml").train == Config().train


def test_a_text_field_keeps_the_text_yaml_would_read_as_another_type():
    cfg = load_config(None, ["train.name=no", "log.group=2024-05-01", "train.resume=123"])
    assert (cfg.train.name, cfg.log.group, cfg.train.resume) == ("no", "2024-05-01", "123")
    assert load_config(None, ["log.wandb=off"]).log.wandb == "off"  # the trainer then names the modes there are
    assert load_config(None, ["data.flip=no"]).data.flip is False  # a flag is no text field


def test_learning_rates_in_exponent_notation_are_floats(tmp_path):
    (tmp_path / "exp.yaml").write_text("train:\n  lr_D: 2e-4\n")
    cfg = load_config(tmp_path / "exp.yaml", ["train.lr_G=5e-4"])
    assert (cfg.train.lr_D, cfg.train.lr_G) == (2e-4, 5e-4)
    with pytest.raises(UserError, match=r"train.lr_G must be float, not 'fast'"):
        load_config(None, ["train.lr_G=fast"])


def test_override_values_are_read_as_yaml():
    assert parse_override("data.shards=/a/b=c") == {"data": {"shards": "/a/b=c"}}
    assert parse_override("data.shards=[/a, /b]") == {"data": {"shards": ["/a", "/b"]}}


@pytest.mark.parametrize("path", sorted(BASE.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_passes_the_trainers_checks(path):
    cfg = load_config(path)
    _check(cfg)
    if path.name == "sbi-only.yaml":  # the detector recipe measured best: D alone, 128 px, ndf 64
        assert (cfg.train.gan_weight, cfg.train.sbi_weight, cfg.data.image_size, cfg.model.ndf) == (0, 1, 128, 64)


@pytest.mark.parametrize("override, message", [
    ("data.drop_last=false", r"data.drop_last is false: ranks would then take different numbers of steps"),
    ("train.max_steps=0", r"train.max_steps is 0: it must be at least 1, or null"),
    ("log.wandb=offlne", r"log.wandb 'offlne' is not one of \('offline', 'online', 'disabled'\)"),
    ("model.d_gan_head=both", r"model.d_gan_head 'both' is not one of \('own', 'shared'\)"),
])
def test_training_settings_that_cannot_work_are_refused_before_anything_starts(override, message):
    with pytest.raises(UserError, match=message):
        _check(load_config(BASE, [override]))
