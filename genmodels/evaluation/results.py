"""Results rows: one JSON object per evaluation, appended to a ``.jsonl`` file; a ``.csv``
with fixed columns beside it is rewritten from all rows each time (so it never has
mismatched headers). ``benchmarks/make_tables.py`` turns rows into tables and a plot.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from torch import nn

# CSV columns, in order (nested values -> JSON strings, lists -> ';'-joined).
CSV_COLUMNS = [
    "name", "kind", "model", "tokenizer", "params_generator", "params_tokenizer", "sampling", "num_samples",
    "feature_extractor", "reference", "num_reference", "fid", "sfid", "is", "is_std", "precision", "recall",
    "bits_per_dim", "comparable_with_papers", "not_comparable", "is_rule", "pr_arithmetic", "nhood_size", "sec_per_image",
    "batch_size", "device", "world_size", "seed", "dataset", "official", "time", "ckpt_path", "config_files",
]


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def read_rows(paths: list[str | Path] | str | Path) -> list[dict[str, Any]]:
    """All rows of one or more ``.jsonl`` files (blank lines skipped; a bad line is an error
    naming file and line)."""
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    rows = []
    for path in paths:
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON results row ({e})") from e
    return rows


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in CSV_COLUMNS])
    return path


def append_results_row(row: dict[str, Any], path: str | Path) -> Path:
    """Append ``row`` to ``path`` (``.jsonl``) and rewrite ``path.with_suffix('.csv')``."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise GenmodelsError(f"results_file must end in .jsonl, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    write_csv(read_rows(path), path.with_suffix(".csv"))
    return path


def count_params(module: Any) -> int | None:
    return sum(p.numel() for p in module.parameters()) if isinstance(module, nn.Module) else None


def name_from_configs(config_files: list[str]) -> str | None:
    """Stem of the last config file that is not a data or evaluation config (the experiment)."""
    def is_aux(f: str) -> bool:
        p = Path(f)
        return bool({"data", "evaluation", "eval"} & set(p.parts[:-1])) or "eval" in p.stem
    picks = [f for f in config_files if not is_aux(f)] or config_files
    return Path(picks[-1]).stem if picks else None


def model_metadata(generator: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """The model fields of a row: class names, parameter counts, configs."""
    return {"model": type(generator).__name__ if generator is not None else None,
            "tokenizer": type(tokenizer).__name__ if tokenizer is not None else None,
            "params_generator": count_params(generator), "params_tokenizer": count_params(tokenizer),
            "generator_config": getattr(generator, "config", None), "tokenizer_config": getattr(tokenizer, "config", None)}
