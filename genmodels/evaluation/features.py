"""Feature extractors of the judge, pluggable by name or class path.

Contract: a ``FeatureExtractor`` is an ``nn.Module`` whose ``forward(images)`` takes images
float (B, 3, H, W) in [-1, 1] and returns ``(features, logits)``: float32 features (B, D)
for FID and precision/recall, and float32 logits (B, K) for IS (or ``None`` when the
network has no classifier head; IS is then skipped). ``extract(images)`` returns an
``Extracted`` with, in addition, optional ``spatial`` features (B, S) for sFID (Inception's
``mixed_6/conv``; ``None`` for extractors without them). ``name`` names the network in
results rows (tables never mix extractors); ``cache_key()`` adds a digest of its weights and
its dtype, for reference caches.

* ``digits-classifier``: the small CNN shipped with the package (``digits_classifier.py``).
* ``inception``: torch-fidelity's TF-ported Inception-v3 (``inception-v3-compat``), pool_3
  (2048-d) features and unbiased logits (pool_3 @ W, no bias, as the ADM evaluator's
  softmax and torch-fidelity's ISC). Images are quantised to uint8 exactly as a PNG would
  store them, then torch-fidelity resizes to 299 with TF1's bilinear kernel.
  sFID's spatial features come from a forward hook on ``Mixed_6d.branch1x1`` (TF graph
  ``mixed_6/conv``, after its ReLU; torch-fidelity does not return it): the first 7 of its
  192 channels, 17 x 17, flattened channels-last (ADM's ``spatial[..., :7]`` on NHWC), 2,023-d.
  Wired but not run here (CPU boxes have no torchvision); the GPU check runs it.
* ``dinov2``: FD-DINOv2 (Stein et al. 2023), DINOv2 ViT-L/14 CLS features (1024-d), no logits
  (no IS), through torch-fidelity >= 0.4's ``FeatureExtractorDinoV2`` (TF1-bilinear resize to
  224, ImageNet normalisation), or the same network from a local clone of
  facebookresearch/dinov2 (``hub_dir``) and a local ``weights_path``.
* any ``nn.Module`` by class path (``ModuleFeatures``): its output may be a tensor
  (features), a tuple ``(features, logits)`` or a dict with ``features`` / ``logits``.
"""
from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import torch
from torch import nn

from genmodels.errors import GenmodelsError
from genmodels.utils.images import quantize_uint8
from genmodels.utils.config import import_class

FIDELITY_HINT = ("the 'inception' feature extractor needs torch-fidelity (and torchvision): "
                 "pip install 'genmodels[fidelity]'  (GPU installs; on CPU-only machines use "
                 "feature_extractor: digits-classifier)")


def to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, 3, H, W) -> uint8 (B, 3, H, W), rounded like a saved PNG
    (``genmodels.utils.images.quantize_uint8``, the one 8-bit rule); uint8 passes through."""
    return images if images.dtype == torch.uint8 else quantize_uint8(images)


class Extracted(NamedTuple):
    """What an extractor gives for a batch: features (B, D), logits (B, K) | None (IS),
    spatial (B, S) | None (sFID); all float32."""

    features: torch.Tensor
    logits: torch.Tensor | None = None
    spatial: torch.Tensor | None = None


def weights_digest(module: nn.Module) -> str:
    """First 12 hex digits of a sha256 over a module's state dict (names, shapes, dtypes,
    bytes): changes whenever the weights do."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:12]


class FeatureExtractor(nn.Module):
    """Base class: ``forward(images in [-1, 1]) -> (features (B, D), logits (B, K) | None)``;
    ``extract(images) -> Extracted`` (adds spatial features where the network has them)."""

    name: str = "custom"
    feature_dim: int | None = None
    provides_spatial: bool = False
    internal_dtype: str = "float32"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def extract(self, images: torch.Tensor) -> Extracted:
        features, logits = self(images)
        return Extracted(features, logits, None)

    def cache_key(self) -> str:
        """``name``, a digest of the weights and the internal dtype: part of every reference
        cache key, so other weights (or dtype) never reuse stale reference features."""
        if getattr(self, "_digest", None) is None:
            object.__setattr__(self, "_digest", weights_digest(self))
        return f"{self.name}-w{self._digest}-{self.internal_dtype}"


