"""``genmodels evaluate --samples X.npz|DIR --reference REF.npz|DATA_CONFIG.yaml``: score samples
made elsewhere (another framework, the official code) with the same judge.

    genmodels evaluate --samples samples.npz --reference VIRTUAL_imagenet256_labeled.npz \\
        --feature_extractor inception --results_file benchmarks/results/imagenet256.jsonl
    genmodels evaluate --samples pngs/ --reference configs/data/digits.yaml --split train

A ``DATA_CONFIG`` is a data YAML (``data: {class_path, init_args}`` as the other configs); its
``--split`` (default ``train``) is the reference. Prints the metrics as JSON on stdout.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from genmodels.errors import GenmodelsError


def _datamodule(config: str) -> object:
    import yaml

    from genmodels.utils.config import import_class

    try:
        cfg = yaml.safe_load(Path(config).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise GenmodelsError(f"--reference {config}: not a readable YAML data config ({e})") from e
    data = cfg.get("data", cfg)
    if not isinstance(data, dict) or "class_path" not in data:
        raise GenmodelsError(f"--reference {config}: needs 'data: {{class_path: ..., init_args: ...}}'")
    return import_class(data["class_path"])(**(data.get("init_args") or {}))


def evaluate_main(argv: list[str]) -> dict[str, float]:
    from genmodels.evaluation.evaluator import Evaluator

    ap = argparse.ArgumentParser(prog="genmodels evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", required=True, help="ADM .npz (arr_0 uint8 NHWC, arr_1 labels) or a folder of images")
    ap.add_argument("--reference", required=True, help="ADM reference .npz or a data config .yaml")
    ap.add_argument("--split", default="train", help="split of the data config used as reference")
    ap.add_argument("--feature_extractor", default="digits-classifier")
    ap.add_argument("--weights_path", default=None, help="local weights of the feature extractor")
    ap.add_argument("--extractor_kwargs", default=None,
                    help='more extractor arguments as JSON, e.g. \'{"hub_dir": "/src/dinov2"}\' for dinov2')
    ap.add_argument("--num_reference", type=int, default=None)
    ap.add_argument("--protocol", default="adm", choices=["adm", "fp32"])
    ap.add_argument("--batch_size", type=int, default=100)
    ap.add_argument("--cache_dir", default=None)
    ap.add_argument("--results_file", default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    ap.add_argument("--official", action="store_true")
    args = ap.parse_args(argv)
    if not Path(args.samples).exists():
        raise GenmodelsError(f"--samples {args.samples}: no such file or folder")
    is_npz = args.reference.endswith(".npz")
    try:
        kwargs = json.loads(args.extractor_kwargs) if args.extractor_kwargs else {}
    except json.JSONDecodeError as e:
        raise GenmodelsError(f"--extractor_kwargs: not JSON ({e})") from e
    if args.weights_path:
        kwargs["weights_path"] = args.weights_path
    ev = Evaluator(feature_extractor=args.feature_extractor, feature_extractor_kwargs=kwargs,
                   reference=args.reference if is_npz else args.split, num_reference=args.num_reference,
                   protocol=args.protocol, batch_size=args.batch_size, cache_dir=args.cache_dir,
                   results_file=args.results_file, name=args.name or Path(args.samples).stem, official=args.official,
                   metric_prefix="")
    dm = None if is_npz else _datamodule(args.reference)
    metrics = ev.evaluate_samples(args.samples, datamodule=dm, device=args.device,
                                  metadata={"reference_config": None if is_npz else args.reference})
    print(json.dumps({**metrics, "comparable_with_papers": ev.last_row["comparable_with_papers"],
                      "not_comparable": ev.last_row["not_comparable"],
                      "feature_extractor": ev.last_row["feature_extractor"]}, indent=1))
    return metrics
