"""Config dataclasses, YAML presets, overrides and validation."""
from __future__ import annotations

import pytest
import yaml

from kamim.config import (
    Config, ConfigError, apply_overrides, config_diff, from_dict, list_presets, load_config,
    save_config, to_dict,
)

PAPER_ARCHS = ("vit_t", "vit_s", "vit_b", "swin_t", "swin_b")


def test_defaults_round_trip_dict_and_yaml(tmp_path):
    cfg = load_config("kamim_vit_b", ["model.overrides.drop_path_rate=0.1", "optim.lr=3e-4"])
    d = to_dict(cfg)
    assert isinstance(d["data"]["crop_scale"], list)  # YAML/JSON friendly
    assert from_dict(d) == cfg
    path = tmp_path / "cfg.yaml"
    save_config(cfg, path)
    assert yaml.safe_load(path.read_text()) == d
    assert load_config(str(path)) == cfg


def test_paper_preset_values():
    cfg = load_config("kamim_vit_b")
    assert (cfg.method, cfg.model.arch, cfg.model.img_size) == ("kamim", "vit_b", 192)
    assert (cfg.mask.mask_patch_size, cfg.mask.mask_ratio) == (32, 0.6)
    assert (cfg.kamim.detector, cfg.kamim.render, cfg.kamim.weight_patch_size, cfg.kamim.temperature) == (
        "fast", "ring", 8, 0.25)
    o = cfg.optim
    assert (o.opt, o.epochs, o.warmup_epochs, o.batch_size, o.weight_decay, o.clip_grad) == (
        "adamw", 100, 10, 2048, 0.05, 1.0)
    assert o.betas == (0.9, 0.999) and (o.min_lr, o.warmup_lr) == (1e-5, 1e-6)
    assert o.peak_lr() == pytest.approx(8e-4)  # reference KAMIM LR at batch 2048
    assert cfg.run.amp == "bf16"
    assert cfg.data.crop_scale == (0.67, 1.0)
    assert cfg.data.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    simmim = load_config("simmim_vit_b")
    assert simmim.method == "simmim"
    assert config_diff(to_dict(simmim), to_dict(cfg)) == ["method"]


def test_every_preset_loads_and_validates():
    names = list_presets()
    expected = {f"{m}_{a}" for m in ("simmim", "kamim") for a in PAPER_ARCHS}
    expected |= {"moco_vit_b", "moco_vit_s", "tiny_kamim", "tiny_simmim", "tiny_moco"}
    assert expected <= set(names)
    assert not any(n.startswith("_") for n in names)  # shared bases are not presets
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, Config)
        cfg.validate()
        img = cfg.model.img_size
        assert img % cfg.mask.mask_patch_size == 0 and img % cfg.kamim.weight_patch_size == 0


def test_tiny_presets_geometry():
    for method in ("simmim", "kamim", "moco"):
        cfg = load_config(f"tiny_{method}")
        assert cfg.method == method
        assert (cfg.model.arch, cfg.model.img_size, cfg.mask.mask_patch_size) == ("vit_pico", 96, 16)
        assert cfg.data.path == "demo" and cfg.data.num_workers == 0
    assert load_config("moco_vit_b").model.img_size == 224


def test_overrides_are_yaml_parsed():
    cfg = load_config("tiny_kamim", [
        "kamim.temperature=0.5", "optim.base_lr=1e-4",  # YAML 1.1 reads 1e-4 as a string
        "data.crop_scale=[0.5, 1]", "run.max_steps=null", "run.compile=true", "optim.clip_grad=null",
        "model.overrides.drop_path_rate=0.1", "model.overrides.reg_tokens=4", "data.path=/some/where",
    ])
    assert cfg.kamim.temperature == 0.5 and isinstance(cfg.kamim.temperature, float)
    assert cfg.optim.base_lr == 1e-4
    assert cfg.data.crop_scale == (0.5, 1.0)
    assert cfg.run.max_steps is None and cfg.run.compile is True and cfg.optim.clip_grad is None
    assert cfg.model.overrides == {"drop_path_rate": 0.1, "reg_tokens": 4}
    assert cfg.data.path == "/some/where"
    # later overrides win
    assert load_config("tiny_kamim", ["kamim.temperature=1", "kamim.temperature=2"]).kamim.temperature == 2.0


def test_peak_lr_convention():
    cfg = load_config("kamim_vit_b", ["optim.base_lr=1e-4", "optim.batch_size=1024"])
    assert cfg.optim.peak_lr() == pytest.approx(1e-4 * 1024 / 512)
    cfg = load_config("kamim_vit_b", ["optim.lr=0.003"])
    assert cfg.optim.peak_lr() == 0.003