class DigitsClassifierFeatures(FeatureExtractor):
    """Penultimate features (64-d) and logits (10) of the shipped digits classifier.

    Args: ``weights_path``: another weights file (default: the one in the package).
    """

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        from genmodels.evaluation.digits_classifier import WEIGHTS_PATH, load_digits_classifier, weights_digest

        self.net = load_digits_classifier(weights_path)
        self.name = f"digits-classifier-{weights_digest(weights_path or WEIGHTS_PATH)}"
        self._digest = weights_digest(weights_path or WEIGHTS_PATH)
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
            raise GenmodelsError(f"{FIDELITY_HINT} ({e})") from e
        kwargs: dict[str, Any] = {}
        if internal_dtype is not None:
            kwargs["feature_extractor_internal_dtype"] = internal_dtype
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=weights_path, **kwargs)
        self.net.eval().requires_grad_(False)
        self.name = "inception-v3-compat"
        self.internal_dtype = internal_dtype or "float32"
        self._mixed_6_conv: torch.Tensor | None = None
        block = getattr(getattr(self.net, "Mixed_6d", None), "branch1x1", None)
        if block is not None:  # TF mixed_6/conv (sFID); torch-fidelity does not return it
            block.register_forward_hook(self._keep_mixed_6_conv)
            self.provides_spatial = True

    def _keep_mixed_6_conv(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._mixed_6_conv = output.detach()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool3, logits = self.net(to_uint8_nchw(images))
        return pool3.reshape(len(images), -1).float(), logits.reshape(len(images), -1).float()

    def extract(self, images: torch.Tensor) -> Extracted:
        self._mixed_6_conv = None
        features, logits = self(images)
        spatial = None
        if self._mixed_6_conv is not None:  # (B, 192, 17, 17) -> NHWC, first 7 channels, flattened
            spatial = self._mixed_6_conv.movedim(1, -1)[..., :7].reshape(len(images), -1).float()
            self._mixed_6_conv = None
        return Extracted(features, logits, spatial)


DINOV2_HINT = ("the 'dinov2' feature extractor needs torch-fidelity >= 0.4 (pip install 'torch-fidelity>=0.4', "
               "GPU installs) and its weights through torch.hub, or a local clone of facebookresearch/dinov2 "
               "(feature_extractor_kwargs.hub_dir) with a local weights file (feature_extractor_kwargs.weights_path)")


class DINOv2Features(FeatureExtractor):
    """FD-DINOv2 (Stein et al. 2023): CLS features of DINOv2 (default ViT-L/14, 1024-d), no
    logits. Preprocessing is torch-fidelity's (uint8 -> TF1 bilinear 224 -> ImageNet mean/std).

    Args:
        model: ``dinov2-vit-{s,b,l,g}-14``.
        weights_path: a local weights file (``dinov2_vitl14_pretrain.pth``); needs ``hub_dir``.
        hub_dir: a local clone of facebookresearch/dinov2 (the network's code).
    """

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)
    HUB_NAMES = {"dinov2-vit-s-14": "dinov2_vits14", "dinov2-vit-b-14": "dinov2_vitb14",
                 "dinov2-vit-l-14": "dinov2_vitl14", "dinov2-vit-g-14": "dinov2_vitg14"}

    def __init__(self, model: str = "dinov2-vit-l-14", weights_path: str | None = None,
                 hub_dir: str | None = None) -> None:
        super().__init__()
        if model not in self.HUB_NAMES:
            raise GenmodelsError(f"feature_extractor_kwargs.model: unknown DINOv2 {model!r}; "
                                 f"use one of {sorted(self.HUB_NAMES)}")
        try:
            from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
        except ImportError as e:
            raise GenmodelsError(f"{DINOV2_HINT} ({e})") from e
        self._resize = interpolate_bilinear_2d_like_tensorflow1x
        self.name = f"{model}"
        if weights_path is not None:
            if hub_dir is None:
                raise GenmodelsError("feature_extractor_kwargs.weights_path of 'dinov2' needs "
                                     "feature_extractor_kwargs.hub_dir (a local clone of facebookresearch/dinov2)")
            self.model = torch.hub.load(hub_dir, self.HUB_NAMES[model], source="local", pretrained=False)
            self.model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
            self.tf_module = None
        else:
            try:
                from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2
            except ImportError as e:
                raise GenmodelsError(f"{DINOV2_HINT} ({e})") from e
            self.tf_module = FeatureExtractorDinoV2(model, ["dinov2"])
            self.model = None
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = to_uint8_nchw(images)
        if self.tf_module is not None:
            (features,) = self.tf_module(x)
            return features.reshape(len(images), -1).float(), None
        x = self._resize(x.float(), size=(224, 224), align_corners=False)
        mean = torch.tensor(self.MEAN, device=x.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.STD, device=x.device).view(1, 3, 1, 1) * 255
        return self.model((x - mean) / std).reshape(len(images), -1).float(), None


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
            raise ValueError(f"ModuleFeatures: input_range must be '[-1,1]', '[0,1]' or 'uint8', got {input_range!r}")
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
    if spec == "dinov2" or spec.startswith("dinov2-"):
        return DINOv2Features(**({"model": spec} if spec != "dinov2" else {}), **kwargs)
    if "." in spec:
        cls = import_class(spec)
        if isinstance(cls, type) and issubclass(cls, FeatureExtractor):
            return cls(**kwargs)
        return ModuleFeatures(spec, **kwargs)
    raise GenmodelsError(f"unknown feature_extractor {spec!r}: use 'digits-classifier', 'inception', 'dinov2' or a "
                         "class path 'package.module.Class' of an nn.Module")
