"""The judge: generate N samples, extract features, FID / IS / precision / recall, write a row.

Used by ``genmodels test`` through ``GeneratorModule``'s test hooks::

    on_test_epoch_start:  evaluator.begin(module)           # resolve / load / compute the reference
    test_step(batch):     evaluator.update_real(images, labels)   # no-op once the reference is known
    on_test_epoch_end:    module.log_dict(evaluator.evaluate(module))

and on its own (``Evaluator(...).evaluate(model)`` with any object that has
``sample_images(labels, generator=..., **sampling) -> images in [-1, 1]``; ``evaluate_npz``
scores an ADM ``.npz`` of samples, e.g. from ``genmodels predict`` or an official release).

Protocol
--------
* Samples: ``num_samples`` images, labels ``i % num_classes`` for sample ``i`` (class-balanced,
  and every IS split is balanced too). Sample ``i`` belongs to batch ``i // batch_size``; a
  batch is generated with a ``torch.Generator`` seeded from ``(seed, first index)`` and batch
  ``b`` runs on rank ``b % world_size``. The samples are therefore the same for any number
  of processes (given the batch size), and DDP gives the single-process numbers.
* Features: images quantised to uint8 (as a PNG stores them), one forward of the feature
  extractor (``features.py``), float32, autocast off; gathered over ranks with torchmetrics ``cat`` states (``FeatureBank``) and
  put back in sample order before any statistic is computed (``metrics.py``, float64).
* Reference (``reference``): a data-module split name, or an ADM reference ``.npz``.
  - split: features of ``datamodule.reference_dataset(split)`` (first ``num_reference``
    images), computed once, sharded over ranks, cached as ``.npz`` keyed by data set id,
    split, resolution, extractor and N. Without ``reference_dataset``, split ``"test"`` is
    taken from the test batches given to ``update_real`` (DistributedSampler padding removed).
  - ``*.npz`` (ADM protocol): FID against the file's stored ``mu``/``sigma`` (when their
    dimension matches the extractor's), precision/recall against the features of its
    ``arr_0`` images, IS over 10 splits. Use ``feature_extractor: inception`` with
    ``VIRTUAL_imagenet256_labeled.npz`` and ``num_samples: 50000`` for paper numbers
    (``official: true`` warns loudly otherwise).
* Results row (rank 0): JSON line + CSV (``results.py``) in ``<log_dir>/results.jsonl`` and,
  if given, ``results_file``. Config files come from ``config_files`` or, when not given,
  from the ``--config``/``-c`` arguments on the command line (``sys.argv``).
"""
from __future__ import annotations

import datetime as _dt
import math
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics import Metric

from genmodels.errors import GenmodelsError
from genmodels.evaluation.features import FeatureExtractor, build_feature_extractor
from genmodels.evaluation.metrics import feature_statistics, frechet_distance, inception_score, manifold_radii, \
    precision_recall
from genmodels.evaluation.reference import Reference, cache_name, default_cache_dir, nhwc_uint8_to_images, \
    read_adm_npz, write_adm_npz
from genmodels.evaluation.results import append_results_row
from genmodels.utils.paths import run_dir

ADM_NUM_SAMPLES = 50_000


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        torch.distributed.barrier()


def _loud(msg: str) -> None:
    banner = "=" * 78
    text = f"\n{banner}\n{msg}\n{banner}"
    warnings.warn(text, stacklevel=3)
    print(text, file=sys.stderr, flush=True)


