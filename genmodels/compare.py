"""``genmodels compare -c configs/compare/<preset>.yaml``: every paradigm under one budget and one judge.

A preset (YAML) lists tokenizers and runs; compare trains what is missing through the same
``genmodels fit`` CLI and YAML (so trainer options such as devices / num_nodes / strategy apply
unchanged), scores every run with the same judge and N through ``genmodels test``, and writes
one folder::

    <output_dir>/table.md, table.csv       a row per run (paradigm x tokenizer), mean +- std over seeds
    <output_dir>/grid.png                  a row per run, the same classes in the same columns
    <output_dir>/fid_vs_speed.png          FID against sampling seconds per image
    <output_dir>/fid_vs_compute.png        FID against training FLOPs (checkpoints scored along the way)
    <output_dir>/runs/<name>-<digest>/     one training each: config.yaml, checkpoints, fit.log, scores

Preset fields (``configs/compare/tiny.yaml`` is the smallest complete example)::

    name, description, output_dir
    data: [config files composed first for every training]
    trainer: {options for every training, e.g. accelerator, devices, num_nodes, strategy}
    overrides: {dotted.key: value for every training, e.g. data.init_args.image_size}
    seed: 0;  seeds: 1 (``--seeds N`` overrides: each generator training repeated with N seeds)
    launcher: subprocess | inprocess;  jobs: 1;  threads: 0 (OMP threads per training, 0 = inherit)
    budget: {target_params, tolerance: 0.15, steps, batch_size, optimizer: AdamW, lr_schedule,
             curve_every: k (score a checkpoint every k steps, 0 = final only)}
    judge: {config: configs/evaluation/digits.yaml, num_samples, curve_num_samples, seed,
            test_loss: false (true: mean training loss on the test split, + loss_vs_params.png with a log-log fit)}
    grid: {classes: [...], per_class, seed}
    tokenizers: {key: {configs: [...], overrides: {dotted.key: value}, requires: [...],
                       train: true (false: nothing to train, e.g. FractalGen's pixels; the run's
                       configs then set model.init_args.tokenizer; table: "<key> (identity)", rFID 0),
                       checkpoints: {dotted.field: other tokenizer key} (chained trainings: the field
                       gets that tokenizer's last.ckpt, trained first -- e.g. TiTok's two stages:
                       stage 1's teacher_ckpt, stage 2's init_from; its key is part of this one's)}}
    runs: [{name, paradigm, tokenizer: key, configs: [...], overrides: {...}, sampling: {...},
            data: [...] (optional: this run's data configs instead of the preset's, e.g. 8-px digits),
            target_params (optional, per run), requires: [...]}]
    paper: {source, columns: {metric: header}, rows: {run name: {metric: value}}}   (ablations)

Matched budget, checked before any training: each generator, built on the meta device from its
resolved config, has ``target_params`` +- ``tolerance`` parameters; every run sees
``steps x batch_size`` training images; every run uses the same optimiser and LR-schedule family.
A run outside is refused with a ``GenmodelsError`` giving the numbers.

Keys: a training is keyed by the sha256 of its resolved config (the YAMLs and overrides composed
by the CLI's own parser, dumped as ``--print_config`` does, with the run folder and the
tokenizer checkpoint replaced by placeholders -- the tokenizer by its own key -- and so is the run's name in its
progress line), so a rerun skips finished trainings (``train.json``, written atomically), resumes interrupted ones from
``last.ckpt``, and adding a run trains only that one. Sampling knobs are not part of the
training key: rows that differ only in sampling share one training. A score is keyed by the
training key, the checkpoint step, the judge settings and the sampling knobs.

"Not built": a run whose ``requires`` entries (``pkg.module.Name`` or ``pkg.module.NAME has value``)
or config ``class_path``-s do not resolve is listed as ``not built`` in every output, never dropped.
"""
from __future__ import annotations

import concurrent.futures as cf
import copy
import csv
import hashlib
import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from genmodels.errors import GenmodelsError

RUN_DIR = "__COMPARE_RUN_DIR__"          # placeholder of the run folder inside a keyed config
TOKENIZER = "__COMPARE_TOKENIZER_{}__"   # placeholder of a tokenizer checkpoint (its digest inside)
RUN_NAME = "__COMPARE_RUN_NAME__"        # placeholder of the progress line's name (names are not part of a key)
OPTIMIZER_OF_MODULE = {"genmodels.training.GeneratorModule": "AdamW", "genmodels.training.TokenizerModule": "AdamW",
                       "genmodels.training.generator_module.GeneratorModule": "AdamW"}
_print_lock = threading.Lock()
# Live ``genmodels fit`` / ``test`` children of the subprocess launcher. A compare stopped with
# SIGTERM (a scheduler's kill, ``kill PID``) takes them down with it: an orphaned fit would keep
# writing into a run folder that the next ``genmodels compare`` resumes at the same time.
_children: set[subprocess.Popen] = set()
_stopping = threading.Event()


def stop_children(signum: int = 15, frame: Any = None) -> None:
    """SIGTERM handler of ``genmodels compare``: no new launches, children terminated, exit 128 + signum."""
    _stopping.set()
    for proc in list(_children):
        proc.terminate()
    raise SystemExit(128 + int(signum))


def say(msg: str) -> None:
    with _print_lock:
        print(f"[compare] {msg}", flush=True)


# =========================================================================== ADAPTER (one place)
# The ONE place compare loads a generator checkpoint in Python (grid, bits/dim, test loss):
# ``genmodels.load`` (genmodels/pipeline.py) -> Pipeline with .generator, .tokenizer and
# .sample_classes(classes, n_per_class, seed=, block_size=) -> (uint8 images, labels), class-major.
# Temporary only in that compare could call genmodels.load directly; kept as one seam.
def load_pipeline(ckpt_path: str | Path) -> Any:
    import genmodels

    return genmodels.load(ckpt_path).eval()


def sample_grid(pipe: Any, classes: list[int], n_per_class: int, seed: int, **knobs: Any) -> torch.Tensor:
    """``n_per_class`` samples of each class by the pipeline's seeding rule (one block per class),
    as float (len(classes) * n_per_class, 3, H, W) in [-1, 1], class-major."""
    images, _ = pipe.sample_classes(classes, n_per_class, seed=seed, block_size=max(1, n_per_class), **knobs)
    return images.float() / 127.5 - 1.0
# =========================================================================== end of ADAPTER


