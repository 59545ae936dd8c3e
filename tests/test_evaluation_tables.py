"""benchmarks/make_tables.py: results rows -> markdown table, CSV, FID-vs-speed PNG (matplotlib)."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

from genmodels.evaluation import append_results_row
from genmodels.evaluation.results import CSV_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def load_make_tables():
    spec = importlib.util.spec_from_file_location("make_tables", ROOT / "benchmarks" / "make_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row(name, model, fid, spi, time="2026-01-01T00:00:00", **kw):
    base = {"name": name, "kind": "generation", "model": model, "tokenizer": "VQVAE", "params_generator": 1_234_567,
            "params_tokenizer": 45_000, "sampling": {"cfg": 2.0, "num_steps": 8}, "num_samples": 1000,
            "feature_extractor": "digits-classifier-x", "dataset": "digits-32", "reference": "digits-32:train[:1437]",
            "num_reference": 1437, "fid": fid, "is": 9.1, "is_std": 0.1, "precision": 0.8, "recall": 0.7,
            "sec_per_image": spi, "device": "cpu", "time": time, "config_files": ["a.yaml", "b.yaml"]}
    base.update(kw)
    return base


def test_make_tables_markdown_csv_and_plot(tmp_path):
    res = tmp_path / "rows.jsonl"
    append_results_row(row("digits_maskgit", "MaskGIT", 12.5, 0.004), res)
    append_results_row(row("digits_ar", "CausalAR", 30.0, 0.02), res)
    append_results_row(row("digits_ar", "CausalAR", 8.0, 0.03, time="2026-02-01T00:00:00"), res)  # newer wins
    append_results_row(row("in256", "VAR", 3.3, 0.1, dataset="imagenet-256", feature_extractor="inception-v3-compat",
                           official=True), res)
    # the CSV beside the jsonl has the fixed columns and every row
    with res.with_suffix(".csv").open() as f:
        got = list(csv.reader(f))
    assert got[0] == CSV_COLUMNS and len(got) == 5 and "a.yaml;b.yaml" in got[1]

    written = load_make_tables().main([str(res), "--out_dir", str(tmp_path / "out")])
    names = sorted(p.name for p in written)
    assert names == ["fid_vs_speed_digits-32-digits-classifier-x.png", "fid_vs_speed_imagenet-256-inception-v3-compat.png",
                     "table.csv", "table.md"]
    md = (tmp_path / "out" / "table.md").read_text()
    assert "## digits-32 | digits-classifier-x | generation" in md and "## imagenet-256" in md
    digits = md.split("## imagenet-256")[0]
    assert digits.index("digits_ar") < digits.index("digits_maskgit")  # sorted by FID: 8.0 before 12.5
    assert "30.00" not in md and "8.00" in md and "1.2M / 45k" in md and "| num_steps=8 |" in md
    # one guidance column in the genmodels convention, the paper's spelling beside it
    assert "| 2 linear | guidance_scale=1 (linear) |" in md and "| 2 constant | – |" in md
    assert "⚠ unconverted VAR cfg=2.0" in md  # a VAR row without guidance_schedule is never mixed in silently
    assert "fewer than 50,000" in md
    png = (tmp_path / "out" / "fid_vs_speed_digits-32-digits-classifier-x.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    table = list(csv.reader((tmp_path / "out" / "table.csv").open()))
    assert len(table) == 4 and {"guidance_w", "guidance_schedule", "paper_knobs"} <= set(table[0])
    json.loads(res.read_text().splitlines()[0])


def test_guidance_column_converts_paper_knobs():
    g = load_make_tables().guidance
    var = row("v", "VAR", 1.0, 0.1, sampling={"cfg": 2.5, "guidance_schedule": "linear", "top_p": 0.96})
    assert g(var) == {"w": 2.5, "schedule": "linear", "text": "2.5 linear", "paper": "cfg=1.5"}
    assert g(row("t", "MaskGIT", 1.0, 0.1, sampling={"cfg": 3.0, "guidance_schedule": "power-cosine"}))["paper"] \
        == "guidance_scale=3 (power-cosine)"
    assert g(row("m", "MAR", 1.0, 0.1, sampling={"cfg": 1.0}))["text"] == "1 (off)"
    assert g(row("old", "VAR", 1.0, 0.1, sampling={"cfg": 1.5}))["w"] is None
