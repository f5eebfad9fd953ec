"""Mixed precision in training: the fp16 loss scaler, and the one autocast re-exported from
:mod:`kamim.precision` (where it lives so that the analysis core can use it without the runtime).

:class:`LossScaler` has the call signature of ``timm.utils.NativeScaler`` (``scaler(loss, optimizer,
clip_grad=, parameters=, need_update=)``). It is not timm's class because timm's (1) always builds a
``GradScaler`` (we scale only for fp16; bf16 and fp32 need none, and a scaler would silently skip
steps with inf gradients, which we refuse instead), (2) returns no gradient norm (we log it and
check it is finite) and (3) measures no norm without clipping.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kamim.config import AMP_MODES
from kamim.precision import amp_dtype_of, autocast

__all__ = ["AMP_MODES", "amp_dtype_of", "autocast", "LossScaler", "NonFiniteGradient"]


class NonFiniteGradient(ArithmeticError):
    """The unscaled gradient norm is NaN/inf (without fp16 loss scaling); nothing was updated."""

    def __init__(self, norm: float) -> None:
        super().__init__(f"non-finite gradient norm {norm}")
        self.norm = norm


class LossScaler:
    """``timm.utils.NativeScaler``'s call pattern, returning the gradient norm (see module docstring).

    fp16 (``enabled``): ``GradScaler`` scaling; steps with inf gradients are skipped and the scale
    lowered, as timm. Otherwise plain backward and step, and a non-finite gradient norm raises
    :class:`NonFiniteGradient` before the optimizer touches the parameters.
    """

    state_dict_key = "amp_scaler"

    def __init__(self, device: torch.device | str = "cuda", enabled: bool = True) -> None:
        self._scaler = torch.amp.GradScaler(torch.device(device).type) if enabled else None

    @property
    def enabled(self) -> bool:
        return self._scaler is not None

    def __call__(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        clip_grad: float | None = None,
        clip_mode: str = "norm",
        parameters: list[nn.Parameter] | None = None,
        create_graph: bool = False,
        need_update: bool = True,
    ) -> float | None:
        """Backward ``loss``; with ``need_update`` also unscale, clip to ``clip_grad`` (global norm;
        None: measure only) and step. Returns the gradient norm before clipping (None without update)."""
        if clip_mode != "norm":
            raise ValueError(f"clip_mode {clip_mode!r} is not supported; only 'norm'")
        (self._scaler.scale(loss) if self._scaler is not None else loss).backward(create_graph=create_graph)
        if not need_update:
            return None
        if parameters is None:
            parameters = [p for g in optimizer.param_groups for p in g["params"]]
        if self._scaler is not None:
            self._scaler.unscale_(optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(parameters, clip_grad if clip_grad else float("inf")))
        if self._scaler is not None:  # fp16: inf gradients mean "skip and lower the scale"
            self._scaler.step(optimizer)
            self._scaler.update()
        elif not math.isfinite(norm):
            raise NonFiniteGradient(norm)
        else:
            optimizer.step()
        return norm

    def state_dict(self) -> dict | None:
        return self._scaler.state_dict() if self._scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self._scaler is not None and state:
            self._scaler.load_state_dict(state)