class CompareProgress(Callback):
    """The progress line of one training: ``[compare] <run>: step s/T, x s/step, ETA``.
    Put into each training's trainer callbacks by compare; prints every ``every`` steps."""

    def __init__(self, name: str, total_steps: int, every: int = 0) -> None:
        self.name, self.total = name, int(total_steps)
        self.every = every or max(1, self.total // 10)
        self._t0, self._s0 = 0.0, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._s0 = time.perf_counter(), trainer.global_step
        if self._s0:
            say(f"{self.name}: resumed at step {self._s0}/{self.total}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        s = trainer.global_step
        if trainer.is_global_zero and (s % self.every == 0 or s == self.total) and s > self._s0:
            rate = (time.perf_counter() - self._t0) / (s - self._s0)
            say(f"{self.name}: step {s}/{self.total}, {rate:.3f} s/step, ETA {_hms(rate * (self.total - s))}")


# =========================================================================== preset and keys
def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b.c": 1, "a.d": 2}`` -> ``{"a": {"b": {"c": 1}, "d": 2}}`` (nested dicts pass through)."""
    out: dict[str, Any] = {}
    for key, value in (dotted or {}).items():
        node = out
        parts = str(key).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise GenmodelsError(f"compare: override {key!r} goes through a non-dict value")
        leaf = nest(value) if isinstance(value, dict) and any("." in str(k) for k in value) else value
        if isinstance(node.get(parts[-1]), dict) and isinstance(leaf, dict):
            node[parts[-1]] = _merge(node[parts[-1]], leaf)
        else:
            node[parts[-1]] = leaf
    return out


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else copy.deepcopy(v)
    return out


def digest(text: str) -> str:
    """The key of a canonical config text: sha256, first 12 hex digits."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _yaml(text: str) -> Any:
    """YAML -> Python with libyaml's C loader where installed (configs are parsed many times)."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _get(d: Any, dotted: str, default: Any = None) -> Any:
    for p in dotted.split("."):
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_json(path: Path, obj: Any) -> None:
    _atomic_write(path, json.dumps(obj, indent=1, default=str))


def missing_requirement(requires: list[str]) -> str | None:
    """The first entry of ``requires`` that does not resolve, else None. An entry is
    ``pkg.module.Name`` (importable attribute or module) or ``pkg.module.NAME has value``."""
    for req in requires or []:
        path, _, value = str(req).partition(" has ")
        obj = _resolve_dotted(path.strip())
        if obj is None or (value and value.strip() not in obj):
            return req
    return None


def _resolve_dotted(path: str) -> Any:
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p, None)
            if obj is None:
                return None
        return obj
    return None


def _class_paths(d: Any) -> list[str]:
    if isinstance(d, dict):
        own = [d["class_path"]] if isinstance(d.get("class_path"), str) else []
        return own + [c for v in d.values() for c in _class_paths(v)]
    if isinstance(d, list):
        return [c for v in d for c in _class_paths(v)]
    return []


class Resolver:
    """Composes config files + overrides exactly as ``genmodels fit`` does (LightningCLI's own
    parser, omegaconf+ mode) and dumps the result as ``--print_config`` would. The parser is
    built once (about a second) and reused."""

    def __init__(self) -> None:
        import logging

        from genmodels.cli import GenmodelsCLI

        class _Got(Exception):
            pass

        class _ParserOnly(GenmodelsCLI):
            def parse_arguments(self, parser, args):  # called right after the parser is built
                raise _Got(parser)

        logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
        try:
            _ParserOnly(model_class=None, subclass_mode_model=True, datamodule_class=None, subclass_mode_data=True,
                        seed_everything_default=0,
                        parser_kwargs={"parser_mode": "omegaconf+", "default_env": False, "exit_on_error": False},
                        args=[])
        except _Got as e:
            self.parser = e.args[0]
        self._lock = threading.Lock()
        self._memo: dict[tuple[str, ...], str] = {}

    def __call__(self, files: list[str | Path], what: str) -> tuple[str, dict]:
        args = ["fit"] + [a for f in files for a in ("-c", str(f))]
        # the same file contents compose to the same config (rows differing only in sampling, replans)
        memo = tuple(Path(f).read_text() for f in files)
        with self._lock:
            if memo in self._memo:
                text = self._memo[memo]
                return text, _yaml(text)
            try:
                cfg = self.parser.parse_args(args)
            except BaseException as e:  # jsonargparse: ArgumentError / SystemExit with the reason
                msg = " ".join(str(e).split())
                raise GenmodelsError(f"compare: {what}: the composed config does not parse: {msg[:600]}") from None
            sub = self.parser._subcommands_action._name_parser_map["fit"]
            text = sub.dump(cfg["fit"], skip_none=False)
            text = "\n".join(line for line in text.splitlines() if not line.startswith("# lightning"))
            self._memo[memo] = text
        return text, _yaml(text)


@dataclass
class Training:
    """One training (a tokenizer or a generator with one seed), keyed by its resolved config."""
    kind: str                      # "tokenizer" | "generator"
    label: str                     # tokenizer key or run name (first user)
    seed: int
    files: list[str]
    tokenizer: "Training | None" = None
    needs: dict = field(default_factory=dict)   # dotted config field -> the tokenizer Training whose ckpt fills it
    status: str = "planned"        # planned | not built | done | failed: ...
    reason: str = ""
    text: str = ""                 # canonical resolved config (placeholders)
    config: dict = field(default_factory=dict)
    key: str = ""
    dir: Path | None = None
    params: int | None = None
    steps: int = 0
    world: int = 1
    lock: Any = field(default_factory=threading.Lock, repr=False)
    future: Any = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return int(_get(self.config, "data.init_args.batch_size", 0) or 0)

    @property
    def images_seen(self) -> int:
        accum = int(_get(self.config, "trainer.accumulate_grad_batches", 1) or 1)
        return self.steps * self.batch_size * accum * self.world

    @property
    def last_ckpt(self) -> Path:
        return self.dir / "checkpoints" / "last.ckpt"

    def done(self) -> dict | None:
        p = self.dir / "train.json"
        return json.loads(p.read_text()) if p.is_file() else None


@dataclass
class Row:
    """One row of the table for one seed: a run (paradigm x tokenizer) with its sampling knobs."""
    spec: dict
    seed: int
    training: Training
    sampling: dict


class Preset:
    """A parsed, validated compare preset."""

    KNOWN = {"name", "description", "output_dir", "data", "trainer", "overrides", "seed", "seeds", "launcher", "jobs", "threads",
             "budget", "judge", "grid", "tokenizers", "runs", "paper"}

    def __init__(self, path: str | Path, seeds: int | None = None, output_dir: str | None = None,
                 launcher: str | None = None, jobs: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GenmodelsError(f"compare: preset file {self.path} does not exist")
        raw = _yaml(self.path.read_text()) or {}
        if not isinstance(raw, dict):
            raise GenmodelsError(f"compare: {self.path} must hold a mapping (name, budget, judge, runs, ...)")
        unknown = sorted(set(raw) - self.KNOWN)
        if unknown:
            raise GenmodelsError(f"compare: {self.path}: unknown field(s) {unknown}; known: {sorted(self.KNOWN)}")
        self.raw = raw
        self.name = raw.get("name") or self.path.stem
        self.description = raw.get("description", "")
        self.output_dir = Path(output_dir or raw.get("output_dir") or f"outputs/compare/{self.name}")
        self.data = list(raw.get("data") or [])
        self.trainer = dict(raw.get("trainer") or {})
        self.overrides = dict(raw.get("overrides") or {})
        self.seed = int(raw.get("seed", 0))
        self.num_seeds = int(seeds if seeds is not None else raw.get("seeds", 1))
        self.launcher = launcher or raw.get("launcher", "subprocess")
        self.jobs = int(jobs if jobs is not None else raw.get("jobs", 1))
        self.threads = int(raw.get("threads", 0))
        self.budget = dict(raw.get("budget") or {})
        self.judge = dict(raw.get("judge") or {})
        self.grid = dict(raw.get("grid") or {})
        self.tokenizers = dict(raw.get("tokenizers") or {})
        self.runs = list(raw.get("runs") or [])
        self.paper = raw.get("paper")
        self._validate()

    def tokenizer_order(self) -> list[str]:
        """Tokenizer keys with every ``checkpoints`` dependency before its user."""
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(k: str, path: tuple[str, ...]) -> None:
            if state.get(k) == 2:
                return
            if state.get(k) == 1:
                raise GenmodelsError(f"compare: {self.path}: tokenizers' checkpoints form a cycle: "
                                     + " -> ".join(path + (k,)))
            state[k] = 1
            for dep in (self.tokenizers[k].get("checkpoints") or {}).values():
                visit(dep, path + (k,))
            state[k] = 2
            order.append(k)

        for k in self.tokenizers:
            visit(k, ())
        return order

    def _validate(self) -> None:
        where = str(self.path)
        if self.num_seeds < 1:
            raise GenmodelsError(f"compare: seeds must be >= 1, got {self.num_seeds}")
        if self.launcher not in ("subprocess", "inprocess"):
            raise GenmodelsError(f"compare: {where}: launcher must be 'subprocess' or 'inprocess', got {self.launcher!r}")
        if self.jobs > 1 and self.launcher != "subprocess":
            raise GenmodelsError(f"compare: {where}: jobs={self.jobs} needs launcher: subprocess")
        for k in ("target_params", "steps", "batch_size", "optimizer", "lr_schedule"):
            if k not in self.budget:
                raise GenmodelsError(f"compare: {where}: budget.{k} is missing (the matched budget states "
                                     "target_params, tolerance, steps, batch_size, optimizer, lr_schedule)")
        self.budget.setdefault("tolerance", 0.15)
        self.budget.setdefault("curve_every", 0)
        if "config" not in self.judge or "num_samples" not in self.judge:
            raise GenmodelsError(f"compare: {where}: judge.config and judge.num_samples are required")
        if not Path(self.judge["config"]).is_file():
            raise GenmodelsError(f"compare: {where}: judge.config {self.judge['config']} does not exist")
        self.judge.setdefault("curve_num_samples", self.judge["num_samples"])
        self.judge.setdefault("seed", 0)
        if not self.runs:
            raise GenmodelsError(f"compare: {where}: runs is empty")
        names = [r.get("name") for r in self.runs]
        if None in names or len(set(names)) != len(names):
            raise GenmodelsError(f"compare: {where}: every run needs a unique name, got {names}")
        for key, spec in self.tokenizers.items():
            for field_, dep in (spec.get("checkpoints") or {}).items():
                if dep not in self.tokenizers or dep == key:
                    raise GenmodelsError(f"compare: {where}: tokenizer {key!r}: checkpoints.{field_} names {dep!r}, "
                                         f"which is not another of the tokenizers {sorted(self.tokenizers)}")
        self.tokenizer_order()  # refuses a cycle
        for r in self.runs:
            unknown = sorted(set(r) - {"name", "paradigm", "tokenizer", "configs", "overrides", "sampling",
                                       "target_params", "requires", "note", "data"})
            if unknown:
                raise GenmodelsError(f"compare: {where}: run {r['name']!r}: unknown field(s) {unknown}")
            if r.get("data") is not None and not isinstance(r["data"], list):
                raise GenmodelsError(f"compare: {where}: run {r['name']!r}: data must be a list of config files")
            if r.get("tokenizer") is not None and r["tokenizer"] not in self.tokenizers:
                raise GenmodelsError(f"compare: {where}: run {r['name']!r}: tokenizer {r['tokenizer']!r} is not "
                                     f"among tokenizers {sorted(self.tokenizers)}")


# =========================================================================== planning
class Compare:
    """Plans, checks, runs and reports one preset (see the module docstring)."""

    def __init__(self, preset: Preset, resolver: Resolver | None = None) -> None:
        self.p = preset
        self.out = preset.output_dir.resolve()
        self.resolver = resolver or Resolver()
        self.trainings: dict[str, Training] = {}    # key -> training (shared by rows)
        self.tok_of: dict[str, Training] = {}       # tokenizer key -> its training
        self.rows: list[Row] = []
        self.results: dict[tuple[str, int], dict] = {}   # (run name, seed) -> scored metrics
        self._locks: dict[str, threading.Lock] = {}       # score key -> lock (rows may share a score)
        self._locks_guard = threading.Lock()

    # ------------------------------------------------------------------ config files
    def _write_override(self, folder: Path, name: str, obj: dict) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text(yaml.safe_dump(obj, sort_keys=False))
        return path

    def _common_files(self, label: str, user_files: list[str], overrides: dict, budget: dict | None, seed: int,
                      callbacks: list, tokenizer: Training | None, data: list[str] | None = None) -> list[str]:
        """data (the run's own ``data`` or the preset's) + the run's files + budget + shared trainer
        options + the run's overrides + compare's paths."""
        data = list(self.p.data if data is None else data)
        for f in [*data, *user_files]:
            if not Path(f).is_file():
                raise GenmodelsError(f"compare: {label}: config file {f} does not exist")
        gen = self.out / "generated"
        files = [*data, *user_files]
        if budget:
            files.append(str(self._write_override(gen, f"{label}.budget.yaml", budget)))
        if self.p.trainer or self.p.overrides:
            shared = _merge({"trainer": self.p.trainer} if self.p.trainer else {}, nest(self.p.overrides))
            files.append(str(self._write_override(gen, "shared.yaml", shared)))
        if overrides:
            files.append(str(self._write_override(gen, f"{label}.overrides.yaml", nest(overrides))))
        paths: dict[str, Any] = {
            "seed_everything": seed,
            "trainer": {"default_root_dir": RUN_DIR, "callbacks": callbacks,
                        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": RUN_DIR, "name": "logs"}}},
            "model": {"init_args": {"seed": seed}},
        }
        if tokenizer is not None:
            paths["model"]["init_args"]["tokenizer_ckpt"] = TOKENIZER.format(tokenizer.key)
        files.append(str(self._write_override(gen, f"{label}.seed{seed}.paths.yaml", paths)))
        return files

    def _callbacks(self, steps: int, curve_every: int) -> list:
        cbs = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": f"{RUN_DIR}/checkpoints", "save_last": True, "save_top_k": 0,
                              "enable_version_counter": False}},  # a resumed run overwrites, never last-v1.ckpt
               {"class_path": "genmodels.compare.CompareProgress", "init_args": {"name": RUN_NAME, "total_steps": steps}}]
        if curve_every:
            cbs.insert(1, {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": f"{RUN_DIR}/checkpoints", "filename": "step_{step:07d}",
                                         "auto_insert_metric_name": False, "every_n_train_steps": curve_every,
                                         "save_top_k": -1, "enable_version_counter": False}})
        return cbs

    def _register(self, t: Training, text: str) -> Training:
        t.text, t.config = text, _yaml(text)
        t.key = digest(text)
        if t.key in self.trainings:           # another row with the same training: share it
            return self.trainings[t.key]
        found = sorted(self.out.glob(f"runs/*-{t.key}"))
        t.dir = found[0] if found else self.out / "runs" / f"{_slug(t.label)}-{t.key}"
        t.steps = int(_get(t.config, "trainer.max_steps", -1) or -1)
        devices, nodes = _get(t.config, "trainer.devices", 1), _get(t.config, "trainer.num_nodes", 1)
        t.world = (devices if isinstance(devices, int) and devices > 0 else 1) * (nodes if isinstance(nodes, int) else 1)
        self.trainings[t.key] = t
        return t

    def plan(self) -> None:
        """Resolve every training's config, key it, find what exists; mark what is not built."""
        p = self.p
        for key in p.tokenizer_order():
            spec = p.tokenizers[key]
            t = Training("tokenizer", f"tok-{key}", p.seed, list(spec.get("configs") or []))
            t.needs = {f: self.tok_of[dep] for f, dep in (spec.get("checkpoints") or {}).items()}
            miss = self._not_built(spec, t.files)
            broken = [d for d in t.needs.values() if d.status in ("not built", "fixed")]
            if miss is None and broken:
                d = broken[0]
                miss = (f"its input tokenizer {d.label} ({d.reason})" if d.status == "not built"
                        else f"its input tokenizer {d.label} has no checkpoint to give (train: false)")
            if miss:
                t.status, t.reason = "not built", miss
                self.tok_of[key] = t
                continue
            if spec.get("train", True) is False:   # e.g. FractalGen's pixels: the run's config builds it
                t.status, t.reason = "fixed", "needs no training"
                self.tok_of[key] = t
                continue
            steps = _get(nest(spec.get("overrides") or {}), "trainer.max_steps")
            ovr = {**(spec.get("overrides") or {}), **{f: TOKENIZER.format(d.key) for f, d in t.needs.items()}}
            files = self._common_files(t.label, t.files, ovr, None, p.seed, self._callbacks(int(steps or 0), 0), None)
            text, cfg = self.resolver(files, f"tokenizer {key!r}")
            if not steps:  # the steps come from its own files: rebuild the progress callback with them
                files = self._common_files(t.label, t.files, ovr, None, p.seed,
                                           self._callbacks(int(_get(cfg, "trainer.max_steps", 0)), 0), None)
                text, _ = self.resolver(files, f"tokenizer {key!r}")
            self.tok_of[key] = self._register(t, text)
        b = p.budget
        budget_file = {"trainer": {"max_steps": int(b["steps"])}, "data": {"init_args": {"batch_size": int(b["batch_size"])}}}
        for spec in p.runs:
            for i in range(p.num_seeds):
                seed = p.seed + i
                tok = self.tok_of.get(spec.get("tokenizer")) if spec.get("tokenizer") else None
                fixed = tok is not None and tok.status == "fixed"
                tok = None if fixed else tok    # a fixed tokenizer: no checkpoint to wait for or pass
                t = Training("generator", spec["name"], seed, list(spec.get("configs") or []), tokenizer=tok)
                miss = self._not_built(spec, t.files)
                if miss is None and tok is not None and tok.status == "not built":
                    miss = f"its tokenizer {spec['tokenizer']!r} ({tok.reason})"
                if miss:
                    t.status, t.reason = "not built", miss
                    self.rows.append(Row(spec, seed, t, dict(spec.get("sampling") or {})))
                    continue
                files = self._common_files(f"{_slug(spec['name'])}", t.files, spec.get("overrides") or {}, budget_file,
                                           seed, self._callbacks(int(b["steps"]), int(b["curve_every"])), tok,
                                           spec.get("data"))
                text, cfg = self.resolver(files, f"run {spec['name']!r}")
                if fixed and not _get(cfg, "model.init_args.tokenizer"):
                    raise GenmodelsError(f"compare: run {spec['name']!r}: tokenizer {spec['tokenizer']!r} needs no training "
                                         "(train: false), so the run's configs must set model.init_args.tokenizer")
                self.rows.append(Row(spec, seed, self._register(t, text), dict(spec.get("sampling") or {})))

    def _not_built(self, spec: dict, files: list[str]) -> str | None:
        miss = missing_requirement(spec.get("requires") or [])
        if miss:
            return f"needs {miss}"
        for f in files:
            if Path(f).is_file():
                for cp in _class_paths(_yaml(Path(f).read_text()) or {}):
                    if _resolve_dotted(cp) is None:
                        return f"needs {cp}"
        return None

    # ------------------------------------------------------------------ budget
    def check_budget(self) -> list[dict]:
        """Generator parameters (meta device) within target +- tolerance, the same images seen,
        the same optimiser and schedule family; raises GenmodelsError listing every violation."""
        from genmodels.utils.config import instantiate

        b = self.p.budget
        tol = float(b["tolerance"])
        problems, report, seen = [], [], set()
        for row in self.rows:
            t = row.training
            if t.status == "not built" or t.key in seen:
                continue
            seen.add(t.key)
            gen_cfg = _get(t.config, "model.init_args.generator")
            if t.params is None:
                with torch.device("meta"):
                    t.params = sum(p.numel() for p in instantiate(gen_cfg).parameters())
            target = int(row.spec.get("target_params") or b["target_params"])
            lo, hi = target * (1 - tol), target * (1 + tol)
            name = row.spec["name"]
            if not lo <= t.params <= hi:
                problems.append(f"run {name!r} has {t.params:,} generator parameters, outside {target:,} +- "
                                f"{tol:.0%} ({round(lo):,}..{round(hi):,})")
            want = int(b["steps"]) * int(b["batch_size"])
            if t.images_seen != want:
                problems.append(f"run {name!r} sees {t.images_seen:,} images ({t.steps} steps x batch "
                                f"{t.batch_size} x {t.world} processes), budget {want:,} ({b['steps']} x {b['batch_size']})")
            opt = OPTIMIZER_OF_MODULE.get(_get(t.config, "model.class_path"), "unknown")
            if opt != b["optimizer"]:
                problems.append(f"run {name!r} trains with optimiser {opt}, budget {b['optimizer']}")
            sched = _get(t.config, "model.init_args.lr_schedule")
            if sched != b["lr_schedule"]:
                problems.append(f"run {name!r} uses lr_schedule {sched!r}, budget {b['lr_schedule']!r}")
            report.append({"run": name, "params": t.params, "target": target, "images_seen": t.images_seen})
        if problems:
            raise GenmodelsError(f"compare: {self.p.path}: budget not matched: " + "; ".join(problems))
        return report

    # ------------------------------------------------------------------ running
    def _materialise(self, t: Training) -> Path:
        """The training's runnable config: its canonical text with the placeholders filled in."""
        t.dir.mkdir(parents=True, exist_ok=True)
        text = t.text.replace(RUN_DIR, str(t.dir)).replace(RUN_NAME, json.dumps(t.label))  # a JSON string is YAML
        for dep in ([t.tokenizer] if t.tokenizer is not None else []) + list(t.needs.values()):
            text = text.replace(TOKENIZER.format(dep.key), str(dep.last_ckpt))
        path = t.dir / "config.yaml"
        if not path.is_file() or path.read_text() != text:
            _atomic_write(path, text)
        if not (t.dir / "key.yaml").is_file():
            _atomic_write(t.dir / "key.yaml", t.text)
        return path

    def _launch(self, args: list[str], log: Path) -> int:
        """One ``genmodels`` CLI call (fit / test); output into ``log``, progress lines echoed."""
        if self.p.launcher == "inprocess":
            from genmodels.cli import main
            try:
                main(args)
                return 0
            except SystemExit as e:
                return int(e.code or 0)
            except Exception as e:  # noqa: BLE001 -- recorded as a failed run, compare goes on
                log.write_text(f"{type(e).__name__}: {e}\n")
                return 1
        if _stopping.is_set():
            return 128 + 15
        env = dict(os.environ)
        if self.p.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.p.threads)
        with log.open("a") as f, subprocess.Popen([sys.executable, "-m", "genmodels.cli", *args], env=env,
                                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            _children.add(proc)
            f.write(f"$ genmodels {' '.join(args)}\n")
            for line in proc.stdout:
                f.write(line)
                if line.startswith("[compare]"):
                    with _print_lock:
                        sys.stdout.write(line)
                        sys.stdout.flush()
            rc = proc.wait()
            _children.discard(proc)
            return rc

    def train(self, t: Training) -> bool:
        """Fit (or resume, or skip) one training; True when it is finished."""
        if t.status == "not built":
            return False
        for dep in ([t.tokenizer] if t.tokenizer is not None else []) + list(t.needs.values()):
            if not self.train_wait(dep):
                t.status, t.reason = "failed", f"tokenizer {dep.label} did not finish"
                return False
        with t.lock:
            if t.done():
                t.status = "done"
                return True
            cfg = self._materialise(t)
            args = ["fit", "-c", str(cfg)]
            resume = t.last_ckpt.is_file()
            if resume:
                args += ["--ckpt_path", str(t.last_ckpt)]
            say(f"{t.label} (seed {t.seed}, {t.key}): {'resuming from last.ckpt' if resume else 'training'}, "
                f"{t.steps} steps")
            attempts_path = t.dir / "attempts.json"
            attempts = json.loads(attempts_path.read_text()) if attempts_path.is_file() else []
            t0 = time.perf_counter()
            rc = 1
            try:
                rc = self._launch(args, t.dir / "fit.log")
            finally:
                attempts.append({"seconds": time.perf_counter() - t0, "rc": rc, "resumed": resume})
                _atomic_json(attempts_path, attempts)
            step = _ckpt_step(t.last_ckpt)
            if rc != 0 or step < t.steps:
                t.status, t.reason = "failed", (f"genmodels fit exited {rc} at step {step} (see {t.dir / 'fit.log'})"
                                                f"{_error_line(t.dir / 'fit.log')}")
                say(f"{t.label}: FAILED, {t.reason}")
                return False
            done = {"key": t.key, "label": t.label, "seed": t.seed, "steps": step,
                    "train_seconds": sum(a["seconds"] for a in attempts), "attempts": len(attempts)}
            _atomic_json(t.dir / "train.json", done)
            t.status = "done"
            say(f"{t.label}: trained {step} steps in {_hms(done['train_seconds'])}")
            return True

    def train_wait(self, t: Training) -> bool:
        return t.future.result() if t.future is not None else self.train(t)

    def score(self, t: Training, ckpt: Path, num_samples: int, sampling: dict, name: str) -> dict | None:
        """Judge one checkpoint (``genmodels test`` + the judge config); cached by its score key."""
        judge = self.p.judge
        cfg_text = Path(judge["config"]).read_text()
        step = _ckpt_step(ckpt)
        skey = digest(json.dumps([t.key, step, cfg_text, num_samples, judge["seed"], sampling], sort_keys=True,
                                 default=str))
        with self._locks_guard:
            lock = self._locks.setdefault(skey, threading.Lock())
        with lock:
            return self._score(t, ckpt, num_samples, sampling, name, skey, step)

    def _score(self, t: Training, ckpt: Path, num_samples: int, sampling: dict, name: str, skey: str,
               step: int) -> dict | None:
        judge = self.p.judge
        folder = t.dir / "scores"
        done = folder / f"{skey}.json"
        if done.is_file():
            return json.loads(done.read_text())
        folder.mkdir(parents=True, exist_ok=True)
        evaluator = {"num_samples": int(num_samples), "seed": int(judge["seed"]),
                     "results_file": str(folder / f"{skey}.jsonl"), "name": name, "progress": False,
                     "export_npz": True}    # the judged samples: the side-by-side grid shows the first of them
        if sampling:
            evaluator["sample_kwargs"] = sampling
        over = self._write_override(folder, f"{skey}.yaml",
                                    {"model": {"init_args": {"evaluator": {"init_args": evaluator}}},
                                     "trainer": {"logger": False, "callbacks": [],
                                                 "default_root_dir": str(folder / skey)}})
        (folder / f"{skey}.jsonl").unlink(missing_ok=True)
        args = ["test", "-c", str(self._materialise(t)), "-c", str(judge["config"]), "-c", str(over),
                "--ckpt_path", str(ckpt)]
        rc = self._launch(args, folder / f"{skey}.log")
        if rc != 0 or not (folder / f"{skey}.jsonl").is_file():
            say(f"{name}: scoring {ckpt.name} FAILED (see {folder / f'{skey}.log'})")
            return None
        from genmodels.evaluation.results import read_rows
        row = read_rows(folder / f"{skey}.jsonl")[-1]
        row["step"] = step
        _atomic_json(done, row)
        return row

    def score_row(self, row: Row) -> None:
        t = row.training
        if t.status != "done":
            return
        name, j = row.spec["name"], self.p.judge
        final = self.score(t, t.last_ckpt, j["num_samples"], row.sampling, name)
        if final is None:
            self.results[(name, row.seed)] = {"status": "failed", "reason": "scoring failed"}
            return
        curve = []
        if self.p.budget.get("curve_every"):
            for ck in sorted(t.dir.glob("checkpoints/step_*.ckpt")):
                if int(j["curve_num_samples"]) == int(j["num_samples"]) and _ckpt_step(ck) == final["step"]:
                    r = final
                else:
                    r = self.score(t, ck, j["curve_num_samples"], row.sampling, name)
                if r is not None:
                    curve.append({"step": r["step"], "fid": r.get("fid")})
        self.results[(name, row.seed)] = {"status": "done", "row": final, "curve": curve}

    def score_tokenizer(self, t: Training) -> float | None:
        if t.status != "done":
            return None
        r = self.score(t, t.last_ckpt, self.p.judge["num_samples"], {}, t.label)
        return None if r is None else r.get("fid")

    def run(self) -> int:
        """Train (or reuse) and score everything; returns the number of failed rows."""
        jobs = max(1, self.p.jobs)
        pool = cf.ThreadPoolExecutor(max_workers=jobs)
        try:
            toks = [t for t in self.tok_of.values() if t.status not in ("not built", "fixed")]
            for t in toks:  # tokenizers first: generators wait on them
                t.future = pool.submit(self.train, t)
            gens = {r.training.key: r.training for r in self.rows if r.training.status != "not built"}
            scored: list[cf.Future] = []

            def train_then_queue_scores(t: Training) -> bool:
                # a run's scoring is queued as soon as its training ends, so a free job never waits
                # for the slowest training (the queue is first in, first out)
                ok = self.train(t)
                scored.extend(pool.submit(self.score_row, r) for r in self.rows if r.training is t)
                return ok

            for t in gens.values():
                t.future = pool.submit(train_then_queue_scores, t)
            rfid = {t.key: pool.submit(self.score_tokenizer, t) for t in toks}
            for t in gens.values():
                t.future.result()
            for f in list(scored):      # complete: each training appended its scores before returning
                f.result()
            self.rfid = {k: f.result() for k, f in rfid.items()}
        finally:
            pool.shutdown(wait=True)
        return sum(1 for r in self.rows if self.results.get((r.spec["name"], r.seed), {}).get("status") != "done"
                   and r.training.status != "not built")

    # ------------------------------------------------------------------ extras: FLOPs, bits/dim, grid
    def flops_per_step(self, t: Training) -> float | None:
        """Training FLOPs of one step (generator forward + backward on one batch of tokens of the
        tokenizer's spec, counted by ``torch.utils.flop_counter.FlopCounterMode``; the frozen
        tokenizer's encode is not counted). Cached in the run folder."""
        cache = t.dir / "flops.json"
        if cache.is_file():
            return json.loads(cache.read_text())["flops_per_step"]
        from torch.utils.flop_counter import FlopCounterMode

        from genmodels.tokenizers import load_tokenizer
        from genmodels.utils.config import instantiate

        torch.manual_seed(0)
        gen = instantiate(_get(t.config, "model.init_args.generator")).train()
        tok = load_tokenizer(str(t.tokenizer.last_ckpt)) if t.tokenizer is not None else \
            instantiate(_get(t.config, "model.init_args.tokenizer"))
        if hasattr(gen, "bind_tokenizer"):
            gen.bind_tokenizer(tok)
        spec, bs = tok.spec, t.batch_size
        L = sum(math.prod(s) for s in spec.shapes)
        if spec.kind == "pixels":    # pixel space: the tokenizer's own encoding of random images
            with torch.no_grad():
                tokens = tok.encode(torch.rand(bs, 3, spec.image_size, spec.image_size) * 2 - 1)
        else:
            tokens = (torch.randint(0, spec.vocab_size, (bs, L)) if spec.kind == "discrete"
                      else torch.randn(bs, L, spec.channels))
        labels = torch.randint(0, gen.num_classes, (bs,))
        counts = []
        for _ in range(3):  # masking ratios are random: the mean of three steps
            with FlopCounterMode(display=False) as fc:
                gen.forward_loss(tokens, labels)["loss"].backward()
            counts.append(fc.get_total_flops())
        flops = float(sum(counts) / len(counts))
        _atomic_json(cache, {"flops_per_step": flops, "batch_size": bs,
                             "counted": "generator forward+backward, FlopCounterMode, mean of 3 steps"})
        return flops

    def bits_per_dim(self, t: Training) -> float | None:
        """Exact NLL on the validation split (bits per token, the Generator.nll contract) where
        the generator has a likelihood; None otherwise. Cached in the run folder."""
        cache = t.dir / "nll.json"
        if cache.is_file():
            return json.loads(cache.read_text())["bits_per_dim"]
        from genmodels.generators.base import Generator
        from genmodels.utils.config import import_class, instantiate

        cls = import_class(_get(t.config, "model.init_args.generator.class_path"))
        if cls.nll is Generator.nll:
            return None
        pipe = load_pipeline(t.last_ckpt)
        dm = instantiate(_get(t.config, "data"))
        dm.setup("validate")
        total, n = 0.0, 0
        with torch.no_grad():
            for batch in dm.val_dataloader():
                images, labels = batch[0], batch[1]
                nll = pipe.generator.nll(pipe.tokenizer.encode(images), labels.long())
                # (B,) per image, or a scalar batch mean (FractalGen: bits per sub-pixel, unconditional)
                total, n = total + float(nll.sum() if nll.ndim else nll * len(labels)), n + len(labels)
        bpd = total / max(1, n)
        _atomic_json(cache, {"bits_per_dim": bpd, "split": "val", "images": n})
        return bpd

    def test_loss(self, t: Training) -> float | None:
        """Mean training loss (``forward_loss``) of the final weights on the test split, seeded
        (``judge.test_loss: true``; VAR's scaling law plots it against parameters). Cached."""
        if not self.p.judge.get("test_loss") or t.status != "done":
            return None
        cache = t.dir / "test_loss.json"
        if cache.is_file():
            return json.loads(cache.read_text())["test_loss"]
        from genmodels.utils.config import instantiate

        pipe = load_pipeline(t.last_ckpt)
        dm = instantiate(_get(t.config, "data"))
        dm.setup("test")
        torch.manual_seed(0)
        total, n = 0.0, 0
        with torch.no_grad():
            for batch in dm.test_dataloader():
                tokens = pipe.tokenizer.encode(batch[0])
                loss = pipe.generator.forward_loss(tokens, batch[1].long())["loss"]
                total, n = total + float(loss) * len(tokens), n + len(tokens)
        value = total / max(1, n)
        _atomic_json(cache, {"test_loss": value, "split": "test", "images": n})
        return value

    def grid_images(self, row: Row) -> torch.Tensor | None:
        g = self.p.grid
        classes, per = list(g.get("classes", range(10))), int(g.get("per_class", 1))
        t = row.training
        if t.status != "done":
            return None
        judged = self.judged_grid(row, classes, per)
        if judged is not None:
            return judged
        cache = t.dir / f"grid-{digest(json.dumps([classes, per, g.get('seed', 0), row.sampling], default=str))}.pt"
        if cache.is_file():
            return torch.load(cache, weights_only=True)
        images = sample_grid(load_pipeline(t.last_ckpt), classes, per, int(g.get("seed", 0)), **row.sampling)
        torch.save(images, cache)
        return images

    def judged_grid(self, row: Row, classes: list[int], per: int) -> torch.Tensor | None:
        """The first ``per`` judged samples of each class (the final score's ADM .npz), float
        (len(classes) * per, 3, H, W) in [-1, 1], class-major; None when the grid asks for other
        samples than the judge drew (another seed, more per class) or the npz is missing, in which
        case the grid samples anew. Saves sampling every row twice (a DiffLoss AR row at grid
        batch sizes costs minutes)."""
        final = (self.results.get((row.spec["name"], row.seed)) or {}).get("row") or {}
        path = final.get("samples_npz")
        if not path or not Path(path).is_file() or int(self.p.grid.get("seed", 0)) != int(self.p.judge["seed"]):
            return None
        from genmodels.evaluation.adm_export import read_adm_npz_all

        images, _, labels = read_adm_npz_all(path)
        if labels is None:
            return None
        picked = []
        for c in classes:
            idx = np.flatnonzero(labels == c)[:per]     # judge order keeps each class's sample order
            if len(idx) < per:
                return None
            picked.append(images[idx])
        x = torch.from_numpy(np.concatenate(picked)).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0

    # ------------------------------------------------------------------ aggregation and outputs
    def table_rows(self) -> list[dict]:
        """One dict per run (seeds aggregated): the columns of table.md / table.csv."""
        out = []
        for spec in self.p.runs:
            rows = [r for r in self.rows if r.spec["name"] == spec["name"]]
            t0 = rows[0].training
            tok = t0.tokenizer if t0.tokenizer is not None else self.tok_of.get(spec.get("tokenizer"))
            rec: dict[str, Any] = {"name": spec["name"], "paradigm": spec.get("paradigm", ""),
                                   "tokenizer": spec.get("tokenizer") or "", "seeds": len(rows)}
            if t0.status == "not built":
                rec["status"] = f"not built ({t0.reason})"
                out.append(rec)
                continue
            per_seed = [self.results.get((spec["name"], r.seed), {}) for r in rows]
            ok = [x for x in per_seed if x.get("status") == "done"]
            if len(ok) < len(rows):
                reasons = {r.training.reason for r in rows if r.training.reason} or {"scoring failed"}
                rec["status"] = "failed: " + "; ".join(sorted(reasons))
            else:
                rec["status"] = "ok"
            rec["params_generator"] = t0.params
            first = ok[0]["row"] if ok else {}
            rec["params_tokenizer"] = first.get("params_tokenizer")
            rec["steps"], rec["images_seen"] = t0.steps, t0.images_seen
            fps = self.flops_per_step(t0) if t0.status == "done" else None
            rec["train_flops"] = None if fps is None else fps * t0.steps
            secs = [(r.training.done() or {}).get("train_seconds") for r in rows]
            rec["train_seconds"] = mean_std([s for s in secs if s is not None])
            rec["sampling"] = first.get("sampling", rows[0].sampling)
            for m in ("fid", "is", "precision", "recall", "sec_per_image"):
                rec[m] = mean_std([x["row"].get(m) for x in ok if x["row"].get(m) is not None])
            bpd = [self.bits_per_dim(r.training) for r in rows if r.training.status == "done"]
            rec["bits_per_dim"] = mean_std([b for b in bpd if b is not None])
            rec["test_loss"] = mean_std([self.test_loss(r.training) for r in rows])
            if tok is not None and tok.status == "fixed":   # the identity: reconstruction is exact, rFID 0
                rec["tokenizer"], rec["tokenizer_rfid"] = f"{rec['tokenizer']} (identity)", 0.0
            else:
                rec["tokenizer_rfid"] = self.rfid.get(tok.key) if tok is not None and hasattr(self, "rfid") else None
            rec["curves"] = [x.get("curve", []) for x in ok]
            rec["flops_per_step"] = fps
            out.append(rec)
        mark_within_spread(out, ("fid", "is", "precision", "recall"))
        return out

    def write_outputs(self, recs: list[dict]) -> dict[str, Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        paths = {"table.md": self.out / "table.md", "table.csv": self.out / "table.csv"}
        paths["table.md"].write_text(markdown_table(recs, self.p) + "\n")
        write_table_csv(recs, paths["table.csv"], self.p.paper)
        paths["grid.png"] = self.write_grid(recs)
        paths.update(write_plots(recs, self.out))
        return paths

    def write_grid(self, recs: list[dict]) -> Path:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        g = self.p.grid
        classes, per = list(g.get("classes", range(10))), int(g.get("per_class", 1))
        n_rows = len(self.p.runs)
        fig, axes = plt.subplots(n_rows, 1, figsize=(0.45 * len(classes) * per + 2.2, 0.55 * per * n_rows + 0.6),
                                 squeeze=False)
        for ax, spec in zip(axes[:, 0], self.p.runs):
            rec = next(r for r in recs if r["name"] == spec["name"])
            row = next(r for r in self.rows if r.spec["name"] == spec["name"])  # the first seed
            images = self.grid_images(row) if rec["status"] == "ok" else None
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(spec["name"], rotation=0, ha="right", va="center", fontsize=8)
            if images is None:
                ax.imshow(torch.full((per * 32, len(classes) * 32), 0.85).numpy(), cmap="gray", vmin=0, vmax=1)
                ax.text(len(classes) * 16, per * 16, textwrap.fill(rec["status"][:160], 70), ha="center", va="center",
                        fontsize=6)
                continue
            # (C*per, 3, H, W), class-major -> a (per*H, C*W) mosaic: column c holds class c
            x = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
            H, W = x.shape[1:3]
            x = x.reshape(len(classes), per, H, W, 3).permute(1, 2, 0, 3, 4).reshape(per * H, len(classes) * W, 3)
            ax.imshow(x.numpy(), interpolation="nearest")
        axes[0, 0].set_title("classes " + " ".join(map(str, classes)), fontsize=8)
        fig.tight_layout()
        path = self.out / "grid.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in str(s)).strip("-").lower() or "run"


def _error_line(log: Path) -> str:
    """The CLI's one-line error from a log, if any (``: genmodels: error: ...``)."""
    if not log.is_file():
        return ""
    errs = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("genmodels: error:")]
    return f": {errs[-1][len('genmodels: error: '):][:200]}" if errs else ""


def _ckpt_step(path: Path) -> int:
    if not Path(path).is_file():
        return 0
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))
    except Exception:  # noqa: BLE001 -- a torn file counts as no checkpoint
        return 0


