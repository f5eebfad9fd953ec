"""The training runtime shared by pretraining, probing and finetuning: step, state, scaler, RNG."""
from __future__ import annotations

import inspect
import random

import numpy as np
import pytest
import torch
from torch import nn

from kamim.interrupt import Interrupted, StopRequest
from kamim.runtime import (
    EpochStats, LossScaler, NonFiniteLossError, ResumableBatchSampler, TrainState, TrainStep, cosine_scheduler,
    rng_state, seed_all, set_rng_state,
)
from kamim.serialization import safe_load


def _setup(accum: int = 1, lr: float = 0.1, clip: float | None = None, total: int = 10):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = cosine_scheduler(opt, total_steps=total, warmup_steps=2, warmup_lr=0.0, min_lr=0.0)
    state = TrainState(model, opt, sched, LossScaler("cpu", enabled=False))
    return state, TrainStep(state, model, torch.device("cpu"), "none", accum_steps=accum, clip_grad=clip)


def _mse(state):
    return lambda b: ((state.model(b[0]) - b[1]) ** 2).mean()


def _data(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


def test_accumulation_equals_one_large_batch_and_schedule_is_per_optimizer_step():
    x, y = _data()
    one, step1 = _setup(accum=1)
    two, step2 = _setup(accum=2)
    for _ in range(3):  # warmup 2 steps: the LR changes between steps
        r1 = step1([(x, y)], _mse(one))
        r2 = step2([(x[:4], y[:4]), (x[4:], y[4:])], _mse(two))
        assert r1.lr == r2.lr
    assert one.step == two.step == 3
    for a, b in zip(one.model.parameters(), two.model.parameters()):
        torch.testing.assert_close(a, b)
    assert one.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * (0.5 + 0.5 * np.cos(np.pi * 1 / 8)))
    with pytest.raises(RuntimeError, match="got 1 micro-batches, expected accum_steps=2"):
        step2([(x, y)], _mse(two))


def test_empty_micro_batch_contributes_a_zero_loss_and_gradient():
    x, y = _data()
    state, step = _setup(accum=2)
    ref, ref_step = _setup(accum=2)
    expected = float(_mse(state)((x, y)).detach())
    out = step([None, (x, y)], lambda b: None if b is None else _mse(state)(b))
    ref_step([(x, y), (x, y)], _mse(ref))
    assert out.loss == pytest.approx(expected / 2)  # the empty micro-batch counts as a zero loss
    assert np.isfinite(out.grad_norm) and state.step == 1
    # half the gradient of two full micro-batches (the empty one adds zero, /accum either way)
    w0 = _setup()[0].model.weight.detach()
    torch.testing.assert_close(state.model.weight - w0, (ref.model.weight - w0) / 2)


def test_non_finite_loss_and_gradient_stop_before_the_update():
    x, y = _data()
    state, step = _setup()
    before = [p.detach().clone() for p in state.model.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss nan at step 1; stopped, no checkpoint written$"):
        step([(x, y)], lambda b: _mse(state)(b) * float("nan"))
    hook = state.model.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"^non-finite gradient norm (inf|nan) at step 1"):
        step([(x, y)], _mse(state))
    hook.remove()
    assert state.step == 0 and all(torch.equal(a, b) for a, b in zip(before, state.model.parameters()))
    assert all(p.grad is None for p in state.model.parameters())  # nothing left to leak into the next step


def test_stop_message_says_what_is_on_disk(tmp_path):
    x, y = _data()
    state, _ = _setup()
    last = tmp_path / "checkpoint-last.pt"
    step = TrainStep(state, state.model, torch.device("cpu"), "none", last=last)
    with pytest.raises(NonFiniteLossError, match=r"stopped, no checkpoint written$"):
        step([(x, y)], lambda b: _mse(state)(b) * float("inf"))
    last.write_bytes(b"a checkpoint")
    with pytest.raises(NonFiniteLossError, match=rf"stopped, last checkpoint left intact \({last}\)$"):
        step([(x, y)], lambda b: _mse(state)(b) * float("inf"))
    assert last.read_bytes() == b"a checkpoint"


def test_clipping_reports_the_norm_before_clipping(monkeypatch):
    x, y = _data()
    state, step = _setup(clip=1e-3)
    out = step([(x, y)], _mse(state))
    assert out.grad_norm > 1e-3
    calls = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m, **k: calls.append(m) or real(p, m, **k))
    step([(x, y)], _mse(state))
    assert calls == [1e-3]


