"""DDP helpers and a real 2-process torchrun (gloo, CPU) pretraining run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kamim import distributed as kdist
from kamim.config import load_config
from kamim.data import write_demo_folder
from kamim.engine.pretrain import pretrain
from kamim.metrics_log import read_metrics
from kamim.serialization import safe_load

SMALL = [
    "model.img_size=48", "model.overrides={embed_dim: 32, depth: 2, num_heads: 2}", "optim.batch_size=8",
    "run.progress=false", "run.ckpt_every_steps=0", "run.log_every=1", "run.device=cpu",
]

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from kamim import distributed as kdist
    from kamim.config import load_config
    from kamim.engine.pretrain import pretrain

    overrides, data, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    info = kdist.init_distributed("cpu")
    assert (info.world_size, kdist.get_world_size()) == (2, 2) and info.rank == kdist.get_rank()
    assert kdist.is_main_process() == (info.rank == 0)
    mean = kdist.all_reduce_mean(torch.tensor([float(info.rank), 10.0 * info.rank]))
    assert mean.tolist() == [0.5, 5.0], mean
    assert kdist.all_reduce_sum(torch.tensor([1])).item() == 2
    assert kdist.broadcast_object({"from": info.rank}) == {"from": 0}
    kdist.barrier()
    pretrain(load_config("tiny_kamim", overrides), data, out, resume="none")
    assert kdist.is_distributed()  # pretrain leaves a group it did not create alone
    kdist.cleanup()
    assert not kdist.is_distributed()
    print(f"worker-ok {info.rank}", flush=True)  # one write: the two ranks share stdout
""")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def test_single_process_helpers_are_identities():
    info = kdist.init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.device, info.is_main) == (0, 1, 0, torch.device("cpu"), True)
    assert not kdist.is_distributed() and kdist.get_rank() == 0 and kdist.get_world_size() == 1
    assert kdist.is_main_process()
    t = torch.tensor([3.0])
    assert kdist.all_reduce_mean(t) is t and t.item() == 3.0
    assert kdist.broadcast_object([1, 2]) == [1, 2]
    kdist.barrier()
    kdist.cleanup()


def test_bad_device_and_env(monkeypatch):
    with pytest.raises(ValueError, match="device='gpu' is not valid"):
        kdist.resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' requested but CUDA is not available"):
            kdist.resolve_device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="environment variable WORLD_SIZE='two' is not an integer"):
        kdist.init_distributed("cpu")


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    """2 ranks x 2 accumulation steps x micro-batch 2 == 1 rank x batch 8: same parameters after 4
    steps; resuming the 2-rank run in 1 process continues exactly like the 1-process run."""
    data = write_demo_folder(tmp_path / "demo", crops_per_photo=1, max_side=96)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ddp_over = SMALL + ["run.max_steps=4", "optim.accum_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
         json.dumps(ddp_over), str(data), str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker-ok 0" in proc.stdout and "worker-ok 1" in proc.stdout

    single = pretrain(load_config("tiny_kamim", SMALL + ["run.max_steps=6", "run.keep_step_checkpoints=true",
                                                         "run.ckpt_every_steps=4"]),
                      data, tmp_path / "single", resume="none")
    ddp = safe_load(tmp_path / "ddp" / "checkpoint-last.pt")
    ref4 = safe_load(tmp_path / "single" / "checkpoint-00000004.pt")
    assert ddp["step"] == 4 and ddp["world_size"] == 2 and len(ddp["rng"]) == 2
    for k, v in ref4["model"].items():
        torch.testing.assert_close(ddp["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # metrics come from rank 0 only, one row per step, losses averaged over the ranks
    m_ddp, m_one = read_metrics(tmp_path / "ddp" / "metrics.jsonl"), read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert [r["step"] for r in m_ddp] == [1, 2, 3, 4]
    for a, b in zip(m_ddp, m_one):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)

    # world size 2 -> 1 on resume: the data order is world-size independent
    resumed = pretrain(load_config("tiny_kamim", SMALL + ["run.max_steps=6", "optim.accum_steps=2"]),
                       data, tmp_path / "ddp", resume="auto")
    ref6 = safe_load(single)["model"]
    for k, v in safe_load(resumed)["model"].items():
        torch.testing.assert_close(v, ref6[k], rtol=1e-4, atol=1e-5, msg=k)