def test_base_inheritance_from_user_file(tmp_path):
    (tmp_path / "parent.yaml").write_text("base: tiny_kamim\nkamim:\n  temperature: 1.5\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\noptim:\n  epochs: 3\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.kamim.temperature, cfg.optim.epochs, cfg.model.arch) == (1.5, 3, "vit_pico")
    assert cfg.kamim.weight_patch_size == 8  # untouched keys come from the base chain


@pytest.mark.parametrize("override, message", [
    ("kamim.temperature=0", "kamim.temperature=0.0 must be > 0"),
    ("kamim.temperature=-1", "kamim.temperature=-1.0 must be > 0"),
    ("moco.temperature=0", "moco.temperature=0.0 must be > 0"),
    ("mask.mask_ratio=1.0", "mask.mask_ratio=1.0 must be in (0, 1)"),
    ("mask.mask_ratio=0", "mask.mask_ratio=0.0 must be in (0, 1)"),
    ("mask.mask_patch_size=40", "mask.mask_patch_size=40 must divide model.img_size=96"),
    ("kamim.weight_patch_size=7", "kamim.weight_patch_size=7 must divide model.img_size=96"),
    ("kamim.detector=surf", "kamim.detector='surf' is not valid; expected one of: fast"),
    ("kamim.render=blob", "kamim.render='blob' is not valid; expected one of: ring, point, disk"),
    ("kamim.normalize=sum", "kamim.normalize='sum' is not valid"),
    ("method=mae", "method='mae' is not valid; expected one of: simmim, kamim, moco"),
    ("model.arch=vit_huge", "model.arch='vit_huge' is not valid; expected one of: vit_t"),
    ("run.amp=fp8", "run.amp='fp8' is not valid; expected one of: bf16, fp16, none"),
    ("run.device=tpu", "run.device='tpu' is not valid"),
    ("optim.accum_steps=3", "optim.accum_steps=3 must be positive and divide optim.batch_size=16"),
    ("optim.warmup_epochs=10", "optim.warmup_epochs=10 must be in [0, optim.epochs=10)"),
    ("optim.epochs=0", "optim.epochs=0 must be positive"),
    ("optim.lr=0", "optim.lr=0.0 must be > 0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas=[0.9, 1.0] must be in [0, 1)"),
    ("data.crop_scale=[0.8, 0.5]", "data.crop_scale=[0.8, 0.5] must be [min, max] with 0 < min <= max <= 1"),
    ("data.hflip=2", "data.hflip=2.0 must be in [0, 1] (a probability)"),
    ("run.max_steps=0", "run.max_steps=0 must be positive"),
    ("run.max_steps_schedule=true", "run.max_steps_schedule=true needs run.max_steps"),
    ("optim.epochs=abc", "config key 'optim.epochs' expects an integer, got 'abc'"),
    ("optim.epochs=2.5", "config key 'optim.epochs' expects an integer, got 2.5"),
    ("run.compile=maybe", "config key 'run.compile' expects true/false, got 'maybe'"),
    ("data.crop_scale=[1]", "config key 'data.crop_scale' expects a list of 2 values"),
    ("kamim.temp=1", "unknown config key 'kamim.temp'; valid keys under kamim: detector, render"),
    ("colour=red", "unknown config key 'colour'; valid keys: method, model"),
    ("kamim.temperature.x=1", "config key 'kamim.temperature' has no sub-keys"),
    ("noequals", "bad override 'noequals': expected key.sub=value"),
    ("optim.opt=adamx", "optim.opt='adamx' is not a timm optimizer"),
])
def test_validation_errors_are_one_line_and_name_the_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny_kamim", [override])
    text = str(err.value)
    assert message in text
    assert "\n" not in text
    assert isinstance(err.value, ValueError)


def test_unknown_preset_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'kamim_vit_z'.*presets: .*kamim_vit_b.*tiny_kamim"):
        load_config("kamim_vit_z")
    with pytest.raises(FileNotFoundError, match="config file not found: .*missing.yaml"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(lst))
    with pytest.raises(ConfigError, match="unknown config key 'model.size'"):
        from_dict({"model": {"size": 3}})


def test_circular_base_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular 'base'"):
        load_config(str(tmp_path / "a.yaml"))


def test_apply_overrides_does_not_mutate_input():
    d = {"kamim": {"temperature": 0.25}}
    out = apply_overrides(d, ["kamim.temperature=2"])
    assert d == {"kamim": {"temperature": 0.25}} and out == {"kamim": {"temperature": 2}}


def test_config_diff_ignores_execution_keys():
    a = to_dict(load_config("tiny_kamim"))
    b = to_dict(load_config("tiny_kamim", ["run.max_steps=3", "data.num_workers=2", "run.log_every=5"]))
    assert config_diff(a, b) == []
    c = to_dict(load_config("tiny_kamim", ["kamim.temperature=0.5", "optim.batch_size=32"]))
    assert config_diff(a, c) == ["kamim.temperature", "optim.batch_size"]
    # evaluation recipes' flat keys, and everything under an ignored key
    assert config_diff({"device": "cpu", "load_options": {"strict": True}, "lr": (1, 2)},
                       {"device": "cuda", "load_options": {"strict": False}, "lr": [1, 2]}) == []
    assert config_diff({"load_options_x": 1}, {"load_options_x": 2}) == ["load_options_x"]
