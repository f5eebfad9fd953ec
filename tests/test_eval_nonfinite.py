"""Non-finite (diverged) encoders are refused by every evaluation, naming the checkpoint and the layer."""
from __future__ import annotations

import pytest
import torch
from eval_helpers import photo_crops, tiny_vit

from kamim.cli import main
from kamim.eval.features import NonFiniteFeaturesError, extract_dataset_features, extract_features
from kamim.eval.knn import KNNConfig, run_knn


def _diverged_vit() -> torch.nn.Module:
    """A 2-block tiny ViT whose second block has one NaN weight: layer 1 is finite, layer 2 is not."""
    model = tiny_vit(depth=2).eval()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[0, 0] = float("nan")
    return model


def _overflowing_vit() -> torch.nn.Module:
    """Finite weights (a saved checkpoint loads) whose second block overflows to inf: layer 2 is non-finite."""
    model = tiny_vit(depth=2).eval()
    with torch.no_grad():
        model.blocks[1].attn.proj.bias[3] = 3e38
        model.blocks[1].mlp.fc2.bias[3] = 3e38
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return photo_crops(tmp_path_factory.mktemp("nonfinite"), n_train_per_class=2, n_val_per_class=1)


def _knn_config(checkpoint, data, out, **kw) -> KNNConfig:
    return KNNConfig(checkpoint=checkpoint, data=str(data), output_dir=str(out), ks=(3,), batch_size=3,
                     num_workers=0, device="cpu", amp="none", progress=False, **kw)


def test_extract_features_names_the_layer_and_source():
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(extract_features(_diverged_vit(), x, 1)[1]).all()  # the layer before is fine
        with pytest.raises(NonFiniteFeaturesError) as err:
            extract_features(_diverged_vit(), x, "all", source="run/encoder.safetensors")
    text = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in text
    assert text == ("non-finite features at layer 2 of run/encoder.safetensors (4 of 4 images): "
                    "the encoder weights are probably diverged")


def test_dataset_features_name_the_batch():
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])) for _ in range(2)]
    with pytest.raises(NonFiniteFeaturesError, match=r"^non-finite features at layer 2 of ckpt.pt "
                                                     r"\(2 of 2 images in batch 0 of train features\)"):
        extract_dataset_features(_diverged_vit(), batches, [2], progress=False, desc="train features",
                                 source="ckpt.pt")


def test_float16_bank_overflow_is_refused_and_float32_keeps_it():
    model = tiny_vit(depth=2).eval()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias[3] = 1e6  # finite in float32, inf in a float16 bank
    batches = [(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 0]))]
    feats, _ = extract_dataset_features(model, batches, [2], progress=False, store_dtype=torch.float32)
    assert torch.isfinite(feats[2]).all() and feats[2].abs().max() > 65504
    with pytest.raises(NonFiniteFeaturesError, match=r"layer 2 of m.pt \(3 of 3 images in val features\): "
                                                     r"they overflow the torch.float16 bank"):
        extract_dataset_features(model, batches, [2], progress=False, store_dtype=torch.float16,
                                 desc="val features", source="m.pt")


def test_run_knn_refuses_an_in_memory_diverged_model(data, tmp_path):
    with pytest.raises(ValueError, match=r"non-finite features at layer 2 of <in-memory VisionTransformer> "
                                         r"\(3 of 3 images in batch 0 of train features\)"):
        run_knn(_knn_config(_diverged_vit(), data, tmp_path / "o", layers="all"))
    assert not (tmp_path / "o" / "knn.json").exists()


def test_run_knn_refuses_a_saved_diverged_checkpoint(data, tmp_path):
    # kamim.checkpoints refuses NaN weights at load; weights that overflow in the forward get here
    ckpt = tmp_path / "diverged.pt"
    torch.save(_overflowing_vit().state_dict(), ckpt)
    with pytest.raises(NonFiniteFeaturesError, match=rf"at layer 2 of {ckpt} "):
        run_knn(_knn_config(str(ckpt), data, tmp_path / "o", layers="-1", load_options={"num_heads": 2}))
    # the finite layer still evaluates
    res = run_knn(_knn_config(str(ckpt), data, tmp_path / "o1", layers="1", load_options={"num_heads": 2}))
    assert [r["layer"] for r in res["results"]] == [1]


def test_cli_knn_exits_2_with_one_line(data, tmp_path, capsys):
    ckpt = tmp_path / "diverged.pt"
    torch.save(_overflowing_vit().state_dict(), ckpt)
    capsys.readouterr()
    rc = main(["-q", "knn", "--checkpoint", str(ckpt), "--num-heads", "2", "--data", str(data),
               "--out", str(tmp_path / "knn"), "--layers", "all", "--k", "3", "--batch-size", "4",
               "--num-workers", "0", "--device", "cpu", "--amp", "none", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("kamim: error: non-finite features at layer 2 of ") and str(ckpt) in err
    assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "knn" / "knn.json").exists()
