"""Results rows: one JSON object per evaluation, appended to a ``.jsonl`` file; a ``.csv``
with fixed columns beside it is rewritten from all rows each time (so it never has
mismatched headers). ``benchmarks/make_tables.py`` turns rows into tables and a plot.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from genmodels.errors import GenmodelsError

# CSV columns, in order (nested values -> JSON strings, lists -> ';'-joined).
CSV_COLUMNS = [
    "name", "kind", "model", "tokenizer", "params_generator", "params_tokenizer", "sampling", "num_samples",
    "feature_extractor", "reference", "num_reference", "fid", "is", "is_std", "precision", "recall",
    "sec_per_image", "batch_size", "device", "world_size", "seed", "dataset", "official", "time", "ckpt_path",
    "config_files",
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
