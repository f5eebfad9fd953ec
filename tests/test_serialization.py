"""Atomic writes, weights_only loading, safetensors export."""
from __future__ import annotations

import json
import math
import os

import pytest
import timm
import torch

from kamim.serialization import (
    CheckpointError, UnsafeCheckpointError, atomic_save, atomic_write_json, atomic_write_text,
    load_safetensors, read_safetensors_metadata, safe_load, save_safetensors,
)


class _RunsCode:
    """Unpickling this would call ``open(marker, "w")``, i.e. run code with a visible side effect."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while pickling")


def test_atomic_save_round_trip(tmp_path):
    obj = {"w": torch.arange(6.0).reshape(2, 3), "step": 7, "cfg": {"a": [1, 2.5, "x"]}, "t": (1, 2)}
    path = atomic_save(obj, tmp_path / "sub" / "ckpt.pt")
    out = safe_load(path)
    assert torch.equal(out["w"], obj["w"]) and out["step"] == 7 and out["cfg"] == obj["cfg"] and out["t"] == (1, 2)
    assert sorted(os.listdir(tmp_path / "sub")) == ["ckpt.pt"]


def test_safe_load_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        safe_load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()  # nothing ran


def test_safe_load_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pt"):
        safe_load(tmp_path / "nope.pt")
    good = atomic_save({"w": torch.ones(1000)}, tmp_path / "good.pt")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*trunc.pt \(truncated or corrupt\?\)") as err:
        safe_load(trunc)
    assert "\n" not in str(err.value)
    # arbitrary bytes (not a zip, not a pickle) fail inside torch's unpickler in assorted ways
    for i, junk in enumerate([b"\x80\x02K\x01.", b"garbage" * 50, bytes(range(256)) * 4, b"\x80\x02)R."]):
        bad = tmp_path / f"junk{i}.pt"
        bad.write_bytes(junk)
        with pytest.raises((CheckpointError, UnsafeCheckpointError)) as err:
            obj = safe_load(bad)
            pytest.fail(f"{junk[:10]!r} loaded as {obj!r}")
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_atomic_save_failure_leaves_no_partial_file_and_keeps_old(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom while pickling"):
        atomic_save({"step": 2, "w": torch.zeros(3), "bad": _Unpicklable()}, path)
    assert path.read_bytes() == before
    assert safe_load(path)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # the temp file was removed
    with pytest.raises(RuntimeError):
        atomic_save({"bad": _Unpicklable()}, tmp_path / "new.pt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_atomic_text_and_json(tmp_path):
    atomic_write_text("hello\n", tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_text() == "hello\n"
    atomic_write_json({"loss": 0.5, "runs": [1, 2]}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"loss": 0.5, "runs": [1, 2]}
    with pytest.raises(ValueError):
        atomic_write_json({"loss": math.nan}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["loss"] == 0.5
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "r.json"]


def test_safetensors_shared_and_noncontiguous(tmp_path):
    w = torch.randn(4, 6)
    sd = {"a": w, "tied": w, "t": w.t(), "view": w[:, ::2]}  # shared storage + non-contiguous views
    path = save_safetensors(sd, tmp_path / "x.safetensors", metadata={"name": "m", "kwargs": {"k": [1, 2]}, "step": 3})
    out, meta = load_safetensors(path)
    assert set(out) == set(sd)
    for k in sd:
        assert torch.equal(out[k], sd[k])
    assert meta == {"name": "m", "kwargs": '{"k": [1, 2]}', "step": "3"}
    assert read_safetensors_metadata(path)["name"] == "m"
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError):
        load_safetensors(tmp_path / "junk.safetensors")


def test_safetensors_timm_encoder_round_trip(tmp_path):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    save_safetensors(model.state_dict(), tmp_path / "enc.safetensors",
                     metadata={"model_name": "vit_tiny_patch16_224", "kwargs": kwargs})
    sd, meta = load_safetensors(tmp_path / "enc.safetensors")
    fresh = timm.create_model(meta["model_name"], pretrained=False, **json.loads(meta["kwargs"])).eval()
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_a_file_that_is_no_checkpoint_is_called_that(tmp_path):
    from kamim.serialization import CheckpointError, UnsafeCheckpointError

    garbage = tmp_path / "g.pt"
    garbage.write_text("garbage\n")
    with pytest.raises(CheckpointError, match=r"g.pt is not a PyTorch checkpoint \(neither a zip archive nor a "
                                              r"pickle: it starts with b'garb'\)") as exc:
        safe_load(garbage)
    assert not isinstance(exc.value, UnsafeCheckpointError) and "run code" not in str(exc.value)
    bad_pickle = tmp_path / "p.pt"
    bad_pickle.write_bytes(b"\x80\x02garbage")  # a pickle header, then nonsense
    with pytest.raises(CheckpointError, match="truncated or corrupt") as exc:
        safe_load(bad_pickle)
    assert not isinstance(exc.value, UnsafeCheckpointError)
