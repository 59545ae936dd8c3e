"""Multi-process training and evaluation through the CLI (DDP, 2 CPU processes, gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_cli import GENERATOR, TOKENIZER, _data, _trainer, _write

pytestmark = pytest.mark.slow


def _cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    r = subprocess.run([sys.executable, "-m", "genmodels.cli", *args], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]


def test_ddp_fit_then_test(tmp_path):
    ddp = {"strategy": "ddp", "devices": 2, "max_epochs": 1}
    tok_root = tmp_path / "tok"
    _cli("fit", "-c", str(_write(tmp_path / "tok.yaml", TOKENIZER, _data(), _trainer(tok_root, **ddp))))
    tok_ckpt = next(tok_root.glob("lightning_logs/version_0/checkpoints/*.ckpt"))

    gen = {"model": {**GENERATOR["model"], "init_args": {**GENERATOR["model"]["init_args"],
                                                         "tokenizer_ckpt": str(tok_ckpt)}}}
    root = tmp_path / "gen"
    cfg = _write(tmp_path / "gen.yaml", gen, _data(), _trainer(root, **ddp))
    _cli("fit", "-c", str(cfg))
    ckpt = next(root.glob("lightning_logs/version_0/checkpoints/*.ckpt"))
    assert list(root.glob("lightning_logs/version_0/samples/*.png"))

    ev = tmp_path / "eval.yaml"
    ev.write_text(
        "model:\n  init_args:\n    evaluator:\n      class_path: genmodels.evaluation.Evaluator\n"
        f"      init_args: {{num_samples: 40, batch_size: 10, reference: test, cache_dir: {tmp_path / 'cache'},"
        f" results_file: {tmp_path / 'rows.jsonl'}}}\n")
    _cli("test", "-c", str(cfg), "-c", str(ev), "--ckpt_path", str(ckpt))
    rows = [json.loads(line) for line in open(tmp_path / "rows.jsonl")]
    assert len(rows) == 1 and rows[0]["world_size"] == 2 and rows[0]["num_samples"] == 40
    assert rows[0]["fid"] > 0 and 0 <= rows[0]["precision"] <= 1