class FeatureBank(Metric):
    """Features (B, D), logits (B, K) and global sample indices (B,) of one side of the
    comparison, gathered over ranks; ``compute()`` returns them sorted by index, duplicates
    and indices ``>= limit`` dropped, plus the summed generation ``seconds``."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("features", [], dist_reduce_fx="cat")
        self.add_state("logits", [], dist_reduce_fx="cat")
        self.add_state("index", [], dist_reduce_fx="cat")
        self.add_state("seconds", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.limit: int | None = None

    def update(self, features: torch.Tensor, logits: torch.Tensor | None, index: torch.Tensor,
               seconds: float = 0.0) -> None:
        if logits is None:
            logits = features.new_zeros(len(features), 0)
        self.features.append(features.detach().float())
        self.logits.append(logits.detach().float())
        self.index.append(index.to(device=features.device, dtype=torch.int64))
        self.seconds += seconds

    def compute(self) -> dict[str, Any]:
        feats, logits, index = (torch.cat(s) if isinstance(s, list) else s
                                for s in (self.features, self.logits, self.index))
        order = torch.argsort(index, stable=True)
        feats, logits, index = feats[order], logits[order], index[order]
        keep = torch.ones_like(index, dtype=torch.bool)
        keep[1:] = index[1:] != index[:-1]
        if self.limit is not None:
            keep &= index < self.limit
        return {"features": feats[keep], "logits": logits[keep] if logits.shape[1] else None,
                "index": index[keep], "seconds": float(self.seconds)}

    def has_data(self) -> bool:
        return bool(self.index) and sum(len(i) for i in self.index) > 0


class Evaluator(nn.Module):
    """FID / IS / precision / recall of a generator (see the module docstring).

    Args:
        feature_extractor: ``"digits-classifier"`` (CPU, CI), ``"inception"`` (torch-fidelity,
            paper numbers) or a class path of an ``nn.Module`` (see ``features.py``).
        feature_extractor_kwargs: passed to it (e.g. ``{weights_path: ...}``).
        num_samples: N generated samples (50,000 for the ADM protocol).
        batch_size: samples per generation batch (per rank); part of the seeding.
        sample_kwargs: sampling knobs overriding the module's ``sample_kwargs`` (cfg, ...).
        seed: base of the per-batch sampling seeds.
        reference: a split of the data module (``train``/``val``/``test``) or an ADM ``.npz``.
        num_reference: use the first ``num_reference`` real images (default: all).
        cache_dir: where reference ``.npz`` caches go (default ``$GENMODELS_CACHE/reference``
            or ``~/.cache/genmodels/reference``); ``None`` / ``""`` keeps the default,
            ``"off"`` disables caching.
        nhood_size: k of the k-NN manifolds (3, as ADM / Kynkaenniemi et al.).
        is_splits: number of IS splits (10).
        pr_chunk_size: block size of the precision/recall distance computation (memory
            ~ 3 x pr_chunk_size^2 floats; 8192 -> ~0.8 GB).
        results_file: also append the results row here (``.jsonl``; a ``.csv`` beside it).
        config_files: config files to record (default: ``--config`` arguments of sys.argv).
        name: label of the row in tables (default: stem of the last config file that is not a
            data or evaluation config, i.e. the experiment).
        export_npz: write all samples as an ADM-format ``.npz`` under ``<log_dir>/samples``.
        official: an ADM-protocol run meant to be compared with papers; warns loudly when
            ``num_samples < 50000``, the extractor is not Inception, or the reference has no
            stored statistics.
        autocast: ``"bf16"`` / ``"fp16"`` autocast while *sampling* (features are always fp32).
        metric_prefix: prefix of the returned metric names (``test/fid`` ...).
        progress: print progress lines on rank 0.
    """

    def __init__(self, feature_extractor: str = "digits-classifier",
                 feature_extractor_kwargs: dict[str, Any] | None = None, num_samples: int = 1000,
                 batch_size: int = 100, sample_kwargs: dict[str, Any] | None = None, seed: int = 0,
                 reference: str = "train", num_reference: int | None = None, cache_dir: str | None = None,
                 nhood_size: int = 3, is_splits: int = 10, pr_chunk_size: int = 8192,
                 results_file: str | None = None, config_files: list[str] | None = None, name: str | None = None,
                 export_npz: bool = False, official: bool = False, autocast: str | None = None,
                 metric_prefix: str = "test/", progress: bool = True) -> None:
        super().__init__()
        if num_samples < 2 or batch_size < 1:
            raise GenmodelsError(f"Evaluator: num_samples must be >= 2 and batch_size >= 1, got {num_samples}, {batch_size}")
        if num_samples < is_splits:
            raise GenmodelsError(f"Evaluator: num_samples={num_samples} is fewer than is_splits={is_splits}")
        if autocast not in (None, "bf16", "fp16"):
            raise GenmodelsError(f"Evaluator: autocast must be null, 'bf16' or 'fp16', got {autocast!r}")
        self.feature_extractor_spec = feature_extractor
        self.feature_extractor_kwargs = dict(feature_extractor_kwargs or {})
        self.num_samples, self.batch_size, self.seed = int(num_samples), int(batch_size), int(seed)
        self.sample_kwargs = dict(sample_kwargs or {})
        self.reference_spec, self.num_reference = str(reference), num_reference
        self.cache_dir = None if cache_dir in (None, "", "off") else Path(cache_dir).expanduser()
        self.use_cache = cache_dir != "off"
        self.nhood_size, self.is_splits, self.pr_chunk_size = nhood_size, is_splits, pr_chunk_size
        self.results_file, self.config_files, self.name = results_file, config_files, name
        self.export_npz, self.official, self.autocast = export_npz, official, autocast
        self.metric_prefix, self.progress = metric_prefix, progress
        self.real = FeatureBank()
        self.fake = FeatureBank()
        # Not a registered submodule: the extractor's weights must stay out of the
        # LightningModule's state_dict (checkpoints load strictly) and out of its dtype casts.
        object.__setattr__(self, "_extractor", None)
        if isinstance(feature_extractor, nn.Module):
            object.__setattr__(self, "_extractor", build_feature_extractor(feature_extractor))
        self._reference: Reference | None = None
        self._real_radii: torch.Tensor | None = None
        self._real_pending = False  # reference comes from update_real batches
        self._begun = False
        self._real_seen = 0
        self._cache_path: Path | None = None
        self._dataset_id: str | None = None
        self._dims: tuple[int, int] | None = None  # (feature dim, logit dim) of the extractor

    # ------------------------------------------------------------------ features
    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            object.__setattr__(self, "_extractor",
                               build_feature_extractor(self.feature_extractor_spec, **self.feature_extractor_kwargs))
        return self._extractor

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features (B, D) and logits (B, K) | None of images (B, 3, H, W) in [-1, 1], fp32.

        Images are first quantised to 8 bits (what a PNG / an ADM ``.npz`` stores), so the
        in-process numbers equal those of the exported samples scored later."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Evaluator: images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
        ex = self.extractor
        if next(iter(ex.parameters()), torch.empty(0)).device != images.device:
            ex.to(images.device)
        with torch.autocast(device_type=images.device.type, enabled=False):
            features, logits = ex(images.float())
        if not torch.isfinite(features).all():
            raise ValueError("Evaluator: non-finite features (NaN/inf in the images?)")
        self._dims = (features.shape[1], 0 if logits is None else logits.shape[1])
        return features.float(), (None if logits is None else logits.float())

    # ------------------------------------------------------------------ reference
    def set_reference(self, reference: Reference) -> None:
        """Use a ready reference (e.g. built by hand in a notebook or a test)."""
        self._reference, self._real_radii, self._real_pending, self._begun = reference, None, False, True

    def _cache_file(self, dataset_id: str | None, split: str, resolution: Any, n: int | None) -> Path | None:
        if not self.use_cache or dataset_id is None or n is None:
            return None
        return (self.cache_dir or default_cache_dir()) / cache_name(dataset_id, split, resolution or "na",
                                                                     self.extractor.name, n)

    def _reference_from_features(self, out: dict, source: str) -> Reference:
        if len(out["features"]) < 2:
            raise ValueError(f"Evaluator: reference {source} has {len(out['features'])} images; need at least 2")
        mu, sigma = feature_statistics(out["features"])
        return Reference(out["features"], mu, sigma, source)

    @torch.no_grad()
    def _features_of_dataset(self, dataset: Any, n: int, device: torch.device, num_workers: int = 0,
                             transform: Any = None) -> dict:
        """Features of ``dataset[0:n]`` (items ``(image, label)`` or images), sharded over
        ranks in batches like the samples; ``transform`` maps images first (reconstruction)."""
        from torch.utils.data import DataLoader, Subset

        rank, world = _dist()
        bs = self.batch_size
        starts = list(range(0, n, bs))[rank::world]
        mine = [i for s in starts for i in range(s, min(n, s + bs))]
        loader = DataLoader(Subset(dataset, mine), batch_size=bs, shuffle=False, num_workers=num_workers)
        bank = FeatureBank().to(device)
        pos = 0
        for batch in loader:
            images = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)
            idx = torch.as_tensor(mine[pos:pos + len(images)])
            pos += len(images)
            if transform is not None:
                images = transform(images)
            feats, logits = self.extract(images)
            bank.update(feats, logits, idx)
        self._ensure_update(bank, device, lambda: _first_image(dataset))
        return bank.compute()

    def _ensure_update(self, bank: FeatureBank, device: torch.device, example: Any = None) -> None:
        """A rank that saw no data gives an empty update of the right widths (gathering needs it)."""
        if bank.index:
            return
        if self._dims is None:
            x = example()[None] if example is not None else torch.zeros(1, 3, 32, 32)
            self.extract(x.to(device))
        d, k = self._dims
        bank.update(torch.zeros(0, d, device=device), torch.zeros(0, k, device=device) if k else None,
                    torch.zeros(0, dtype=torch.int64, device=device))

    @torch.no_grad()
    def _adm_reference(self, path: Path, device: torch.device) -> Reference:
        images, mu, sigma = read_adm_npz(path)
        n = len(images) if self.num_reference is None else min(self.num_reference, len(images))
        cache = self._cache_file(f"adm-{path.stem}", "arr_0", images.shape[1], n)
        ref = None
        if cache is not None and cache.is_file():
            ref = Reference.load(cache)
        if ref is None:
            ref = self._reference_from_features(
                self._features_of_dataset(_NHWCDataset(images), n, device), f"{path} (arr_0[:{n}])")
            if cache is not None and _dist()[0] == 0:
                ref.save(cache, source_file=str(path))
        if mu is not None:
            if mu.shape == ref.mu.shape:
                ref = Reference(ref.features, mu, sigma, f"{path} (stored mu/sigma; arr_0[:{n}] for P/R)",
                                stored_statistics=True)
            else:
                _loud(f"genmodels eval: {path} stores mu/sigma of dimension {mu.shape[0]}, but the feature "
                      f"extractor {self.extractor.name} gives {ref.mu.shape[0]}-d features; FID uses statistics of "
                      f"arr_0 recomputed with {self.extractor.name} instead (not the ADM reference statistics)")
        return ref

    def begin(self, module: Any = None) -> None:
        """Resolve the reference before the test loop (called from ``on_test_epoch_start``):
        load it from the cache, or compute and cache it; after this, ``update_real`` is a
        no-op unless the reference must come from the test batches."""
        if self._begun:
            return
        self._begun = True
        device = _device_of(module)
        trainer = _trainer_of(module)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        spec = self.reference_spec
        if spec.endswith(".npz"):
            self._reference = self._adm_reference(Path(spec).expanduser(), device)
            self._dataset_id = f"adm-{Path(spec).stem}"
            self.real.reset()
            return
        self._dataset_id = getattr(dm, "dataset_id", None)
        resolution = getattr(dm, "image_size", None)
        has_ref = dm is not None and hasattr(dm, "reference_dataset")
        dataset = dm.reference_dataset(spec) if has_ref else None
        if dataset is None and spec == "test" and trainer is not None:
            dataset = _test_dataset(trainer)
        total = len(dataset) if dataset is not None else None
        n = total if self.num_reference is None or total is None else min(self.num_reference, total)
        self._cache_path = self._cache_file(self._dataset_id, spec, resolution, n)
        if self._cache_path is not None and self._cache_path.is_file():
            self._reference = Reference.load(self._cache_path)
            self.real.reset()
            return
        if has_ref:
            out = self._features_of_dataset(dataset, n, device, getattr(dm, "num_workers", 0))
            self._reference = self._reference_from_features(out, f"{self._dataset_id or type(dm).__name__}:{spec}"
                                                                 f"[:{n}]")
            self._save_reference()
            self.real.reset()
        elif spec == "test":
            self._real_pending = True
            self.real.limit = n
        else:
            raise GenmodelsError(f"Evaluator: reference={spec!r} needs a data module with reference_dataset(split) "
                                 "(genmodels.data.ImageDataModule); without one only 'test' (the test batches) or an "
                                 "ADM .npz path can be used")

    def _save_reference(self) -> None:
        if self._cache_path is not None and self._reference is not None and _dist()[0] == 0:
            self._reference.save(self._cache_path, extractor=self.extractor.name)

    @torch.no_grad()
    def update_real(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Real images of a test batch (from ``test_step``). Skipped when the reference is
        already known (cached, computed from the data module, or an ADM file)."""
        if self._reference is not None or (self._begun and not self._real_pending):
            return
        rank, world = _dist()
        feats, logits = self.extract(images)
        # DistributedSampler(shuffle=False): the k-th item of rank r is item k * world + r of
        # the padded index list; its padding (indices >= len(dataset)) is dropped in compute().
        idx = (self._real_seen + torch.arange(len(images))) * world + rank
        self._real_seen += len(images)
        self.real.update(feats, logits, idx)

    def _finish_reference(self, module: Any) -> Reference:
        if self._reference is not None:
            return self._reference
        if self.real.limit is None and (trainer := _trainer_of(module)) is not None:
            ds = _test_dataset(trainer)
            self.real.limit = len(ds) if ds is not None else None
        if self.num_reference is not None:
            self.real.limit = min(self.real.limit or self.num_reference, self.num_reference)
        if not self.real.has_data() and _dist()[1] == 1:
            raise RuntimeError("Evaluator: no reference -- give reference: <split> with a data module, an ADM .npz, "
                               "or feed real images with update_real() before evaluate()")
        self._ensure_update(self.real, _device_of(module))
        out = self.real.compute()
        self._reference = self._reference_from_features(out, f"{self._dataset_id or 'test batches'}:test[:{len(out['features'])}]")
        if self._cache_path is None:
            self._cache_path = self._cache_file(self._dataset_id, "test", _resolution_of(module), len(out["features"]))
        self._save_reference()
        self.real.reset()
        self._real_pending = False
        return self._reference

    # ------------------------------------------------------------------ scoring
    def score(self, features: torch.Tensor, logits: torch.Tensor | None, reference: Reference | None = None,
              ) -> dict[str, float]:
        """FID, IS (+ std), precision, recall of sample features against the reference."""
        ref = reference or self._reference
        if ref is None:
            raise RuntimeError("Evaluator.score: no reference (call begin()/set_reference() first)")
        if features.shape[1] != ref.features.shape[1]:
            raise ValueError(f"Evaluator: sample features are {features.shape[1]}-d but the reference's are "
                             f"{ref.features.shape[1]}-d (a cached reference from another extractor?)")
        mu, sigma = feature_statistics(features)
        out = {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma)}
        if logits is not None:
            out["is"], out["is_std"] = inception_score(logits, self.is_splits)
        real = ref.features.to(features.device)
        if self._real_radii is None or reference is not None:
            radii = manifold_radii(real, self.nhood_size, self.pr_chunk_size)
            if reference is None:
                self._real_radii = radii
        else:
            radii = self._real_radii.to(features.device)
        out["precision"], out["recall"] = precision_recall(real, features, self.nhood_size, self.pr_chunk_size,
                                                           real_radii=radii)
        return out

    def _official_checks(self) -> None:
        if not self.official:
            return
        if self.num_samples < ADM_NUM_SAMPLES:
            _loud(f"genmodels eval: OFFICIAL run with num_samples={self.num_samples} < {ADM_NUM_SAMPLES:,}. FID/IS/"
                  "precision/recall are biased at small N; these numbers are NOT comparable with the papers "
                  "(ADM protocol: 50,000 samples).")
        if not self.extractor.name.startswith("inception"):
            _loud(f"genmodels eval: OFFICIAL run with feature extractor {self.extractor.name}; papers use "
                  "Inception-v3 pool_3 (feature_extractor: inception).")
        if self._reference is not None and not self._reference.stored_statistics:
            _loud("genmodels eval: OFFICIAL run whose FID reference statistics were recomputed, not read from the ADM "
                  "reference batch (reference: VIRTUAL_imagenet256_labeled.npz); recomputed statistics move FID.")

    # ------------------------------------------------------------------ generation
    def labels(self, num_classes: int) -> torch.Tensor:
        """Labels of all N samples: ``i % num_classes`` (zeros when unconditional)."""
        from genmodels.data.base import balanced_labels

        if num_classes and num_classes > 0:
            return balanced_labels(self.num_samples, num_classes)
        return torch.zeros(self.num_samples, dtype=torch.int64)

    def batch_seed(self, start: int) -> int:
        return (self.seed * 1_000_003 + start) % (2 ** 63 - 1)

    @torch.no_grad()
    def generate_and_extract(self, model: Any) -> dict[str, Any]:
        """This rank's share of the N samples -> ``self.fake``; returns the gathered result."""
        rank, world = _dist()
        device = _device_of(model)
        generator_net = getattr(model, "generator", None)
        labels = self.labels(int(getattr(generator_net, "num_classes", 0) or 0))
        starts = list(range(0, self.num_samples, self.batch_size))
        mine = starts[rank::world]
        amp = (torch.autocast(device.type, dtype=torch.bfloat16 if self.autocast == "bf16" else torch.float16)
               if self.autocast else nullcontext())
        keep_images = [] if self.export_npz else None
        t_start = time.perf_counter()
        for n_done, s in enumerate(mine):
            e = min(self.num_samples, s + self.batch_size)
            g = torch.Generator(device=device).manual_seed(self.batch_seed(s))
            _sync(device)
            t0 = time.perf_counter()
            with amp:
                images = model.sample_images(labels[s:e].to(device), generator=g, **self.sample_kwargs)
            _sync(device)
            dt = time.perf_counter() - t0
            if images.shape[0] != e - s:
                raise ValueError(f"sample_images returned {images.shape[0]} images for {e - s} labels")
            feats, logits = self.extract(images)
            self.fake.update(feats, logits, torch.arange(s, e), seconds=dt)
            if keep_images is not None:
                keep_images.append((np.arange(s, e), _to_nhwc_uint8(images), labels[s:e].numpy()))
            if self.progress and rank == 0 and (n_done + 1) % max(1, len(mine) // 10) == 0:
                done = (n_done + 1) * (e - s)
                print(f"genmodels eval: {min(done * world, self.num_samples)}/{self.num_samples} samples, "
                      f"{(time.perf_counter() - t_start) / max(1, done):.4f} s/image (this rank)", flush=True)
        self._ensure_update(self.fake, device)
        out = self.fake.compute()
        self.fake.reset()
        if len(out["features"]) != self.num_samples:
            raise RuntimeError(f"Evaluator: gathered {len(out['features'])} samples, expected {self.num_samples}")
        out["images"] = keep_images
        return out

    # ------------------------------------------------------------------ entry points
    @torch.no_grad()
    def evaluate(self, module: Any) -> dict[str, float]:
        """Generate, score, write the results row (rank 0), return ``{prefix+metric: value}``
        (the same values on every rank)."""
        self.begin(module)
        ref = self._finish_reference(module)
        self._official_checks()
        t0 = time.perf_counter()
        out = self.generate_and_extract(module)
        metrics = self.score(out["features"], out["logits"])
        metrics["sec_per_image"] = out["seconds"] / self.num_samples
        metrics["num_samples"] = float(self.num_samples)
        row = self.results_row(module, metrics, ref, wall_seconds=time.perf_counter() - t0)
        if out["images"] is not None:
            row["samples_npz"] = str(self._export(out["images"], module))
        if _dist()[0] == 0:
            self.write_row(row, module)
            if self.progress:
                print("genmodels eval: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
        self.last_row = row
        return {f"{self.metric_prefix}{k}": float(v) for k, v in metrics.items()}

    @torch.no_grad()
    def evaluate_npz(self, path: str | Path, module: Any = None) -> dict[str, float]:
        """Score samples stored in an ADM-format ``.npz`` (``arr_0`` uint8 NHWC), e.g. from
        ``genmodels predict`` or an official release. Order matters for the IS splits."""
        self.begin(module)
        ref = self._finish_reference(module)
        images, _, _ = read_adm_npz(path)
        out = self._features_of_dataset(_NHWCDataset(images), len(images), _device_of(module))
        metrics = self.score(out["features"], out["logits"], ref)
        return {f"{self.metric_prefix}{k}": float(v) for k, v in metrics.items()}

    @torch.no_grad()
    def evaluate_reconstructions(self, module: Any, split: str | None = None) -> dict[str, float]:
        """Tokenizer evaluation (reconstruction FID etc.): encode/decode the real images of
        ``split`` (default: the reference split) with ``module.tokenizer`` and score the
        reconstructions against the reference. For ``TokenizerModule.on_test_epoch_end``."""
        self.begin(module)
        ref = self._finish_reference(module)
        trainer = _trainer_of(module)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is None or not hasattr(dm, "reference_dataset"):
            raise GenmodelsError("evaluate_reconstructions needs a data module with reference_dataset(split)")
        split = split or (self.reference_spec if not self.reference_spec.endswith(".npz") else "test")
        dataset = dm.reference_dataset(split)
        n = len(dataset) if self.num_reference is None else min(self.num_reference, len(dataset))
        tok = module.tokenizer
        out = self._features_of_dataset(dataset, n, _device_of(module),
                                        transform=lambda x: tok.decode(tok.encode(x)).clamp(-1, 1))
        metrics = self.score(out["features"], out["logits"], ref)
        metrics["num_images"] = float(n)
        row = self.results_row(module, metrics, ref, kind="reconstruction")
        row["num_samples"] = n
        if _dist()[0] == 0:
            self.write_row(row, module)
        return {f"{self.metric_prefix}r{k}" if k in ("fid", "is", "is_std") else f"{self.metric_prefix}{k}": float(v)
                for k, v in metrics.items()}

    # ------------------------------------------------------------------ rows and files
    def results_row(self, module: Any, metrics: dict[str, float], ref: Reference, kind: str = "generation",
                    wall_seconds: float | None = None) -> dict[str, Any]:
        gen = getattr(module, "generator", None)
        tok = getattr(module, "tokenizer", None)
        trainer = _trainer_of(module)
        config_files = self.config_files if self.config_files is not None else config_files_from_argv()
        rank, world = _dist()
        device = _device_of(module)
        sampling = {**dict(getattr(module, "sample_kwargs", {}) or {}), **self.sample_kwargs}
        return {
            "name": self.name or _name_from_configs(config_files) or type(gen).__name__,
            "kind": kind,
            "time": _dt.datetime.now().isoformat(timespec="seconds"),
            "model": type(gen).__name__ if gen is not None else None,
            "tokenizer": type(tok).__name__ if tok is not None else None,
            "params_generator": _count(gen),
            "params_tokenizer": _count(tok),
            "generator_config": getattr(gen, "config", None),
            "tokenizer_config": getattr(tok, "config", None),
            "sampling": sampling,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "dataset": self._dataset_id,
            "feature_extractor": self.extractor.name,
            "reference": ref.source,
            "num_reference": ref.num_images,
            "stored_statistics": ref.stored_statistics,
            **{k: (None if v is None else float(v)) for k, v in metrics.items() if k != "num_samples"},
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "world_size": world,
            "wall_seconds": wall_seconds,
            "official": self.official,
            "ckpt_path": getattr(trainer, "ckpt_path", None) if trainer is not None else None,
            "config_files": config_files,
        }

    def write_row(self, row: dict[str, Any], module: Any = None) -> list[Path]:
        paths = []
        trainer = _trainer_of(module)
        if trainer is not None:
            paths.append(run_dir(trainer) / "results.jsonl")
        if self.results_file:
            paths.append(Path(self.results_file))
        for p in paths:
            append_results_row(row, p)
        return paths

    def _export(self, parts: list, module: Any) -> Path:
        """All samples as one ADM ``.npz`` (rank shards merged by rank 0, in sample order)."""
        rank, world = _dist()
        trainer = _trainer_of(module)
        folder = run_dir(trainer) / "samples"
        idx = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        imgs = np.concatenate([p[1] for p in parts]) if parts else None
        labels = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
        if world > 1:
            shard = folder / f".shard_rank{rank}.npz"
            folder.mkdir(parents=True, exist_ok=True)
            np.savez(shard, idx=idx, imgs=imgs if imgs is not None else np.zeros((0, 1, 1, 3), np.uint8),
                     labels=labels)
            _barrier()
            if rank == 0:
                shards = [np.load(folder / f".shard_rank{r}.npz") for r in range(world)]
                idx = np.concatenate([s["idx"] for s in shards])
                imgs = np.concatenate([s["imgs"] for s in shards if len(s["idx"])])
                labels = np.concatenate([s["labels"] for s in shards])
            _barrier()
        order = np.argsort(idx, kind="stable")
        path = folder / f"samples_{len(idx)}x{'x'.join(map(str, imgs.shape[1:]))}.npz"
        if rank == 0:
            write_adm_npz(path, imgs[order], labels[order])
            if world > 1:
                for r in range(world):
                    (folder / f".shard_rank{r}.npz").unlink(missing_ok=True)
            print(f"genmodels eval: wrote {len(idx)} samples (ADM format) to {path}", flush=True)
        return path


# ---------------------------------------------------------------------------- helpers
class _NHWCDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return nhwc_uint8_to_images(self.images[i:i + 1])[0]


def _first_image(dataset: Any) -> torch.Tensor:
    item = dataset[0]
    return item[0] if isinstance(item, (tuple, list)) else item


def _count(module: Any) -> int | None:
    return sum(p.numel() for p in module.parameters()) if isinstance(module, nn.Module) else None


def _to_nhwc_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(module: Any) -> torch.device:
    if module is None:
        return torch.device("cpu")
    dev = getattr(module, "device", None)
    if isinstance(dev, torch.device):
        return dev
    if isinstance(module, nn.Module):
        p = next(iter(module.parameters()), None)
        if p is not None:
            return p.device
    return torch.device("cpu")


def _trainer_of(module: Any) -> Any:
    return getattr(module, "_trainer", None) if module is not None else None


def _resolution_of(module: Any) -> Any:
    trainer = _trainer_of(module)
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    return getattr(dm, "image_size", None)


def _test_dataset(trainer: Any) -> Any:
    loaders = getattr(trainer, "test_dataloaders", None)
    if loaders is None:
        return None
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    return getattr(loader, "dataset", None)


def _name_from_configs(config_files: list[str]) -> str | None:
    """Stem of the last config file that is not a data or evaluation config (the experiment)."""
    def is_aux(f: str) -> bool:
        p = Path(f)
        return bool({"data", "evaluation", "eval"} & set(p.parts[:-1])) or "eval" in p.stem
    picks = [f for f in config_files if not is_aux(f)] or config_files
    return Path(picks[-1]).stem if picks else None


def config_files_from_argv(argv: list[str] | None = None) -> list[str]:
    """The ``--config X`` / ``--config=X`` / ``-c X`` arguments of a LightningCLI command line."""
    argv = sys.argv[1:] if argv is None else argv
    files = []
    for i, a in enumerate(argv):
        if a in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
    return files
