"""configs/trainer/fsdp.yaml on CPU: 2 processes (gloo) train VAR (the d30 composition, shrunk) with the
preset's wrapping, activation checkpointing and sharded checkpoints; the sharded checkpoint resumes and,
consolidated, is an ordinary checkpoint that loads strictly without FSDP.

Lightning 2.6.6 refuses FSDPStrategy without a CUDA accelerator and torch 2.13's FSDP refuses a module
on CPU when no accelerator exists; ``CPUFSDPStrategy`` below lifts both (test-only): the subclass is not
``FSDPStrategy`` itself (Lightning's check) and it gives FSDP ``device_id=cpu``. Everything else is the
preset as shipped.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.strategies import FSDPStrategy

from test_recipes import C, _fake_imagenet, _save_tokenizer, _write

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


class CPUFSDPStrategy(FSDPStrategy):
    """FSDPStrategy on CPU processes (gloo), for tests only."""

    def _setup_model(self, model):
        import torch.distributed.fsdp.fully_sharded_data_parallel as fsdp
        init = fsdp._init_device_handle

        def on_cpu(state, module, ignored, device_id):
            return init(state, module, ignored, device_id if device_id is not None else torch.device("cpu"))

        fsdp._init_device_handle = on_cpu
        try:
            return super()._setup_model(model)
        finally:
            fsdp._init_device_handle = init


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    r = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def test_fsdp_preset_trains_resumes_from_shards_and_consolidates(tmp_path):
    train, val = _fake_imagenet(tmp_path / "imagenet", per_class=4, num_classes=2)
    tok = _save_tokenizer(tmp_path / "msvq.ckpt", "tokenizers/var_vqvae.yaml", vocab_size=32, z_channels=8, ch=32,
                          ch_mult=[1, 2], num_res_blocks=1, using_sa=False, using_mid_sa=False,
                          v_patch_nums=[1, 2, 4], share_quant_resi=2)
    preset = yaml.safe_load((C / "trainer/fsdp.yaml").read_text())
    preset["trainer"].update(accelerator="cpu", devices=2, num_nodes=1, precision="32-true")
    preset["trainer"]["strategy"]["class_path"] = "test_ddp_fsdp.CPUFSDPStrategy"
    preset["trainer"]["strategy"]["init_args"]["process_group_backend"] = "gloo"
    ckpts = tmp_path / "ckpts"
    over = {
        "data": {"init_args": {"train_dir": str(train), "val_dir": str(val), "num_classes": 2, "image_size": 8,
                               "batch_size": 2, "num_workers": 0, "pin_memory": False}},
        "model": {"init_args": {"tokenizer_ckpt": str(tok), "warmup_steps": 0, "generator": {"init_args": {
            "vocab_size": 32, "Cvae": 8, "patch_nums": [1, 2, 4], "num_classes": 2, "depth": 2, "embed_dim": 32,
            "num_heads": 2}}}},
        "trainer": {"max_steps": 2, "limit_val_batches": 0, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path), "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": str(ckpts), "save_last": True, "save_top_k": 0,
                                       "every_n_train_steps": 2}}]},
    }
    files = [C / "data/imagenet256_var.yaml", C / "generators/var_d30.yaml", C / "experiments/imagenet256_var_d30.yaml"]
    args = [a for f in files for a in ("-c", str(f))] + ["-c", _write(tmp_path / "fsdp.yaml", preset),
                                                         "-c", _write(tmp_path / "over.yaml", over)]
    _cli("-m", "genmodels.cli", "fit", *args)
    last = ckpts / "last.ckpt"
    assert last.is_dir() and {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in last.iterdir()}

    _cli("-m", "genmodels.cli", "fit", *args, "--trainer.max_steps", "4", "--ckpt_path", str(last))
    _cli("-m", "lightning.pytorch.utilities.consolidate_checkpoint", str(last))
    full = torch.load(str(last) + ".consolidated", map_location="cpu", weights_only=True)
    assert full["global_step"] == 4  # the resumed run went on from step 2
    assert {"generator", "tokenizer"} <= set(full["genmodels"])  # the tokenizer's weights stay in the shards

    from genmodels.training import GeneratorModule
    from genmodels.utils.config import instantiate
    gen = instantiate(full["genmodels"]["generator"])
    module = GeneratorModule(generator=gen, tokenizer_ckpt=str(tok), ema_decay=None)
    module.load_state_dict(full["state_dict"], strict=True)
    tokens = gen.sample(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 1 + 4 + 16)
    # the consolidated file is an ordinary checkpoint: genmodels.load reads it without the tokenizer file
    import genmodels
    Path(tok).unlink()
    pipe = genmodels.load(str(last) + ".consolidated", ema=False)
    images = pipe.sample(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 8, 8) and images.abs().max() <= 1
