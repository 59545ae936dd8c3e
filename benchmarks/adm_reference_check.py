"""Our judge on ADM's own files beside ADM's published evaluator output (downloads nothing).

    python benchmarks/adm_reference_check.py \\
        --reference VIRTUAL_imagenet256_labeled.npz --samples admnet_guided_upsampled_imagenet256.npz \\
        [--weights_path weights-inception-2015-12-05-6726825d.pth] [--device cuda]

Needs: torch-fidelity (its TF-ported Inception-v3; GPU installs), the ADM reference batch and a
published sample batch (openai/guided-diffusion ``evaluations/README.md`` links both; ADM-G+U
ImageNet 256 is the default row below). Prints FID / sFID / IS / precision / recall (ADM protocol:
stored mu/sigma and mu_s/sigma_s, IS split size 5,000, float16 P/R blocks) beside the published
ones and the differences; the goal is |dFID| <= 0.01 and |dP|, |dR| <= 0.002. ``--protocol fp32``
shows what the float32 rules give on the same features.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

PUBLISHED = {  # ADM's TF evaluator on ADM-G+U ImageNet 256x256 (guided-diffusion evaluations/README.md:
    # IS 215.8, FID 3.94, sFID 6.14, P 0.827, R 0.531; more digits as quoted by lavinal712/ADM-evaluation-suite-pytorch)
    "adm-g+u-256": {"is": 215.8370, "fid": 3.94256, "sfid": 6.14043, "precision": 0.8265, "recall": 0.5309},
}
GOAL = {"fid": 0.01, "precision": 0.002, "recall": 0.002}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, help="VIRTUAL_imagenet256_labeled.npz")
    ap.add_argument("--samples", type=Path, help="a published sample batch, e.g. admnet_guided_upsampled_imagenet256.npz")
    ap.add_argument("--published", default="adm-g+u-256", choices=sorted(PUBLISHED))
    ap.add_argument("--weights_path", default=None, help="local torch-fidelity Inception weights (else torch hub)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--protocol", default="adm", choices=["adm", "fp32"])
    ap.add_argument("--batch_size", type=int, default=250)
    ap.add_argument("--out", type=Path, default=None, help="also write the comparison as JSON here")
    args = ap.parse_args()

    missing = []
    if importlib.util.find_spec("torch_fidelity") is None:
        missing.append("torch-fidelity (pip install 'genmodels[fidelity]'; GPU installs) for Inception-v3")
    for flag, path in (("--reference", args.reference), ("--samples", args.samples)):
        if path is None or not path.is_file():
            missing.append(f"{flag}: {path or '(not given)'} -- download from openai/guided-diffusion evaluations/README.md")
    if missing:
        print("adm_reference_check: cannot run here; it needs:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2

    import torch

    from genmodels.evaluation import Evaluator

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {"weights_path": args.weights_path} if args.weights_path else None
    ev = Evaluator(feature_extractor="inception", feature_extractor_kwargs=kwargs, reference=str(args.reference),
                   protocol=args.protocol, batch_size=args.batch_size, metric_prefix="", cache_dir="off")
    ours = ev.evaluate_samples(args.samples, device=device)
    ref = PUBLISHED[args.published]
    lines = [f"{'metric':<10} {'ours':>12} {'ADM':>12} {'diff':>10}  goal"]
    result = {"ours": ours, "published": ref, "row": ev.last_row, "diff": {}}
    for k in ("fid", "sfid", "is", "precision", "recall"):
        if k in ours:
            d = ours[k] - ref[k]
            result["diff"][k] = d
            goal = f"|d| <= {GOAL[k]}: {'ok' if abs(d) <= GOAL[k] else 'MISSED'}" if k in GOAL else ""
            lines.append(f"{k:<10} {ours[k]:>12.5f} {ref[k]:>12.5f} {d:>+10.5f}  {goal}")
    print("\n".join(lines))
    print(f"rules: {ev.rules.describe()}, extractor {ev.last_row['feature_extractor']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
