"""LPIPS perceptual loss (Zhang et al. 2018), VGG16 variant as used by VQGAN / VAR-style tokenizers.

Both the VGG16 backbone and the LPIPS linear heads are pretrained weights that cannot be
downloaded here, so the term is off unless the user points ``weights`` at a local file:
a state dict holding torchvision's VGG16 ``features.*`` keys and the LPIPS heads
``lin{0..4}.model.1.weight`` (as in the ``lpips`` package's ``vgg.pth``). The VGG16 is
written out here because torchvision cannot be imported on our CPU path.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# torchvision's VGG16 "D" configuration; LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_TAPS = (3, 8, 15, 22, 29)  # indices of those ReLUs in torchvision's vgg16().features
_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """``forward(x, y)`` with images in [-1, 1] -> (B,) perceptual distances. Frozen."""

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers[: _TAPS[-1] + 1])
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        if weights is not None:
            self.load_weights(weights)
        self.requires_grad_(False).eval()

    def load_weights(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights not found at {path} (perceptual_weights); genmodels never downloads "
                                    "them: provide a local file with VGG16 'features.*' and LPIPS 'lin{i}.model.1.weight' keys")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        lins = {f"{i}.weight": sd[f"lin{i}.model.1.weight"] for i in range(5) if f"lin{i}.model.1.weight" in sd}
        if not feats or len(lins) != 5:
            raise KeyError(f"{path} lacks VGG16 'features.*' keys or the five LPIPS 'lin{{i}}.model.1.weight' keys")
        self.features.load_state_dict({k: v for k, v in feats.items() if int(k.split(".")[0]) <= _TAPS[-1]})
        self.lins.load_state_dict(lins)

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always frozen

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = 0.0
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == _TAPS[tap]:
                fx, fy = h.chunk(2)
                fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
                fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
                total = total + self.lins[tap]((fx - fy) ** 2).mean(dim=(1, 2, 3))
                tap += 1
        return total
