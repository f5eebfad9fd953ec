"""The one constructor of pretraining models: SimMIM, KAMIM and MoCo v3 on a preset encoder.

``create_pretrain_model(method, arch, *, img_size, kamim, moco, **timm_kwargs)`` keeps three kinds of
settings apart: the method's own settings (``kamim``: temperature, loss normalisation; ``moco``: head
sizes, InfoNCE temperature, momentum, sin-cos position embedding), and ``timm_kwargs``, which go to
``timm.create_model`` and nothing else. A ``None`` method setting means :class:`MoCoV3`'s default
(read from its signature); presets hold no method settings, so each setting has one source: the config.

``build_pretrain_model(cfg)`` maps a :class:`kamim.config.Config` onto it (``cfg.model.overrides`` are
the timm kwargs) and turns a rejected setting into a one-line ``ConfigError`` naming the config key.
Every other part of kamim (the training engine, the sweep, benches) builds pretraining models here.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from kamim.config import INITS, POS_EMBED_INITS
from kamim.models.moco import MoCoV3, sincos_pos_embed
from kamim.models.presets import METHODS, PRESETS, create_encoder, preset
from kamim.models.simmim import SimMIM

if TYPE_CHECKING:
    from kamim.config import Config

__all__ = ["create_pretrain_model", "build_pretrain_model", "initialise_encoder", "KAMIM_SETTINGS", "MOCO_SETTINGS"]

KAMIM_SETTINGS = ("temperature", "normalize")
MOCO_SETTINGS = ("dim", "mlp_dim", "temperature", "momentum", "fixed_sincos_pos_embed")
_MOCO_DEFAULTS = {  # MoCoV3's own keyword defaults, read from its signature (one source)
    name: p.default for name, p in inspect.signature(MoCoV3).parameters.items() if name in MOCO_SETTINGS
}


def _settings(group: str, given: Mapping[str, Any] | None, valid: tuple[str, ...]) -> dict[str, Any]:
    """``given`` without its ``None`` values, refusing keys outside ``valid``."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"unknown {group} setting(s) {unknown}; valid: {', '.join(valid)}")
    return {k: v for k, v in given.items() if v is not None}


def initialise_encoder(encoder: nn.Module, init: str = "timm", pos_embed_init: str = "timm") -> nn.Module:
    """Re-initialise a freshly built encoder in place (and return it).

    ``init``: ``"timm"`` keeps timm's default; ``"jax"`` / ``"moco"`` run timm's own
    ``init_weights(mode)`` (xavier-uniform linear layers; see :data:`kamim.config.INITS`).
    ``pos_embed_init="sincos"`` starts a ViT's learned position embedding from the 2-D sin-cos table
    (:func:`kamim.models.moco.sincos_pos_embed`; it stays trainable). Neither is recorded in the encoder
    spec: they choose where pretraining starts, not the architecture a checkpoint is loaded into.
    """
    if init not in INITS:
        raise ValueError(f"init {init!r} is not valid; expected one of {', '.join(INITS)}")
    if pos_embed_init not in POS_EMBED_INITS:
        raise ValueError(f"pos_embed_init {pos_embed_init!r} is not valid; expected one of {', '.join(POS_EMBED_INITS)}")
    if init != "timm":
        if not callable(getattr(encoder, "init_weights", None)):
            raise ValueError(f"init {init!r} needs timm's init_weights, which {type(encoder).__name__} lacks")
        encoder.init_weights(init)
    if pos_embed_init == "sincos":
        if getattr(encoder, "pos_embed", None) is None:
            raise ValueError(f"pos_embed_init 'sincos' needs a ViT with a learned position embedding, "
                             f"got {type(encoder).__name__}")
        with torch.no_grad():
            encoder.pos_embed.copy_(sincos_pos_embed(encoder))
    return encoder


