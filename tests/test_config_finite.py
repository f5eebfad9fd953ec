"""Config validation refuses NaN/inf in every float field, and YAML files with duplicate keys."""
from __future__ import annotations

import pytest

from kamim.config import ConfigError, apply_overrides, from_dict, load_config


@pytest.mark.parametrize("override, message", [
    ("optim.min_lr=.nan", "optim.min_lr=nan must be a finite number >= 0"),
    ("optim.warmup_lr=.inf", "optim.warmup_lr=inf must be a finite number >= 0"),
    ("optim.weight_decay=.inf", "optim.weight_decay=inf must be a finite number >= 0"),
    ("optim.weight_decay=.nan", "optim.weight_decay=nan must be a finite number >= 0"),
    ("optim.clip_grad=.inf", "optim.clip_grad=inf must be a finite number >= 0"),
    ("optim.clip_grad=.nan", "optim.clip_grad=nan must be a finite number >= 0"),
    ("optim.lr=.inf", "optim.lr=inf must be a finite number > 0"),
    ("optim.lr=.nan", "optim.lr=nan must be a finite number > 0"),
    ("optim.lr=1e400", "optim.lr=inf must be a finite number > 0"),  # a YAML 1.1 string, overflows float()
    ("optim.base_lr=.inf", "optim.base_lr=inf must be a finite number > 0"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number > 0"),  # the string 'nan' parses as a float
    ("optim.betas=[0.9, .nan]", "optim.betas=[0.9, nan] must be finite numbers in [0, 1)"),
    ("kamim.temperature=.inf", "kamim.temperature=inf must be a finite number > 0"),
    ("kamim.temperature=.nan", "kamim.temperature=nan must be a finite number > 0"),
    ("moco.temperature=.inf", "moco.temperature=inf must be a finite number > 0"),
    ("moco.momentum=.nan", "moco.momentum=nan must be a finite number in [0, 1]"),
    ("mask.mask_ratio=.nan", "mask.mask_ratio=nan must be a finite number in (0, 1)"),
    ("data.hflip=.nan", "data.hflip=nan must be a finite number in [0, 1]"),
    ("data.crop_scale=[.nan, 1]", "data.crop_scale=[nan, 1.0] must be finite numbers [min, max]"),
    ("data.crop_ratio=[0.75, .inf]", "data.crop_ratio=[0.75, inf] must be finite numbers [min, max]"),
])
def test_non_finite_values_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny_kamim", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_non_finite_values_are_refused_from_a_dict_too():
    with pytest.raises(ConfigError, match=r"optim.min_lr=nan must be a finite number >= 0"):
        from_dict({"optim": {"min_lr": float("nan")}})
    with pytest.raises(ConfigError, match=r"optim.lr=-inf must be a finite number > 0"):
        from_dict({"optim": {"lr": float("-inf")}})


def test_finite_values_at_the_edges_still_pass():
    cfg = load_config("tiny_kamim", ["optim.min_lr=0", "optim.weight_decay=0", "optim.clip_grad=0",
                                     "data.hflip=1", "data.crop_ratio=[0.5, 1e6]", "optim.lr=1e39"])
    assert cfg.optim.clip_grad == 0.0 and cfg.data.crop_ratio == (0.5, 1e6) and cfg.optim.lr == 1e39


def test_duplicate_key_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("base: tiny_kamim\noptim:\n  lr: 0.001\n  epochs: 3\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    text = str(err.value)
    assert str(path) in text and "duplicate key 'lr' (line 5)" in text and "\n" not in text


def test_duplicate_top_level_key_in_a_base_file_is_refused(tmp_path):
    (tmp_path / "parent.yaml").write_text("base: tiny_kamim\nmethod: simmim\nmethod: kamim\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\n")
    with pytest.raises(ConfigError, match=r"parent.yaml has duplicate key 'method' \(line 3\)"):
        load_config(str(tmp_path / "child.yaml"))


def test_same_key_in_different_mappings_and_yaml_merge_keys_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(
        "base: tiny_kamim\n"
        "kamim: &k\n  temperature: 0.5\n"
        "moco:\n  temperature: 0.3\n"
        "model:\n  overrides:\n    <<: {drop_path_rate: 0.2, depth: 2}\n    drop_path_rate: 0.1\n"
    )
    cfg = load_config(str(path))
    assert (cfg.kamim.temperature, cfg.moco.temperature) == (0.5, 0.3)
    assert cfg.model.overrides == {"drop_path_rate": 0.1, "depth": 2}  # explicit key overrides the merge


def test_duplicate_key_inside_an_override_value_is_refused():
    with pytest.raises(ConfigError, match=r"bad override value in 'model.overrides=\{a: 1, a: 2\}': duplicate key 'a'"):
        apply_overrides({}, ["model.overrides={a: 1, a: 2}"])


def test_unsafe_tags_are_still_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("method: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(path))


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained", "pretrained_cfg_overlay"])
def test_model_overrides_that_open_or_fetch_files_are_refused(key, tmp_path):
    """A run's config.yaml with model.overrides.checkpoint_path used to make timm open that file
    when `kamim reconstruct` rebuilt the model: refused wherever a config is loaded."""
    from kamim.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"model.overrides may not set {key}: they make timm open a file"):
        load_config("tiny_kamim", [f"model.overrides.{key}={tmp_path / 'x.pth'}"])
