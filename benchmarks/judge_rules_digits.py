"""The same samples scored with the ADM rules and the float32 rules (digits judge, CPU).

    PYTHONPATH=. .venv/bin/python benchmarks/judge_rules_digits.py

Samples: real digits of the test split drawn per (class, block) (tests' ``pool_sampler``), a
``noise`` fraction replaced by uniform noise; reference: the digits train split (1,437). Draws
repeat images of a 360-image pool, so recall is low by construction (duplicates have k-NN radius
0); the point is the difference between the two rules on identical features.
"""
import sys; sys.path.insert(0, "tests")
import torch
torch.set_num_threads(1)
from test_evaluation_harness import digits_split, pool_sampler
from genmodels.data import DigitsDataModule
from genmodels.evaluation import Evaluator
dm = DigitsDataModule(image_size=32)
x, y = digits_split("test")
for noise in (0.0, 0.3):
    for n in (1000, 2000):
        row = {}
        for proto in ("adm", "fp32"):
            ev = Evaluator(num_samples=n, batch_size=100, reference="train", protocol=proto, progress=False, metric_prefix="")
            m = ev.evaluate(pool_sampler(x, y, 100, noise=noise), 100, 10, datamodule=dm)
            row[proto] = m
        a, f = row["adm"], row["fp32"]
        print(f"noise {noise} N {n}: FID {a['fid']:.3f} | IS adm {a['is']:.3f} fp32 {f['is']:.3f} | P adm {a['precision']:.4f} fp32 {f['precision']:.4f} | R adm {a['recall']:.4f} fp32 {f['recall']:.4f}")
