"""Evaluation run directories: exclusive while a run uses them, no debris of killed saves."""
from __future__ import annotations

import os

import pytest
from eval_helpers import photo_crops, tiny_vit

from kamim.eval.finetune import FinetuneConfig, finetune
from kamim.eval.linprobe import LinprobeConfig, linear_probe
from kamim.outputs import LOCK, OutputDirError, lock_output, lock_path

COMMON = dict(num_workers=0, device="cpu", amp="none", progress=False, epochs=1, warmup_epochs=0)


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    return photo_crops(tmp_path_factory.mktemp("locks") / "crops", n_train_per_class=2, n_val_per_class=1)


@pytest.mark.parametrize("task", ["linprobe", "finetune"])
def test_a_run_directory_in_use_is_refused_and_debris_removed(task, crops, tmp_path):
    out = tmp_path / task
    if task == "linprobe":
        run = lambda: linear_probe(LinprobeConfig(checkpoint=tiny_vit(2), data=str(crops), output_dir=str(out),  # noqa: E731
                                                  aug="none", batch_size=4, lr=0.01, **COMMON))
    else:
        run = lambda: finetune(FinetuneConfig(checkpoint=tiny_vit(2), data=str(crops), output_dir=str(out),  # noqa: E731
                                              auto_augment=None, mixup=0.0, cutmix=0.0, batch_size=4, **COMMON))
    run()
    debris = out / f".{task}.json.a1b2c3d4.tmp"
    debris.write_text("half a file")
    with lock_output(out):  # another process in the middle of a run
        with pytest.raises(OutputDirError, match=rf"is in use by another process \(pid {os.getpid()}\)"):
            run()
        assert debris.exists()
    run()  # released: resumes (nothing to do) and cleans up
    assert not debris.exists() and lock_path(out) == out.parent / f".{out.name}.lock" and lock_path(out).is_file()
    assert not (out / LOCK).exists()
