"""The judge: N class-balanced samples -> features -> FID, sFID, IS, precision, recall -> a row.

Explicit inputs only; it never reaches into a trainer:

* a sampling function ``sample_block(class_id, block) -> uint8 (S, 3, H, W)`` and ``S``
  (``generation.py`` fixes the class order, the blocks of each rank, the one gather);
* the reference: a ``Reference``, or the ``reference`` spec resolved with the data module the
  caller hands over (``resolve_reference``, cached by content, ``reference.py``);
* metadata for the row (model, configs, checkpoint) and the run folder (``out_dir``).

Driven by ``GeneratorModule`` / ``TokenizerModule``'s test hooks (``genmodels test``) and by
``genmodels evaluate --samples X --reference R`` (samples made elsewhere). Scores are computed
on rank 0 (``metrics.py``) with the rules in ``protocol.Rules`` (ADM by default) and sent to
every rank; the row (``results.py``) names the rules, the extractor and whether the numbers
are comparable with the papers' tables (``protocol.paper_protocol_gaps``).
"""
from __future__ import annotations

import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from genmodels.errors import GenmodelsError
from genmodels.evaluation.adm_export import read_adm_npz_all, read_image_dir, write_adm_npz
from genmodels.evaluation.features import FeatureExtractor, build_feature_extractor
from genmodels.evaluation.generation import (SampleBlock, SamplingPlan, broadcast_from_zero, dist_info, extract_images,
                                             generate_and_extract)
from genmodels.evaluation.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from genmodels.evaluation.protocol import Rules, paper_protocol_gaps
from genmodels.evaluation.reference import Reference, reference_from_dataset, reference_from_npz
from genmodels.evaluation.results import append_results_row, name_from_configs


def _loud(msg: str) -> None:
    banner = "=" * 78
    print(f"\n{banner}\n{msg}\n{banner}", file=sys.stderr, flush=True)


