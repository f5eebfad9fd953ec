"""Checkpoint metadata is data: it never makes the loader fetch or open anything."""
from __future__ import annotations

import json

import pytest
import timm

from kamim.checkpoints import load_encoder
from kamim.serialization import CheckpointError, save_safetensors


def _export(tmp_path, model_name: str, kwargs: dict) -> str:
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32,
                              num_heads=2, num_classes=0)
    path = tmp_path / "encoder.safetensors"
    save_safetensors(model.state_dict(), path, metadata={"format": "kamim-encoder", "model_name": model_name,
                                                         "kwargs": json.dumps(kwargs)})
    return str(path)


GOOD = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}


def test_a_valid_export_loads(tmp_path):
    assert load_encoder(_export(tmp_path, "vit_tiny_patch16_224", GOOD)).image_size == (32, 32)


@pytest.mark.parametrize("name", ["hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "timm/vit_tiny_patch16_224",
                                  "no_such_model", ""])
def test_model_names_that_download_or_do_not_exist_are_refused(tmp_path, name, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("network"))
    with pytest.raises(CheckpointError, match="not a timm architecture name|lacks 'model_name'"):
        load_encoder(_export(tmp_path, name, GOOD))


@pytest.mark.parametrize("extra", [{"checkpoint_path": "/etc/passwd"}, {"pretrained": True},
                                   {"pretrained_cfg_overlay": {"file": "/x"}}])
def test_kwargs_that_open_or_fetch_are_refused(tmp_path, extra):
    with pytest.raises(CheckpointError, match=f"refusing model kwargs {next(iter(extra))}"):
        load_encoder(_export(tmp_path, "vit_tiny_patch16_224", {**GOOD, **extra}))


@pytest.mark.parametrize("bad", [{"depth": -3}, {"num_heads": 0}, {"patch_size": 0}, {"mlp_ratio": -1},
                                 {"img_size": 10_000_000}, {"depth": True}, {"img_size": [32, 0]}])
def test_impossible_sizes_in_metadata_are_one_line(tmp_path, bad):
    key, value = next(iter(bad.items()))
    import re

    with pytest.raises(CheckpointError, match=re.escape(f"model kwarg {key}={value!r} in the checkpoint metadata is not in")):
        load_encoder(_export(tmp_path, "vit_tiny_patch16_224", {**GOOD, **bad}))
