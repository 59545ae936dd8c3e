"""The ``digits-classifier`` judge: a small CNN trained on the embedded digits.

Like LeNet-FID for MNIST, it is the feature network used where Inception cannot run
(CPU boxes without torchvision, offline CI): FID and precision/recall use its
penultimate features (64-d, after ReLU, like Inception's pool_3), IS its softmax.

Weights ship in the package (``weights/digits_classifier.safetensors``, ~0.5 MB) and are
reproduced by ``scripts/train_digits_classifier.py`` (fixed seed, digits train split);
the file's metadata records the test accuracy and how it was trained.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_PATH = Path(__file__).parent / "weights" / "digits_classifier.safetensors"


class DigitsClassifier(nn.Module):
    """conv(3->32) - pool - conv(32->64) - pool - conv(64->64) - pool - fc(1024->64) - fc(64->10).

    Input: images (B, 3, H, W) in [-1, 1]; any H, W (resized to 32x32, bilinear with
    antialias, when different). ``forward_features`` returns the penultimate features
    (B, 64) and the logits (B, num_classes).
    """

    input_size = 32

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.fc1 = nn.Linear(2 * w * 4 * 4, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)
        self.num_classes = num_classes
        self.feature_dim = feature_dim

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DigitsClassifier expects images (B, 3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 16x16
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8x8
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 4x4
        features = F.relu(self.fc1(x.flatten(1)))
        return features, self.fc2(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]


def weights_metadata(path: str | Path = WEIGHTS_PATH) -> dict:
    """The metadata stored with the weights (test accuracy, seed, split, command)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: (json.loads(v) if v[:1] in "{[" else v) for k, v in meta.items()}


def weights_digest(path: str | Path = WEIGHTS_PATH) -> str:
    """First 8 hex digits of a sha256 over the tensors (names, shapes, bytes; not the
    metadata, whose order safetensors does not fix). Part of reference-cache keys, so
    retrained weights never reuse stale reference statistics."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:8]


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The shipped (or a given) classifier, in eval mode with frozen weights."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"digits classifier weights not found: {path} "
                                "(retrain them with `python scripts/train_digits_classifier.py`)")
    state = load_file(str(path))
    meta = weights_metadata(path)
    arch = meta.get("arch", {}) if isinstance(meta.get("arch"), dict) else {}
    model = DigitsClassifier(**arch)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.requires_grad_(False).eval()
