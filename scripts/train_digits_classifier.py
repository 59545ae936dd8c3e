"""Retrain the ``digits-classifier`` judge and write its weights into the package.

    .venv/bin/python scripts/train_digits_classifier.py            # writes genmodels/evaluation/weights/
    .venv/bin/python scripts/train_digits_classifier.py --out /tmp/clf.safetensors

Reproducible: fixed seed, deterministic algorithms, one CPU thread (float results are
bitwise identical on the same machine and torch build). Trains on the digits train split
of ``genmodels.data.DigitsDataModule`` (32 px, 3 channels, [-1, 1]) with small random
shifts, picks nothing on the test split, and prints / stores the test accuracy in the
safetensors metadata. Takes about a minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from genmodels.evaluation.digits_classifier import WEIGHTS_PATH, DigitsClassifier


def load_split(split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """All images (N, 3, S, S) in [-1, 1] and labels (N,) of a digits split."""
    from genmodels.data.digits import DigitsDataModule

    dm = DigitsDataModule(image_size=image_size)
    ds = dm.reference_dataset(split)
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack(xs).float(), torch.as_tensor(ys, dtype=torch.long), f"DigitsDataModule(image_size={image_size})"


def shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (background -1 fills in)."""
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


@torch.no_grad()
def accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight_decay", type=float, default=1e-4)
    ap.add_argument("--label_smoothing", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image_size", type=int, default=32)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    x_train, y_train, source = load_split("train", args.image_size)
    x_val, y_val, _ = load_split("val", args.image_size)
    x_test, y_test, _ = load_split("test", args.image_size)
    print(f"data: {source}: train {len(x_train)}, val {len(x_val)}, test {len(x_test)}")

    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            x = shift(x_train[idx], g)
            x = x + 0.05 * torch.randn(x.shape, generator=g)
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {running / steps_per_epoch:.4f}  "
                  f"train acc {accuracy(model, x_train, y_train):.4f}  ({time.time() - t0:.0f}s)")

    test_acc, val_acc = accuracy(model, x_test, y_test), accuracy(model, x_val, y_val)
    print(f"test accuracy: {test_acc:.4f} ({len(x_test)} images); val accuracy: {val_acc:.4f} ({len(x_val)} images)")
    if test_acc < 0.97:
        print("error: test accuracy below 0.97; weights not written", file=sys.stderr)
        sys.exit(1)

    from safetensors.torch import save_file

    meta = {
        "test_accuracy": f"{test_acc:.4f}",
        "num_test": str(len(x_test)),
        "val_accuracy": f"{val_acc:.4f}",
        "train_accuracy": f"{accuracy(model, x_train, y_train):.4f}",
        "data": source,
        "arch": json.dumps({"num_classes": model.num_classes, "width": model.conv1.out_channels,
                            "feature_dim": model.feature_dim}),
        "command": "python scripts/train_digits_classifier.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out), metadata=meta)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
