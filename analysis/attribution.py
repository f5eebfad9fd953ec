"""Input attributions with captum for a ViT classifier or a linear-probe head on a ViT.

* :func:`integrated_gradients`: ``captum.attr.IntegratedGradients`` (``internal_batch_size`` bounds
  memory); the map is the attribution summed over colour channels (so by completeness the map sums
  to about ``f(x) - f(baseline)`` for the target logit).
* :func:`patch_occlusion`: ``captum.attr.Occlusion`` with windows and strides equal to the model's
  patch size (one occluded token per evaluation, aligned with the token grid); the map holds, at
  every pixel of a patch, the drop of the target logit when that patch is replaced by the baseline.

Both return ``(B, H, W)`` float32 maps. The target defaults to the predicted class. The model's
``training`` flags are restored afterwards; parameter gradients are never accumulated.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kamim.backbone import check_pool, layer_features

from .capture import _frozen_state, ViTGeometry, is_vit, unwrap_backbone

__all__ = [
    "ProbeClassifier", "predicted_class", "integrated_gradients", "patch_occlusion", "attribute", "ATTRIBUTION_METHODS",
    "AttributionAccumulator",
]

ATTRIBUTION_METHODS = ("integrated-gradients", "occlusion")


class ProbeClassifier(nn.Module):
    """A ViT backbone with a (linear-probe) head on the pooled tokens of one layer.

    ``layer`` in ``1..L`` (default: last block); ``pool`` ``"avg"`` (patch tokens, as the KAMIM
    reference probe) or ``"cls"``; ``norm`` applies the backbone's final norm to that layer. The
    features are :func:`kamim.backbone.layer_features`, the ones the linear probe trains on.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, layer: int | None = None, pool: str = "avg",
                 norm: bool = False) -> None:
        super().__init__()
        self.backbone = unwrap_backbone(backbone)
        if not is_vit(self.backbone):
            raise TypeError(f"ProbeClassifier needs a timm VisionTransformer, got {type(self.backbone).__name__}")
        geometry = ViTGeometry.from_model(self.backbone)
        self.layer = geometry.depth if layer is None else geometry.check_layer(layer)
        check_pool(pool, has_class_token=geometry.has_class_token, name=type(self.backbone).__name__)
        self.head, self.pool, self.norm = head, pool, norm

    def forward(self, images: Tensor) -> Tensor:
        features = layer_features(self.backbone, images, self.layer, self.pool, norm=self.norm)[self.layer]
        return self.head(features)


def _target(classifier: nn.Module, images: Tensor, target: Tensor | Sequence[int] | int | None) -> Tensor:
    if target is None:
        with torch.no_grad():
            logits = classifier(images)
        if logits.ndim != 2:
            raise ValueError(f"the classifier must return (B, classes) logits, got {tuple(logits.shape)}")
        return logits.argmax(-1)
    target = torch.as_tensor(target, device=images.device, dtype=torch.long)
    return target.expand(images.shape[0]) if target.ndim == 0 else target


def predicted_class(classifier: nn.Module, images: Tensor) -> Tensor:
    """Arg-max class of ``classifier(images)`` in eval mode (training flags restored)."""
    with _frozen_state(classifier):
        return _target(classifier, images, None)


