"""Print the learning rate and weight decay of the OFFICIAL VAR schedule (FoundationVision/VAR, commit 78b9539,
``utils/lr_control.py`` ``lr_wd_annealing``) at a few iterations, for the constants of
``tests/test_recipes.py::test_var_lr_and_weight_decay_follow_the_official_schedule``.

Usage (outside the test run; needs only torch):

    /path/to/venv/bin/python scripts/record_fixtures/var_lr_schedule.py --var-root /path/to/VAR

``--var-root`` is a checkout of github.com/FoundationVision/VAR (its ``utils/lr_control.py`` and ``dist.py``).
Each case calls the official function as ``train.py`` does (``lr_wd_annealing(args.sche, optimizer, args.tlr,
args.twd, args.twde, g_it, wp_it, max_it, wp0=args.wp0, wpe=args.wpe)``) on an AdamW with a decaying group
(``wd_sc`` 1) and a non-decaying one (``wd_sc`` 0), and prints ``{iteration: (max lr, max wd)}``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# name -> (sche, peak lr, twd, twde, wp_it, max_it, wp0, wpe, iterations)
CASES = {
    # the VAR-d16 README command at the 32-GPU layout of configs/experiments/imagenet256_var_d16.yaml:
    # 1668 iterations per epoch, 200 epochs, warm-up ep/50 = 4 epochs
    "d16": ("lin0", 3e-4, 0.05, 0.05, 4 * 1668, 200 * 1668, 0.005, 0.1,
            [0, 1, 3336, 6671, 6672, 20000, 23000, 100000, 250000, 333599]),
    # VAR-d30's command (twde 0.08, wpe 0.01) at a tiny length: 350 iterations, warm-up 7
    "d30_small": ("lin0", 3.2e-4, 0.05, 0.08, 7, 350, 0.005, 0.01, [0, 1, 6, 7, 20, 24, 25, 100, 200, 348, 349]),
    # progressive training (arg_util.py: sche = f'lin{pg:g}'), pg = 0.5
    "lin0.5": ("lin0.5", 1e-3, 0.05, 0.05, 10, 100, 0.005, 0.01, [0, 5, 10, 30, 54, 55, 70, 99]),
    "cos": ("cos", 1e-3, 0.05, 0.0, 10, 100, 0.005, 0.01, [0, 5, 10, 30, 70, 99]),
    "lin00": ("lin00", 1e-3, 0.05, 0.05, 10, 100, 0.005, 0.01, [0, 10, 50, 99]),
    "lin": ("lin", 1e-3, 0.05, 0.05, 10, 100, 0.005, 0.01, [0, 10, 22, 23, 60, 99]),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--var-root", required=True, type=Path)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.var_root))
    from utils.lr_control import lr_wd_annealing  # the official function

    w = torch.nn.Parameter(torch.zeros(2, 2))
    b = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [w], "wd_sc": 1.0, "lr_sc": 1.0},
                             {"params": [b], "wd_sc": 0.0, "lr_sc": 1.0}], lr=1.0, weight_decay=0)
    for name, (sche, peak, twd, twde, wp_it, max_it, wp0, wpe, its) in CASES.items():
        out = {}
        for it in its:
            _, max_lr, _, max_wd = lr_wd_annealing(sche, opt, peak, twd, twde, it, wp_it, max_it, wp0=wp0, wpe=wpe)
            out[it] = (max_lr, max_wd)
        print(f"{name!r}: {out!r},")


if __name__ == "__main__":
    main()
