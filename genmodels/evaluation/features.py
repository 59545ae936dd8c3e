"""Feature extractors of the judge, pluggable by name or class path.

Contract: a ``FeatureExtractor`` is an ``nn.Module`` whose ``forward(images)`` takes images
float (B, 3, H, W) in [-1, 1] and returns ``(features, logits)``: float32 features (B, D)
for FID and precision/recall, and float32 logits (B, K) for IS (or ``None`` when the
network has no classifier head; IS is then skipped). ``name`` identifies the network and
its weights in reference-cache keys and results rows.

* ``digits-classifier``: the small CNN shipped with the package (``digits_classifier.py``).
* ``inception``: torch-fidelity's TF-ported Inception-v3 (``inception-v3-compat``), pool_3
  (2048-d) features and unbiased logits (pool_3 @ W, no bias, as the ADM evaluator's
  softmax and torch-fidelity's ISC). Images are quantised to uint8 exactly as a PNG would
  store them, then torch-fidelity resizes to 299 with TF1's bilinear kernel.
* any ``nn.Module`` by class path (``ModuleFeatures``): its output may be a tensor
  (features), a tuple ``(features, logits)`` or a dict with ``features`` / ``logits``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from genmodels.errors import GenmodelsError
from genmodels.utils.config import import_class

FIDELITY_HINT = ("the 'inception' feature extractor needs torch-fidelity (and torchvision): "
                 "pip install 'genmodels[fidelity]'  (GPU installs; on CPU-only machines use "
                 "feature_extractor: digits-classifier)")


def to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, 3, H, W) -> uint8 (B, 3, H, W), rounded like a saved PNG
    (same as ``genmodels.utils.images.to_uint8`` without the NHWC permute)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FeatureExtractor(nn.Module):
    """Base class: ``forward(images in [-1, 1]) -> (features (B, D), logits (B, K) | None)``."""

    name: str = "custom"
    feature_dim: int | None = None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class DigitsClassifierFeatures(FeatureExtractor):
    """Penultimate features (64-d) and logits (10) of the shipped digits classifier.

    Args: ``weights_path``: another weights file (default: the one in the package).
    """

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        from genmodels.evaluation.digits_classifier import WEIGHTS_PATH, load_digits_classifier, weights_digest

        self.net = load_digits_classifier(weights_path)
        self.name = f"digits-classifier-{weights_digest(weights_path or WEIGHTS_PATH)}"
        self.feature_dim = self.net.feature_dim

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.net.forward_features(images.float())
        return features.float(), logits.float()


class InceptionFeatures(FeatureExtractor):
    """torch-fidelity's Inception-v3 (the network behind the papers' numbers).

    Args:
        weights_path: a local copy of torch-fidelity's converted TF weights
            (``weights-inception-2015-12-05-6726825d.pth``); ``None`` lets torch-fidelity
            download them once into the torch hub cache (the only download genmodels does,
            and only when this extractor is asked for).
        internal_dtype: ``"float32"`` (default) or ``"float64"`` (torch-fidelity >= 0.4).
    """

    feature_dim = 2048

    def __init__(self, weights_path: str | None = None, internal_dtype: str | None = None) -> None:
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise ImportError(f"{FIDELITY_HINT} ({e})") from e
        kwargs: dict[str, Any] = {}
        if internal_dtype is not None:
            kwargs["feature_extractor_internal_dtype"] = internal_dtype
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=weights_path, **kwargs)
        self.net.eval().requires_grad_(False)
        self.name = "inception-v3-compat"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool3, logits = self.net(to_uint8_nchw(images))
        return pool3.reshape(len(images), -1).float(), logits.reshape(len(images), -1).float()


class ModuleFeatures(FeatureExtractor):
    """Adapter for any ``nn.Module`` (built from ``class_path`` + ``init_args``, or given).

    Args:
        module: the network (or its class path, e.g. ``"mypkg.nets.MyEncoder"``).
        init_args: constructor arguments when ``module`` is a class path.
        input_range: what the network expects: ``"[-1,1]"`` (default), ``"[0,1]"`` or ``"uint8"``.
        name: identifier for cache keys / results rows (default: the class path); change it
            when the weights change.
    """

    def __init__(self, module: nn.Module | str, init_args: dict | None = None, input_range: str = "[-1,1]",
                 name: str | None = None) -> None:
        super().__init__()
        if input_range not in ("[-1,1]", "[0,1]", "uint8"):
            raise GenmodelsError(f"ModuleFeatures: input_range must be '[-1,1]', '[0,1]' or 'uint8', got {input_range!r}")
        if isinstance(module, str):
            cls = import_class(module)
            module = cls(**(init_args or {}))
        if not isinstance(module, nn.Module):
            raise TypeError(f"ModuleFeatures needs an nn.Module or a class path, got {type(module).__name__}")
        self.net = module.eval().requires_grad_(False)
        self.input_range = input_range
        self.name = name or f"{type(module).__module__}.{type(module).__qualname__}"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.input_range == "uint8":
            x = to_uint8_nchw(images)
        elif self.input_range == "[0,1]":
            x = (images.float().clamp(-1, 1) + 1) / 2
        else:
            x = images.float()
        out = self.net(x)
        if isinstance(out, dict):
            if "features" not in out:
                raise ValueError(f"feature extractor {self.name} returned a dict without 'features' "
                                 f"(keys {sorted(out)})")
            features, logits = out["features"], out.get("logits")
        elif isinstance(out, (tuple, list)):
            features, logits = out[0], (out[1] if len(out) > 1 else None)
        else:
            features, logits = out, None
        features = features.reshape(len(images), -1).float()
        return features, (None if logits is None else logits.reshape(len(images), -1).float())


def build_feature_extractor(spec: str | nn.Module, **kwargs: Any) -> FeatureExtractor:
    """``"digits-classifier"``, ``"inception"``, a class path, or a module (``kwargs`` go to
    the extractor: ``weights_path`` for the first two, ``init_args``/``input_range``/``name``
    for a class path)."""
    if isinstance(spec, FeatureExtractor):
        return spec
    if isinstance(spec, nn.Module):
        return ModuleFeatures(spec, **kwargs)
    if spec == "digits-classifier":
        return DigitsClassifierFeatures(**kwargs)
    if spec in ("inception", "inception-v3", "inception-v3-compat"):
        return InceptionFeatures(**kwargs)
    if "." in spec:
        cls = import_class(spec)
        if isinstance(cls, type) and issubclass(cls, FeatureExtractor):
            return cls(**kwargs)
        return ModuleFeatures(spec, **kwargs)
    raise GenmodelsError(f"unknown feature_extractor {spec!r}: use 'digits-classifier', 'inception' or a class path "
                         "'package.module.Class' of an nn.Module")