def _check(classifier: nn.Module, images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {getattr(images, 'shape', type(images).__name__)}")
    if getattr(classifier, "num_classes", None) == 0:
        raise ValueError("the model has no classifier head (num_classes=0): wrap it in ProbeClassifier(model, head)")


def integrated_gradients(classifier: nn.Module, images: Tensor, target: Tensor | Sequence[int] | int | None = None, *,
                         n_steps: int = 32, internal_batch_size: int = 16, baselines: float | Tensor = 0.0) -> Tensor:
    """Integrated Gradients map ``(B, H, W)``: attribution summed over channels."""
    from captum.attr import IntegratedGradients

    _check(classifier, images)
    with _frozen_state(classifier):
        tgt = _target(classifier, images, target)
        attr = IntegratedGradients(classifier).attribute(
            images, baselines=baselines, target=tgt, n_steps=n_steps, internal_batch_size=internal_batch_size
        )
    return attr.detach().float().sum(1)


def patch_occlusion(classifier: nn.Module, images: Tensor, patch_size: int | Sequence[int],
                    target: Tensor | Sequence[int] | int | None = None, *, baselines: float | Tensor = 0.0,
                    perturbations_per_eval: int = 16) -> Tensor:
    """Occlusion map ``(B, H, W)`` with patch-aligned windows/strides (``patch_size`` from the geometry)."""
    from captum.attr import Occlusion

    _check(classifier, images)
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(int(v) for v in patch_size)
    c, h, w = images.shape[1:]
    if h % ph or w % pw:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
    with _frozen_state(classifier), torch.no_grad():
        tgt = _target(classifier, images, target)
        attr = Occlusion(classifier).attribute(
            images, sliding_window_shapes=(c, ph, pw), strides=(c, ph, pw), baselines=baselines, target=tgt,
            perturbations_per_eval=perturbations_per_eval,
        )
    return attr.detach().float().mean(1)


def attribute(classifier: nn.Module, images: Tensor, method: str, *, patch_size: int | Sequence[int],
              target: Tensor | Sequence[int] | int | None = None, n_steps: int = 32, internal_batch_size: int = 16,
              perturbations_per_eval: int = 16) -> Tensor:
    """Dispatch to :func:`integrated_gradients` or :func:`patch_occlusion` by ``method`` name."""
    if method == "integrated-gradients":
        return integrated_gradients(classifier, images, target, n_steps=n_steps, internal_batch_size=internal_batch_size)
    if method == "occlusion":
        return patch_occlusion(classifier, images, patch_size, target, perturbations_per_eval=perturbations_per_eval)
    raise ValueError(f"unknown attribution method {method!r}; expected one of {ATTRIBUTION_METHODS}")


class AttributionAccumulator:
    """Registry accumulator of ``attribution``: captum maps of the first ``map_images`` images, computed
    in ``finish`` with the classifier ``attribution_model`` (default: the model, if it has a head).

    Arrays ``attribution`` = {method: (M, H, W), ``"target"``: (M,)} and ``inputs``/``labels``; options
    ``attribution_methods``, ``attribution_target`` (``"prediction"`` or ``"label"``),
    ``attribution_steps``, ``attribution_internal_batch_size``.
    """

    def __init__(self, context) -> None:
        from .attention import FirstImages

        opts = context.options
        self.context = context
        self.classifier = opts.attribution_model if opts.attribution_model is not None else context.model
        if opts.attribution_model is None and getattr(unwrap_backbone(context.model), "num_classes", 0) == 0:
            raise ValueError("attribution needs a classifier: the model has no head (num_classes=0); "
                             "pass attribution_model=ProbeClassifier(model, head)")
        self.first = FirstImages(opts.map_images)

    def update(self, batch) -> None:
        self.first.add(batch.indices, inputs=batch.images.float(), labels=batch.labels)

    def merge(self, other: AttributionAccumulator) -> None:
        self.first.merge(other.first)

    def finish(self):
        from .registry import on_device

        opts, arrays = self.context.options, self.first.arrays()
        if opts.attribution_target == "label" and "labels" not in arrays:
            raise ValueError("attribution_target='label' but the loader gave no labels")
        device = torch.device(self.context.device)
        maps: dict[str, Tensor] = {}
        with on_device(self.classifier, device):
            x = arrays["inputs"].to(device)
            tgt = arrays["labels"].to(device) if opts.attribution_target == "label" else predicted_class(self.classifier, x)
            for method in opts.attribution_methods:
                maps[method] = attribute(
                    self.classifier, x, method, patch_size=self.context.geometry.patch_size, target=tgt,
                    n_steps=opts.attribution_steps, internal_batch_size=opts.attribution_internal_batch_size,
                ).cpu()
            maps["target"] = tgt.cpu()
        arrays["attribution"] = maps
        return [], arrays