# =========================================================================== aggregation
def mean_std(values: list[float]) -> dict | None:
    """``{"mean", "std", "n"}`` of the per-seed values (sample std, ddof=1; None for one seed)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"mean": m, "std": s, "n": len(vals)}


BETTER = {"fid": min, "is": max, "precision": max, "recall": max}


def mark_within_spread(recs: list[dict], metrics: tuple[str, ...]) -> None:
    """For each metric, mark rows whose mean lies within the seed spread of the best row's:
    |mean - best| < sqrt(std^2 + std_best^2). Sets ``rec["within_spread"] = [metric, ...]``
    (the best row itself is not marked). Needs std, i.e. >= 2 seeds."""
    for rec in recs:
        rec.setdefault("within_spread", [])
    for m in metrics:
        have = [r for r in recs if isinstance(r.get(m), dict) and r[m].get("std") is not None]
        if len(have) < 2:
            continue
        best = BETTER[m](have, key=lambda r: r[m]["mean"])
        for r in have:
            if r is best:
                continue
            spread = math.sqrt(r[m]["std"] ** 2 + best[m]["std"] ** 2)
            if abs(r[m]["mean"] - best[m]["mean"]) < spread:
                r["within_spread"].append(m)


def fmt_ms(v: Any, digits: int = 2, mark: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, dict):
        s = f"{v['mean']:.{digits}f}" if abs(v["mean"]) >= 10 ** -digits or v["mean"] == 0 else f"{v['mean']:.2e}"
        if v.get("std") is not None:
            s += f" ± {v['std']:.{digits}f}" if abs(v["std"]) >= 10 ** -digits else f" ± {v['std']:.1e}"
        return s + (" ~" if mark else "")
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _count(n: Any) -> str:
    if not n:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def _flops(f: Any) -> str:
    return "–" if not f else f"{f:.2e}"


def _knobs(s: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((s or {}).items())) or "–"


COLUMNS = ["name", "paradigm", "tokenizer", "params_generator", "params_tokenizer", "steps", "images_seen",
           "train_flops", "train_seconds", "sampling", "sec_per_image", "fid", "is", "precision", "recall",
           "bits_per_dim", "test_loss", "tokenizer_rfid", "seeds", "status"]
HEADERS = ["run", "paradigm", "tokenizer", "gen params", "tok params", "steps", "images seen", "train FLOPs",
           "train time", "sampling", "s/img", "FID ↓", "IS ↑", "precision ↑", "recall ↑", "bits/dim ↓",
           "test loss ↓", "tok rFID ↓", "seeds", "status"]


def _cells(rec: dict, paper: dict | None) -> list[str]:
    ws = rec.get("within_spread", [])
    t = rec.get("train_seconds")
    cells = [rec["name"], rec.get("paradigm", ""), rec.get("tokenizer", ""), _count(rec.get("params_generator")),
             _count(rec.get("params_tokenizer")), str(rec.get("steps", "–")),
             f"{rec['images_seen']:,}" if rec.get("images_seen") else "–", _flops(rec.get("train_flops")),
             _hms(t["mean"]) if t else "–", _knobs(rec.get("sampling")), fmt_ms(rec.get("sec_per_image"), 4),
             fmt_ms(rec.get("fid"), 2, "fid" in ws), fmt_ms(rec.get("is"), 2, "is" in ws),
             fmt_ms(rec.get("precision"), 3, "precision" in ws), fmt_ms(rec.get("recall"), 3, "recall" in ws),
             fmt_ms(rec.get("bits_per_dim"), 3), fmt_ms(rec.get("test_loss"), 4), fmt_ms(rec.get("tokenizer_rfid"), 2), str(rec.get("seeds", "")),
             rec.get("status", "")]
    if paper:
        prow = (paper.get("rows") or {}).get(rec["name"], {})
        cells += [fmt_ms(prow.get(m)) if not isinstance(prow.get(m), str) else prow[m]
                  for m in (paper.get("columns") or {})]
    return cells


def markdown_table(recs: list[dict], preset: Preset) -> str:
    paper = preset.paper
    b, j = preset.budget, preset.judge
    headers = HEADERS + ([f"paper: {h}" for h in (paper.get("columns") or {}).values()] if paper else [])
    lines = [f"# genmodels compare: {preset.name}", ""]
    if preset.description:
        lines += [preset.description.strip(), ""]
    lines += [f"Budget: generator parameters {b['target_params']:,} ± {float(b['tolerance']):.0%} (per-run targets "
              f"where stated), {b['steps']} steps x batch {b['batch_size']} = {int(b['steps']) * int(b['batch_size']):,} "
              f"images seen, {b['optimizer']} with a {b['lr_schedule']} schedule. Judge: `{j['config']}`, "
              f"N = {j['num_samples']} (curve points N = {j['curve_num_samples']}). Seeds per run: "
              f"{preset.num_seeds} (mean ± std; `~` = within the seed spread of the best row). Train FLOPs: generator "
              "forward + backward counted with torch.utils.flop_counter on one step x steps. bits/dim: exact NLL on "
              "the validation split, bits per token, where the model has a likelihood. tok rFID: the tokenizer's "
              "reconstruction FID with the same judge.", "",
              "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cells(r, paper)) + " |" for r in recs]
    fit = loss_params_fit(recs)
    if fit is not None:
        lines += ["", f"Log-log fit of test loss against generator parameters N ({fit['points']} runs): "
                      f"L = {fit['a']:.4g} x N^{fit['b']:.4f} (loss_vs_params.png)."]
    if paper:
        lines += ["", f"Paper numbers: {paper.get('source', '')}" + (f" -- {paper['note']}" if paper.get("note") else "")]
    return "\n".join(lines)


def summary_table(recs: list[dict]) -> str:
    """The terminal summary: a few columns, aligned."""
    head = ["run", "tokenizer", "gen params", "train time", "s/img", "FID", "IS", "prec", "recall", "status"]
    body = [[r["name"], r.get("tokenizer", ""), _count(r.get("params_generator")),
             _hms(r["train_seconds"]["mean"]) if r.get("train_seconds") else "–", fmt_ms(r.get("sec_per_image"), 4),
             fmt_ms(r.get("fid")), fmt_ms(r.get("is")), fmt_ms(r.get("precision"), 3), fmt_ms(r.get("recall"), 3),
             r.get("status", "")[:50]] for r in recs]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *body])


def write_table_csv(recs: list[dict], path: Path, paper: dict | None = None) -> Path:
    metric_cols = {"sec_per_image", "fid", "is", "precision", "recall", "bits_per_dim", "test_loss", "train_seconds"}
    header = []
    for c in COLUMNS:
        header += [c, f"{c}_std"] if c in metric_cols else [c]
    paper_cols = list((paper or {}).get("columns") or {})
    header += [f"paper_{m}" for m in paper_cols] + ["within_spread"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in recs:
            out = []
            for c in COLUMNS:
                v = r.get(c)
                if c in metric_cols:
                    out += [None if v is None else v["mean"], None if v is None else v["std"]]
                elif c == "sampling":
                    out.append(json.dumps(v, sort_keys=True) if v else "")
                else:
                    out.append(v)
            prow = ((paper or {}).get("rows") or {}).get(r["name"], {})
            out += [prow.get(m) for m in paper_cols] + [";".join(r.get("within_spread", []))]
            w.writerow(["" if v is None else v for v in out])
    return path


def write_plots(recs: list[dict], out: Path) -> dict[str, Path]:
    """FID against s/img, and FID against training FLOPs along the scored checkpoints (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in recs:
        if r.get("fid") and r.get("sec_per_image"):
            x, y = r["sec_per_image"], r["fid"]
            ax.errorbar(x["mean"], y["mean"], xerr=x.get("std"), yerr=y.get("std"), fmt="o", capsize=3)
            ax.annotate(r["name"], (x["mean"], y["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("sampling seconds per image (log)")
    ax.set_ylabel("FID ↓")
    ax.set_title("FID against sampling time", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths["fid_vs_speed.png"] = out / "fid_vs_speed.png"
    fig.savefig(paths["fid_vs_speed.png"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in recs:
        fps = r.get("flops_per_step")
        pts: dict[int, list[float]] = {}
        for curve in r.get("curves") or []:
            for p in curve:
                if p.get("fid") is not None:
                    pts.setdefault(p["step"], []).append(p["fid"])
        if fps and pts:
            steps = sorted(pts)
            ax.plot([s * fps for s in steps], [sum(pts[s]) / len(pts[s]) for s in steps], marker="o", label=r["name"])
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (generator, counted) (log)")
    ax.set_ylabel("FID ↓ (curve N)")
    ax.set_title("Quality against training compute", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths["fid_vs_compute.png"] = out / "fid_vs_compute.png"
    fig.savefig(paths["fid_vs_compute.png"], dpi=110)
    plt.close(fig)

    fit = loss_params_fit(recs)
    if fit is not None:
        pts = [(r["params_generator"], r["test_loss"]["mean"]) for r in recs if r.get("test_loss") and r.get("params_generator")]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ax.loglog([p for p, _ in pts], [v for _, v in pts], "o")
        xs = [min(p for p, _ in pts), max(p for p, _ in pts)]
        ax.loglog(xs, [fit["a"] * x ** fit["b"] for x in xs], "--", label=f"L = {fit['a']:.3g} N^{fit['b']:.3f}")
        for r in recs:
            if r.get("test_loss") and r.get("params_generator"):
                ax.annotate(r["name"], (r["params_generator"], r["test_loss"]["mean"]), textcoords="offset points",
                            xytext=(5, 4), fontsize=8)
        ax.set_xlabel("generator parameters (log)")
        ax.set_ylabel("test loss (log)")
        ax.set_title("Test loss against parameters (log-log fit)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        paths["loss_vs_params.png"] = out / "loss_vs_params.png"
        fig.savefig(paths["loss_vs_params.png"], dpi=110)
        plt.close(fig)
    return paths


def loss_params_fit(recs: list[dict]) -> dict | None:
    """Least-squares line through (log10 N, log10 test loss): ``L = a N^b``; None below 2 points."""
    pts = [(math.log10(r["params_generator"]), math.log10(r["test_loss"]["mean"])) for r in recs
           if r.get("test_loss") and r.get("params_generator") and r["test_loss"]["mean"] > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return {"a": 10 ** (my - b * mx), "b": b, "points": len(pts)}


# =========================================================================== entry points
def compare(preset_path: str | Path, seeds: int | None = None, output_dir: str | None = None,
            launcher: str | None = None, jobs: int | None = None, check_only: bool = False,
            resolver: Resolver | None = None) -> dict[str, Any]:
    """Plan, check the budget, train, score and report one preset. Returns
    ``{"rows": table rows, "paths": written files, "budget": per-run budget report, "failed": n}``."""
    preset = Preset(preset_path, seeds=seeds, output_dir=output_dir, launcher=launcher, jobs=jobs)
    c = Compare(preset, resolver)
    c.plan()
    budget = c.check_budget()
    for b in budget:
        say(f"budget ok: {b['run']}: {b['params']:,} params (target {b['target']:,}), {b['images_seen']:,} images")
    if check_only:
        for r in c.rows:
            t = r.training
            state = ("not built: " + t.reason if t.status == "not built" else "trained" if t.done()
                     else "interrupted (resumes from last.ckpt)" if t.last_ckpt.is_file() else "to train")
            say(f"plan: {r.spec['name']} (seed {r.seed}){' ' + t.key if t.key else ''}: {state}")
        return {"rows": [], "paths": {}, "budget": budget, "failed": 0, "compare": c}
    t0 = time.perf_counter()
    failed = c.run()
    recs = c.table_rows()
    paths = c.write_outputs(recs)
    say(f"finished in {_hms(time.perf_counter() - t0)}")
    print(summary_table(recs), flush=True)
    for k, v in paths.items():
        say(f"wrote {v}")
    return {"rows": recs, "paths": paths, "budget": budget, "failed": failed, "compare": c}


def main(argv: list[str]) -> int:
    """``genmodels compare -c PRESET [--seeds N] [--output_dir DIR] [--jobs N] [--launcher L] [--check]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="genmodels compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", required=True, help="a compare preset, e.g. configs/compare/digits_quick.yaml")
    ap.add_argument("--seeds", type=int, default=None, help="repeat each generator training with N seeds")
    ap.add_argument("--output_dir", default=None, help="override the preset's output_dir")
    ap.add_argument("--jobs", type=int, default=None, help="trainings / scorings at once (subprocess launcher)")
    ap.add_argument("--launcher", choices=["subprocess", "inprocess"], default=None)
    ap.add_argument("--check", action="store_true", help="resolve configs and check the budget only")
    args = ap.parse_args(argv)
    import signal
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop_children)
    out = compare(args.config, seeds=args.seeds, output_dir=args.output_dir, launcher=args.launcher, jobs=args.jobs,
                  check_only=args.check)
    return 1 if out["failed"] else 0