def create_pretrain_model(
    method: str,
    arch: str,
    *,
    img_size: int | None = None,
    kamim: Mapping[str, Any] | None = None,
    moco: Mapping[str, Any] | None = None,
    init: str = "timm",
    pos_embed_init: str = "timm",
    **timm_kwargs: Any,
) -> nn.Module:
    """Pretraining model ``method`` in {"simmim", "kamim", "moco"} on preset ``arch``.

    Args:
        method: "simmim", "kamim" or "moco" (MoCo v3 needs a ViT preset).
        arch: a key of :data:`kamim.models.PRESETS`.
        img_size: input size; the preset's when None.
        kamim: KAMIM settings ``temperature`` (T > 0, required for "kamim"; paper: 0.25) and
            ``normalize`` ("mask" = reference, or "weight"); used by "kamim" only.
        moco: MoCo v3 settings ``dim``, ``mlp_dim`` (head sizes), ``temperature``, ``momentum``,
            ``fixed_sincos_pos_embed`` (:class:`MoCoV3`'s defaults when None); used by "moco" only.
        init, pos_embed_init: how the encoder starts (:func:`initialise_encoder`).
        **timm_kwargs: keyword arguments of ``timm.create_model`` (``patch_size``, ``drop_path_rate``,
            ``reg_tokens``, ...), recorded in the encoder spec. timm raises ``TypeError`` for a
            keyword the model does not take.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    preset(arch)  # validate before building anything
    kamim_set = _settings("kamim", kamim, KAMIM_SETTINGS)
    moco_set = _settings("moco", moco, MOCO_SETTINGS)
    if method == "kamim" and "temperature" not in kamim_set:
        raise ValueError("method 'kamim' needs kamim={'temperature': T} (paper: 0.25)")
    if method == "moco" and not arch.startswith("vit"):
        raise ValueError(f"method 'moco' needs a ViT arch, got {arch!r}; valid: "
                         f"{', '.join(a for a in PRESETS if a.startswith('vit'))}")
    encoder, spec = create_encoder(arch, img_size=img_size, **timm_kwargs)
    initialise_encoder(encoder, init, pos_embed_init)
    if method == "moco":
        return MoCoV3(encoder, spec, **{**_MOCO_DEFAULTS, **moco_set})
    if method == "kamim":
        return SimMIM(encoder, encoder_spec=spec, temperature=kamim_set["temperature"],
                      loss_normalize=kamim_set.get("normalize", "mask"))
    return SimMIM(encoder, encoder_spec=spec)


def build_pretrain_model(cfg: Config) -> nn.Module:
    """The pretraining model a :class:`kamim.config.Config` describes.

    ``cfg.method`` and ``cfg.model.arch`` / ``img_size`` choose the model, ``cfg.model.overrides`` are
    the timm kwargs, ``cfg.kamim.temperature`` / ``normalize`` and ``cfg.moco`` the method settings
    (``moco.dim`` / ``mlp_dim`` left null take MoCo v3's 256 / 4096). A timm kwarg the model rejects,
    or a setting the method refuses, raises a one-line :class:`kamim.config.ConfigError`.
    """
    from kamim.config import ConfigError

    overrides = dict(cfg.model.overrides)
    kamim = {"temperature": cfg.kamim.temperature, "normalize": cfg.kamim.normalize}
    moco = {key: getattr(cfg.moco, key) for key in MOCO_SETTINGS if hasattr(cfg.moco, key)}
    try:
        return create_pretrain_model(cfg.method, cfg.model.arch, img_size=cfg.model.img_size,
                                     kamim=kamim, moco=moco, init=cfg.model.init,
                                     pos_embed_init=cfg.model.pos_embed_init, **overrides)
    except TypeError as e:  # timm's constructor refused a keyword of model.overrides
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"model.overrides={overrides!r} rejected by model.arch={cfg.model.arch!r}: {msg}") from None
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"method={cfg.method!r} on model.arch={cfg.model.arch!r}: {msg}") from None