def test_loss_scaler_has_timm_native_scaler_call_signature():
    from timm.utils import NativeScaler

    ours = list(inspect.signature(LossScaler.__call__).parameters)
    assert ours == list(inspect.signature(NativeScaler.__call__).parameters)
    assert LossScaler.state_dict_key == NativeScaler.state_dict_key
    assert LossScaler("cpu", enabled=False).state_dict() is None


def test_state_round_trip_is_weights_only_and_restores_rng(tmp_path):
    x, y = _data()
    state, step = _setup()
    step([(x, y)], _mse(state))
    seed_all(7)
    state.epoch = 0
    path = state.save(tmp_path / "ckpt.pt", world_size=1, main=True, extra={"format": "test"})
    expected = (torch.rand(3), np.random.rand(), random.random())
    ckpt = safe_load(path)  # weights_only
    fresh, _ = _setup()
    seed_all(123)
    assert fresh.load(ckpt, rank=0, world_size=1, seed=0) is True
    assert fresh.step == 1 and ckpt["format"] == "test"
    assert torch.equal(torch.rand(3), expected[0])
    assert (np.random.rand(), random.random()) == expected[1:]
    assert fresh.optimizer.param_groups[0]["lr"] == state.optimizer.param_groups[0]["lr"]
    for a, b in zip(state.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)
    assert fresh.load(ckpt, rank=0, world_size=2, seed=0) is False  # other world size: fresh streams


def test_non_finite_state_is_never_written(tmp_path):
    state, _ = _setup()
    with torch.no_grad():
        state.model.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite values in 1 .*model.bias.*no checkpoint written"):
        state.save(tmp_path / "ckpt.pt", world_size=1, main=True)
    assert not (tmp_path / "ckpt.pt").exists()


def test_epoch_resumes_mid_epoch_and_saves_on_a_stop_request():
    x, y = _data(16)
    sampler = ResumableBatchSampler(16, 4, seed=0)  # 4 steps per epoch
    state, step = _setup()

    class Loader:  # batches of (x, y) in the sampler's order
        def __iter__(self):
            for keys in sampler:
                idx = torch.tensor([i for _, i in keys])
                yield x[idx], y[idx]

    stop, saved = StopRequest(), []

    def after(_):
        if state.step == 2:
            stop.signum = 15

    with pytest.raises(Interrupted, match="after step 2; checkpoint saved"):
        step.epoch(Loader(), sampler, _mse(state), stop, lambda: saved.append(state.step), 4, after_step=after)
    assert saved == [2] and state.batch_in_epoch(4) == 2
    seen = []
    step.epoch(Loader(), sampler, lambda b: seen.append(b[0]) or _mse(state)(b), StopRequest(), lambda: None, 4)
    assert state.step == 4 and len(seen) == 2  # only the two steps left
    assert torch.equal(seen[0], x[sampler.permutation(0)[8:12]])


def test_epoch_stats_survive_a_checkpoint_once():
    s = EpochStats(2, torch.device("cpu"))
    s.reset(lr=0.5)
    s.add(torch.tensor([3.0, 1.0]))
    saved = s.state_dict()
    r0, r1 = EpochStats(2, torch.device("cpu")), EpochStats(2, torch.device("cpu"))
    r0.load_state_dict(saved, rank=0)
    r1.load_state_dict(saved, rank=1)
    assert r0.lr == r1.lr == 0.5 and r0.sums.tolist() == [3.0, 1.0] and r1.sums.tolist() == [0.0, 0.0]


def test_rng_state_round_trip():
    seed_all(3)
    saved = rng_state()
    a = (torch.rand(2), np.random.rand(), random.random())
    set_rng_state(saved)
    assert torch.equal(torch.rand(2), a[0]) and np.random.rand() == a[1] and random.random() == a[2]


def test_a_dataset_smaller_than_one_batch_names_the_option_that_fixes_it():
    from kamim.runtime import ResumableBatchSampler

    with pytest.raises(ValueError, match=r"^the dataset has 300 images, fewer than one global batch of 1024: "
                                         r"lower the batch size \(--batch-size N for linprobe/finetune, "
                                         r"--set optim.batch_size=N for pretraining\)$"):
        ResumableBatchSampler(300, 1024)