class Evaluator:
    """The judge's settings (``model.init_args.evaluator`` in YAML) and its entry points.

    Args:
        feature_extractor: ``"digits-classifier"`` (CPU, CI), ``"inception"`` (torch-fidelity,
            paper numbers), ``"dinov2"`` (FD-DINOv2) or a class path (``features.py``).
        feature_extractor_kwargs: passed to it (e.g. ``{weights_path: ...}``).
        num_samples: N generated samples (50,000 for the ADM protocol).
        batch_size: ``S``, samples per ``sample_block`` call (per rank); also the extraction batch.
        sample_kwargs: sampling knobs overriding the model's (cfg, ...), for the sampling adapter.
        seed: the sampling seed of ``genmodels.pipeline.seed_for(seed, class, block)`` (None = the
            model's own seed, so ``genmodels test`` scores the samples ``predict`` writes).
        reference: a split of the data module (``train``/``val``/``test``) or an ADM ``.npz``.
        num_reference: use the first ``num_reference`` real images (default: all).
        cache_dir: folder of reference caches (default ``$GENMODELS_CACHE/reference`` or
            ``~/.cache/genmodels/reference``); ``"off"`` disables caching.
        protocol: ``"adm"`` (IS split size 5,000; P/R float16 blocks + float32 fallback) or
            ``"fp32"`` (10 equal IS splits; float32 distances); the row names the rules.
        is_split_size / is_splits / pr_arithmetic / pr_block / nhood_size: override one rule.
        results_file: also append the row here (``.jsonl``; a ``.csv`` beside it).
        config_files: config files of the run, for the row (``genmodels test`` fills them from
            the config LightningCLI parsed).
        name: label of the row (default: the experiment config's stem).
        export_npz: write all samples as an ADM ``.npz`` under ``<out_dir>/samples``.
        official: a run meant for the papers' tables: every gap from the ADM protocol is printed
            loudly (the row carries ``comparable_with_papers`` / ``not_comparable`` always).
        autocast: ``"bf16"`` / ``"fp16"`` autocast while *sampling* (features are float32).
        precision: ``"bf16"``: the bf16 tier while sampling -- a copy of the model with its trunk
            and decoder in bfloat16 weights, logits and draws in float32 (``genmodels.precision``;
            models with a bf16 path only, e.g. VAR). The row records ``sampling_precision``.
        metric_prefix: prefix of the returned metric names (``test/fid`` ...).
        progress: progress lines (samples done / total, s/img, time left) on rank 0.
    """

    def __init__(self, feature_extractor: str = "digits-classifier",
                 feature_extractor_kwargs: dict[str, Any] | None = None, num_samples: int = 1000,
                 batch_size: int = 100, sample_kwargs: dict[str, Any] | None = None, seed: int | None = None,
                 reference: str = "train", num_reference: int | None = None, cache_dir: str | None = None,
                 protocol: str = "adm", is_split_size: int | None = None, is_splits: int | None = None,
                 pr_arithmetic: str | None = None, pr_block: int | None = None, nhood_size: int = 3,
                 results_file: str | None = None, config_files: list[str] | None = None, name: str | None = None,
                 export_npz: bool = False, official: bool = False, autocast: str | None = None,
                 precision: str | None = None, metric_prefix: str = "test/", progress: bool = True) -> None:
        if num_samples < 2 or batch_size < 1:
            raise GenmodelsError(f"evaluator: num_samples must be >= 2 and batch_size >= 1, got {num_samples}, "
                                 f"{batch_size}")
        if autocast not in (None, "bf16", "fp16"):
            raise GenmodelsError(f"evaluator.autocast: must be null, 'bf16' or 'fp16', got {autocast!r}")
        if precision not in (None, "fp32", "bf16"):
            raise GenmodelsError(f"evaluator.precision: must be null, 'fp32' or 'bf16', got {precision!r}")
        if precision == "bf16" and autocast:
            raise GenmodelsError("evaluator: set either precision: bf16 (bf16 weights) or autocast, not both")
        base = Rules.named(protocol)
        if is_split_size is not None or is_splits is not None:
            base = Rules(is_split_size, is_splits, base.pr_arithmetic, base.pr_block, base.nhood_size)
        self.rules = Rules(base.is_split_size, base.is_splits, pr_arithmetic or base.pr_arithmetic,
                           pr_block or base.pr_block, nhood_size)
        self.protocol = protocol
        self.feature_extractor_spec = feature_extractor
        self.feature_extractor_kwargs = dict(feature_extractor_kwargs or {})
        self.num_samples, self.batch_size, self.seed = int(num_samples), int(batch_size), seed
        self.sample_kwargs = dict(sample_kwargs or {})
        self.reference_spec, self.num_reference, self.cache_dir = str(reference), num_reference, cache_dir
        self.results_file, self.config_files, self.name = results_file, config_files, name
        self.export_npz, self.official, self.autocast = export_npz, official, autocast
        self.precision = None if precision == "fp32" else precision
        self.metric_prefix, self.progress = metric_prefix, progress
        self._extractor: FeatureExtractor | None = None
        self.last_row: dict[str, Any] | None = None

    # ------------------------------------------------------------------ parts
    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = build_feature_extractor(self.feature_extractor_spec, **self.feature_extractor_kwargs)
        return self._extractor

    def resolve_reference(self, datamodule: Any = None, device: Any = "cpu") -> Reference:
        """The ``reference`` spec -> a ``Reference`` on rank 0 (``Reference.elsewhere()`` on other
        ranks): an ADM
        ``.npz``, or split ``reference`` of ``datamodule.reference_dataset`` (given explicitly)."""
        spec = self.reference_spec
        common = dict(num_reference=self.num_reference, cache_dir=self.cache_dir, batch_size=self.batch_size,
                      device=device, progress=self.progress)
        if spec.endswith(".npz"):
            return reference_from_npz(spec, self.extractor, **common)
        if datamodule is None or not hasattr(datamodule, "reference_dataset"):
            raise GenmodelsError(f"evaluator.reference: {spec!r} is a data split, which needs a data module with "
                                 "reference_dataset(split) (genmodels.data.ImageDataModule); or give an ADM .npz path")
        dataset = datamodule.reference_dataset(spec)
        content = f"{getattr(datamodule, 'dataset_id', type(datamodule).__name__)}:{spec}"
        return reference_from_dataset(dataset, content, self.extractor, getattr(datamodule, "image_size", None),
                                      **common)

    def score(self, features: np.ndarray | torch.Tensor, logits: Any, spatial: Any, ref: Reference,
              ) -> dict[str, float]:
        """FID, sFID (when both sides have spatial statistics), IS (+ std, when logits),
        precision, recall of sample features against ``ref``, with ``self.rules``."""
        features = torch.as_tensor(features)
        if features.shape[1] != ref.features.shape[1]:
            raise GenmodelsError(f"sample features are {features.shape[1]}-d but the reference's are "
                                 f"{ref.features.shape[1]}-d (a reference from another extractor?)")
        r = self.rules
        out = {"fid": frechet_distance(*feature_statistics(features), ref.mu, ref.sigma)}
        if spatial is not None and ref.mu_s is not None:
            out["sfid"] = frechet_distance(*feature_statistics(spatial), ref.mu_s, ref.sigma_s)
        if logits is not None:
            out["is"], out["is_std"] = inception_score(torch.as_tensor(logits), r.is_splits, r.is_split_size)
        device = features.device if features.is_cuda else ("cuda" if torch.cuda.is_available() else "cpu")
        out["precision"], out["recall"] = precision_recall(ref.features.to(device), features.to(device),
                                                           r.nhood_size, r.pr_block, arithmetic=r.pr_arithmetic)
        return out

    # ------------------------------------------------------------------ entry points
    @torch.no_grad()
    def evaluate(self, sample_block: SampleBlock, block_size: int | None = None, num_classes: int = 1, *,
                 reference: Reference | None = None, datamodule: Any = None, metadata: dict[str, Any] | None = None,
                 out_dir: str | Path | None = None, device: Any = "cpu",
                 extra_metrics: dict[str, float] | None = None) -> dict[str, float]:
        """Generate ``num_samples`` with ``sample_block``, score them, write the row (rank 0);
        returns ``{prefix + metric: value}``, the same on every rank. ``extra_metrics`` (e.g.
        ``bits_per_dim`` of a generator with a likelihood) join the row beside FID."""
        plan = SamplingPlan(self.num_samples, max(1, int(num_classes)), int(block_size or self.batch_size))
        if plan.block_size > max(plan.per_class) and dist_info()[0] == 0:
            print(f"genmodels eval: note: batch_size {plan.block_size} > {max(plan.per_class)} samples per class: each "
                  "block generates more images than it keeps (set batch_size to a divisor of the per-class count)",
                  file=sys.stderr)
        ref = reference if reference is not None else self.resolve_reference(datamodule, device)
        t0 = time.perf_counter()
        out = generate_and_extract(sample_block, plan, self.extractor, device, keep_images=self.export_npz,
                                   autocast=self.autocast, progress=self.progress)
        metrics = row = None
        if out is not None:  # rank 0
            metrics = self.score(out["features"], out["logits"], out["spatial"], ref)
            metrics["sec_per_image"] = out["seconds"] / self.num_samples
            metrics.update(extra_metrics or {})
            row = self._row("generation", metrics, ref, metadata, per_class=plan.per_class,
                            wall_seconds=time.perf_counter() - t0, device=device, batch_size=plan.block_size)
            if out["images"] is not None and out_dir is not None:
                h, w = out["images"].shape[1:3]
                path = Path(out_dir) / "samples" / f"samples_{self.num_samples}x{h}x{w}x3.npz"
                row["samples_npz"] = str(write_adm_npz(path, out["images"], out["labels"]))
                print(f"genmodels eval: wrote {self.num_samples} samples (ADM format) to {path}", file=sys.stderr)
            self._write(row, out_dir)
        return self._finish(metrics, row)

    @torch.no_grad()
    def evaluate_samples(self, samples: str | Path | np.ndarray, labels: np.ndarray | None = None, *,
                         reference: Reference | None = None, datamodule: Any = None,
                         metadata: dict[str, Any] | None = None, out_dir: str | Path | None = None,
                         device: Any = "cpu") -> dict[str, float]:
        """Score samples made elsewhere: an ADM ``.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels),
        a folder of images (sorted by name) or a uint8 array (N, H, W, 3). Order matters for the
        IS splits. ``num_samples`` is the number of samples given."""
        source = str(samples) if not isinstance(samples, np.ndarray) else "array"
        if isinstance(samples, np.ndarray):
            images = samples
        elif Path(samples).is_dir():
            images = read_image_dir(samples)
        else:
            images, _, file_labels = read_adm_npz_all(samples)
            labels = file_labels if labels is None else labels
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise GenmodelsError(f"samples must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        ref = reference if reference is not None else self.resolve_reference(datamodule, device)
        t0 = time.perf_counter()
        out = extract_images(images, self.extractor, None, self.batch_size, device, progress=self.progress,
                             what="sample features")
        metrics = row = None
        if out is not None:
            metrics = self.score(out["features"], out["logits"], out["spatial"], ref)
            per_class = None if labels is None else np.bincount(np.asarray(labels).astype(np.int64)).tolist()
            row = self._row("samples", metrics, ref, {"samples": source, **(metadata or {})}, per_class=per_class,
                            wall_seconds=time.perf_counter() - t0, device=device, num_samples=len(images))
            self._write(row, out_dir)
        return self._finish(metrics, row)

    evaluate_npz = evaluate_samples

    @torch.no_grad()
    def evaluate_reconstructions(self, reconstruct: Callable[[torch.Tensor], torch.Tensor], dataset: Any, *,
                                 reference: Reference | None = None, datamodule: Any = None,
                                 metadata: dict[str, Any] | None = None, out_dir: str | Path | None = None,
                                 device: Any = "cpu", num_images: int | None = None) -> dict[str, float]:
        """Tokenizer evaluation (rFID ...): ``reconstruct`` (images in [-1, 1] -> [-1, 1]) of the
        first ``num_images`` (default ``num_reference`` or all) real images of ``dataset``, scored
        against the reference. Metrics ``rfid``, ``ris``, ``ris_std``, precision, recall."""
        ref = reference if reference is not None else self.resolve_reference(datamodule, device)
        n = num_images or self.num_reference or len(dataset)
        t0 = time.perf_counter()
        out = extract_images(dataset, self.extractor, n, self.batch_size, device, transform=reconstruct,
                             progress=self.progress, what="reconstructions")
        metrics = row = None
        if out is not None:
            metrics = self.score(out["features"], out["logits"], out["spatial"], ref)
            row = self._row("reconstruction", metrics, ref, metadata, per_class=None,
                            wall_seconds=time.perf_counter() - t0, device=device, num_samples=out["num"])
            self._write(row, out_dir)
        result = self._finish(metrics, row, prefix_map={"fid": "rfid", "sfid": "rsfid", "is": "ris",
                                                        "is_std": "ris_std"})
        return result

    # ------------------------------------------------------------------ rows
    def _row(self, kind: str, metrics: dict[str, float], ref: Reference, metadata: dict[str, Any] | None, *,
             per_class: list[int] | None, wall_seconds: float, device: Any, num_samples: int | None = None,
             batch_size: int | None = None) -> dict[str, Any]:
        meta = dict(metadata or {})
        config_files = [str(f) for f in (self.config_files if self.config_files is not None
                                         else meta.pop("config_files", None) or [])]
        meta.pop("config_files", None)
        n = self.num_samples if num_samples is None else int(num_samples)
        gaps = paper_protocol_gaps(num_samples=n, per_class=per_class, rules=self.rules,
                                   num_reference=ref.num_images, extractor=self.extractor.name,
                                   stored_statistics=ref.stored_statistics)
        if kind == "reconstruction":
            gaps = [g for g in gaps if not g.startswith("class balance")]
        if self.official and gaps:
            _loud("genmodels eval: OFFICIAL run NOT comparable with the papers' tables (ADM protocol):\n  "
                  + "\n  ".join(gaps))
        device = torch.device(device)
        sampling = {**dict(meta.pop("sampling", None) or {}), **self.sample_kwargs}
        row = {
            "name": self.name or meta.pop("name", None) or name_from_configs(config_files) or meta.get("model"),
            "kind": kind,
            "time": _dt.datetime.now().isoformat(timespec="seconds"),
            **meta,
            "sampling": sampling,
            "sampling_precision": self.precision or (f"autocast-{self.autocast}" if self.autocast else "fp32"),
            "num_samples": n,
            "batch_size": batch_size or self.batch_size,
            "seed": self.seed,
            "dataset": ref.dataset,
            "feature_extractor": self.extractor.name,
            "extractor_key": self.extractor.cache_key(),
            "reference": ref.source,
            "num_reference": ref.num_images,
            "stored_statistics": ref.stored_statistics,
            "stored_spatial_statistics": ref.stored_spatial,
            **{k: float(v) for k, v in metrics.items()},
            "protocol": self.protocol,
            **self.rules.describe(),
            "comparable_with_papers": not gaps,
            "not_comparable": gaps,
            "official": self.official,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "world_size": dist_info()[1],
            "wall_seconds": wall_seconds,
            "config_files": config_files,
        }
        return row

    def _write(self, row: dict[str, Any], out_dir: str | Path | None) -> None:
        paths = ([Path(out_dir) / "results.jsonl"] if out_dir is not None else []) + \
                ([Path(self.results_file)] if self.results_file else [])
        for p in paths:
            append_results_row(row, p)
        if self.progress:
            shown = {k: row[k] for k in ("fid", "sfid", "is", "precision", "recall") if k in row}
            print("genmodels eval: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
                  + f" ({row['feature_extractor']}, {row['is_rule']}, P/R {row['pr_arithmetic']}"
                  + ("" if row["comparable_with_papers"] else ", not comparable with papers") + ")",
                  file=sys.stderr, flush=True)

    def _finish(self, metrics: dict[str, float] | None, row: dict[str, Any] | None,
                prefix_map: dict[str, str] | None = None) -> dict[str, float]:
        metrics, row = broadcast_from_zero((metrics, row))
        self.last_row = row
        names = prefix_map or {}
        return {f"{self.metric_prefix}{names.get(k, k)}": float(v) for k, v in metrics.items()}
