"""The ImageNet recipes as shipped: every composition (data + tokenizer/generator + experiment + trainer
preset) parses, states a global batch that its layout gives and the learning rate its scaling rule
gives; EVERY experiment file runs ``--trainer.fast_dev_run`` through its exact composition on a tiny fake
ImageNet folder (written here) with only the sizes shrunk (and the GPU trainer settings swapped for one CPU
process); VAR trains with progressive training (pg > 0) through ``genmodels fit``; VAR's learning-rate and
weight-decay schedule equals the official ``lr_wd_annealing`` at recorded iterations."""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback
from PIL import Image

from genmodels.cli import main

ROOT = Path(__file__).parents[1]
C = ROOT / "configs"

pytestmark = pytest.mark.usefixtures("one_thread")

# experiment -> (data, model, intended trainer preset); the README commands use these
RECIPES = {
    "imagenet256_var_d16": ("imagenet256_var", "generators/var_d16", "ddp_multinode"),
    "imagenet256_var_d20": ("imagenet256_var", "generators/var_d20", "ddp_multinode"),
    "imagenet256_var_d24": ("imagenet256_var", "generators/var_d24", "ddp_multinode"),
    "imagenet256_var_d30": ("imagenet256_var", "generators/var_d30", "fsdp"),
    "imagenet256_mar_base": ("imagenet256_kl16_latents", "generators/mar_base", "ddp_multinode"),
    "imagenet256_mar_large": ("imagenet256_kl16_latents", "generators/mar_large", "ddp_multinode"),
    "imagenet256_mar_huge": ("imagenet256_kl16_latents", "generators/mar_huge", "ddp_multinode"),
    "imagenet256_maskgit": ("imagenet256", "generators/maskgit_imagenet256", "ddp"),
    "imagenet256_var_vqvae": ("imagenet256_var", "tokenizers/var_vqvae", "ddp"),
    "imagenet256_kl16": ("imagenet256", "tokenizers/kl16", "ddp"),
    "imagenet256_vq": ("imagenet256", "tokenizers/maskgit_vqgan_f16", "ddp"),
    **{f"imagenet256_titok_{m}_stage{k}": ("imagenet256_titok", f"tokenizers/titok_{m}", "ddp")
       for m in ("l32", "b64", "s128") for k in (1, 2)},
    "imagenet256_titok_bl64_vq": ("imagenet256_titok", "tokenizers/titok_bl64_vq", "ddp"),
    "imagenet256_titok_ll32_vae": ("imagenet256_titok", "tokenizers/titok_ll32_vae", "ddp"),
    "imagenet256_titok_maskgit_l32": ("imagenet256_titok", "generators/maskgit_titok_l32", "ddp_multinode"),
    "imagenet256_titok_maskgit_b64": ("imagenet256_titok", "generators/maskgit_titok_b64", "ddp_multinode"),
    "imagenet256_titok_uvit_s128": ("imagenet256_titok", "generators/uvit_titok_s128", "ddp_multinode"),
    "imagenet64_fractalar": ("imagenet64", "generators/fractalar_in64", "ddp_multinode"),
    "imagenet64_fractalmar": ("imagenet64", "generators/fractalmar_in64", "ddp_multinode"),
    "imagenet256_fractalmar_base": ("imagenet256", "generators/fractalmar_base_in256", "ddp_multinode"),
    "imagenet256_fractalmar_large": ("imagenet256", "generators/fractalmar_large_in256", "ddp_multinode"),
    "imagenet256_fractalmar_huge": ("imagenet256", "generators/fractalmar_huge_in256", "ddp_multinode"),
}
PRESETS = ("gpu", "ddp", "ddp_multinode", "fsdp")


def _files(exp: str, preset: str | None = None) -> list[str]:
    data, model, default = RECIPES[exp]
    return [str(C / "data" / f"{data}.yaml"), str(C / f"{model}.yaml"), str(C / "experiments" / f"{exp}.yaml"),
            str(C / "trainer" / f"{preset or default}.yaml")]


def _args(files: list[str]) -> list[str]:
    return [a for f in files for a in ("-c", f)]


def _print_config(files: list[str], capsys) -> dict:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["fit", "--print_config", *_args(files)])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _global_batch_callback(cfg: dict) -> dict:
    cbs = [cb for cb in cfg["trainer"]["callbacks"] if cb["class_path"] == "genmodels.training.recipe.GlobalBatch"]
    assert len(cbs) == 1, "every ImageNet recipe states its global batch with a GlobalBatch callback"
    return cbs[0]["init_args"]


def test_every_imagenet_experiment_is_listed():
    shipped = {p.stem for p in (C / "experiments").glob("imagenet*.yaml")}
    assert shipped == set(RECIPES)


@pytest.mark.parametrize("exp", sorted(RECIPES))
def test_recipe_composes_with_its_preset_and_applies_its_lr_rule(exp, capsys):
    cfg = _print_config(_files(exp), capsys)
    t, init = cfg["trainer"], cfg["model"]["init_args"]
    gb = _global_batch_callback(cfg)
    layout = t["devices"] * t["num_nodes"] * cfg["data"]["init_args"]["batch_size"] * t["accumulate_grad_batches"]
    assert layout == gb["global_batch"], (exp, layout, gb)
    assert math.isclose(init["lr"], gb["base_lr"] * gb["global_batch"] / gb["base_batch"], rel_tol=1e-9), exp
    assert (t["max_epochs"] or 0) > 0 or (t["max_steps"] or 0) > 0
    assert t["precision"] in ("16-mixed", "bf16-mixed", "32-true")
    if "generator" in init:
        assert 0 < init["grid_classes"] <= 10 or (t["strategy"]["class_path"].endswith("FSDPStrategy")
                                                  and init["grid_classes"] == 0)
        assert init["tokenizer_ckpt"] or init["tokenizer"]
    if exp.startswith("imagenet256_var_d"):  # VAR: no flip, LANCZOS 1.125x, random crop; 16-mixed, clip 2
        d = cfg["data"]["init_args"]
        assert (d["preprocess"], d["resize_ratio"], d["interpolation"], d["random_crop"], d["random_flip"]) == (
            "resize_crop", 1.125, "lanczos", True, False)
        assert (t["precision"], t["gradient_clip_val"], init["ema_decay"]) == ("16-mixed", 2.0, None)
        assert (init["lr_schedule"], init["start_lr_ratio"]) == ("var_lin0", 0.005)  # sche lin0, wp0
        wd = [cb["init_args"] for cb in t["callbacks"] if cb["class_path"].endswith("recipe.WeightDecayAnnealing")]
        assert wd == ([{"start": 0.05, "end": 0.08}] if exp.endswith("d30") else [])  # --twde 0.08 for d30 only
    if exp.startswith("imagenet256_mar"):  # MAR: cached latents, clip 3, EMA 0.9999, constant LR
        assert cfg["data"]["class_path"] == "genmodels.data.latents.CachedLatentsDataModule"
        assert (t["gradient_clip_val"], init["ema_decay"], init["lr_schedule"]) == (3.0, 0.9999, "constant")
    if "fractal" in exp:  # main_fractalgen.py: grad_clip 3, no EMA, cosine to 0, blr 5e-5 per 256
        assert (t["gradient_clip_val"], init["ema_decay"], init["lr_schedule"], init["min_lr_ratio"]) == (
            3.0, None, "cosine", 0.0)
        assert gb["base_lr"] == 5e-5 and init["tokenizer"]["class_path"] == "genmodels.tokenizers.pixels.Pixels"
    if "_stage1" in exp:  # the teacher is the MaskGIT-VQGAN; stage 2 starts from stage 1
        assert init["tokenizer"]["init_args"]["teacher_ckpt"].endswith("maskgit-vqgan-imagenet-f16-256.bin")
    if "_stage2" in exp:
        assert init["tokenizer"]["init_args"]["init_from"] == \
            f"outputs/{exp.replace('_stage2', '_stage1')}/checkpoints/last.ckpt"


@pytest.mark.parametrize("exp", sorted(RECIPES))
def test_recipe_inputs_are_outputs_of_other_recipes(exp):
    """A recipe that starts from a checkpoint (tokenizer_ckpt, init_from) names the output of a shipped recipe,
    whose own experiment file writes it there."""
    text = (C / "experiments" / f"{exp}.yaml").read_text()
    for ref in re.findall(r"outputs/([\w.-]+)/checkpoints/last\.ckpt", text):
        if ref != exp:
            assert ref in RECIPES, f"{exp} starts from outputs/{ref}, which no recipe writes"
            assert f"dirpath: outputs/{ref}/checkpoints" in (C / "experiments" / f"{ref}.yaml").read_text()


@pytest.mark.parametrize("preset", PRESETS)
def test_every_trainer_preset_composes(preset, capsys):
    cfg = _print_config(_files("imagenet256_var_d16", preset), capsys)
    t = cfg["trainer"]
    assert t["accelerator"] == "gpu"
    assert (t["devices"], t["num_nodes"]) == {"gpu": (1, 1), "ddp": (8, 1), "ddp_multinode": (8, 4),
                                              "fsdp": (8, 4)}[preset]
    if preset == "fsdp":
        s = t["strategy"]
        assert s["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
        assert s["init_args"]["auto_wrap_policy"] == ["genmodels.generators.var.AdaLNSelfAttn"]
        assert s["init_args"]["activation_checkpointing_policy"] == ["genmodels.generators.var.AdaLNSelfAttn"]
        assert s["init_args"]["state_dict_type"] == "sharded"
        assert s["dict_kwargs"]["use_orig_params"] is True


def test_data_configs_agree_with_the_papers():
    var = yaml.safe_load((C / "data/imagenet256_var.yaml").read_text())["data"]["init_args"]
    adm = yaml.safe_load((C / "data/imagenet256.yaml").read_text())["data"]["init_args"]
    assert var["preprocess"] == "resize_crop" and var["random_flip"] is False
    assert adm["preprocess"] == "adm" and adm["random_flip"] is True
    assert "VAR's configs override" not in (C / "data/imagenet256.yaml").read_text()
    titok = yaml.safe_load((C / "data/imagenet256_titok.yaml").read_text())["data"]["init_args"]
    assert (titok["preprocess"], titok["resize_ratio"], titok["interpolation"], titok["random_crop"],
            titok["random_flip"]) == ("resize_crop", 1.0, "bicubic", True, True)  # 1d-tokenizer ImageTransform
    in64 = yaml.safe_load((C / "data/imagenet64.yaml").read_text())["data"]["init_args"]
    assert (in64["preprocess"], in64["image_size"], in64["random_flip"]) == ("adm", 64, True)  # main_fractalgen.py


# ---------------------------------------------------------------------------------------------- fake ImageNet
CLASSES = ("n01440764", "n01443537", "n01484850")


def _fake_imagenet(root: Path, per_class: int = 4, num_classes: int = 3) -> tuple[Path, Path]:
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, odd sizes and aspect ratios like ImageNet's."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c, wnid in enumerate(CLASSES[:num_classes]):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
                arr = (rng.random((h, w, 3)) * 80 + 60 * c).astype(np.uint8)
                Image.fromarray(arr).save(root / split / wnid / f"{wnid}_{i}.JPEG", quality=90)
    return root / "train", root / "val"


def _save_tokenizer(path: Path, cfg_file: str, **overrides) -> Path:
    """A tokenizer checkpoint in the genmodels format from a shipped tokenizer config with shrunk sizes
    (random weights: fast_dev_run only needs the shapes)."""
    from genmodels.utils.config import instantiate
    cfg = copy.deepcopy(yaml.safe_load((C / cfg_file).read_text())["model"]["init_args"]["tokenizer"])
    cfg["init_args"].update(overrides)
    torch.manual_seed(0)
    tok = instantiate(cfg)
    torch.save({"genmodels": {"tokenizer": tok.config},
                "state_dict": {f"tokenizer.{k}": v for k, v in tok.state_dict().items()}}, path)
    return path


def _cpu_trainer(root: Path, **kw) -> dict:
    """Overrides of the GPU presets for one CPU process."""
    t = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true",
         "default_root_dir": str(root), "enable_progress_bar": False, "enable_model_summary": False}
    t.update(kw)
    return t


def _write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _recipe_callbacks(exp: str, root: Path, extra: tuple = ()) -> list[dict]:
    """The experiment's own callbacks (schedules, monitors, checks), with its GlobalBatch restated for one CPU
    process with batch 2 at the recipe's learning rate, and checkpoints written under ``root``."""
    cbs = copy.deepcopy(yaml.safe_load((C / "experiments" / f"{exp}.yaml").read_text())["trainer"]["callbacks"])
    for cb in cbs:
        args = cb.setdefault("init_args", {})
        if cb["class_path"].endswith("GlobalBatch"):
            lr = float(args["base_lr"]) * args["global_batch"] / args["base_batch"]  # PyYAML reads 8e-05 as a str
            args.update(global_batch=2, base_lr=lr * args["base_batch"] / 2)
        if "dirpath" in args:
            args["dirpath"] = str(root / "checkpoints")
    return cbs + [{"class_path": c} for c in extra]


def _image_data(imagenet: tuple[Path, Path], image_size: int, **kw) -> dict:
    train, val = imagenet
    return {"init_args": {"train_dir": str(train), "val_dir": str(val), "num_classes": 3, "image_size": image_size,
                          "batch_size": 2, "num_workers": 0, "pin_memory": False, **kw}}


CHEAP_GRID = {"grid_per_class": 2, "sample_block_size": 2}  # the grid: 3 classes x 2 samples


class OptimRecorder(Callback):
    """(lr, weight_decay) of every parameter group at every optimiser step."""
    steps: list[list[tuple[float, float]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        OptimRecorder.steps.append([(g["lr"], g["weight_decay"]) for g in optimizer.param_groups])


class ProgressRecorder(Callback):
    """Records VAR's progressive stage (prog_si, -1 = all scales) at every training step."""
    stages: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ProgressRecorder.stages.append(int(pl_module.generator.prog_si))


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> tuple[Path, Path]:
    return _fake_imagenet(tmp_path_factory.mktemp("imagenet"))


def test_var_recipe_fast_dev_run_with_progressive_training(imagenet, msvq, tmp_path):
    """configs/data/imagenet256_var + generators/var_d16 + experiments/imagenet256_var_d16 +
    trainer/ddp_multinode, sizes shrunk, pg > 0: 4 steps climb the scales (pg0 1 -> all)."""
    train, val = imagenet
    tok = msvq
    over = {
        "data": {"init_args": {"train_dir": str(train), "val_dir": str(val), "num_classes": 3, "image_size": 8,
                               "batch_size": 2, "num_workers": 0, "pin_memory": False}},
        "model": {"init_args": {"tokenizer_ckpt": str(tok), "warmup_steps": 0, "generator": {"init_args": {
            "vocab_size": 32, "Cvae": 8, "patch_nums": [1, 2, 3, 4], "num_classes": 3, "depth": 2, "embed_dim": 32,
            "num_heads": 2, "pg": 0.75, "pg0": 1}}}},
        "trainer": _cpu_trainer(tmp_path, fast_dev_run=4, callbacks=[
            {"class_path": "genmodels.training.recipe.GlobalBatch",  # the recipe's check, at this layout
             "init_args": {"global_batch": 2, "base_lr": 3e-4 * 256 / 2, "base_batch": 256}},
            {"class_path": "test_recipes.ProgressRecorder"}]),
    }
    ProgressRecorder.stages = []
    main(["fit", *_args(_files("imagenet256_var_d16")), "-c", _write(tmp_path / "over.yaml", over)])
    # official train.py schedule: pg0 while warming up, then linear in steps up to pg * total = 3 steps
    assert ProgressRecorder.stages == [1, 2, 2, -1]


def test_global_batch_check_names_the_fix():
    """VAR-d16's recipe (768 at lr 3e-4) on one device with batch 24: the check names the accumulation
    that restores the global batch, then a learning rate off the rule."""
    from genmodels.errors import GenmodelsError
    from genmodels.training.recipe import GlobalBatch

    class Trainer:  # the attributes GlobalBatch reads
        num_devices, num_nodes, accumulate_grad_batches = 1, 1, 1
        datamodule = type("Data", (), {"batch_size": 24})()

    def module(lr):
        return type("Module", (), {"hparams": type("H", (), {"lr": lr})()})()

    with pytest.raises(GenmodelsError, match="= 24, but the recipe's is 768.*accumulate_grad_batches=32"):
        GlobalBatch(768, 1e-4).setup(Trainer(), module(3e-4), "fit")
    Trainer.accumulate_grad_batches = 32
    GlobalBatch(768, 1e-4).setup(Trainer(), module(3e-4), "fit")
    with pytest.raises(GenmodelsError, match="model.init_args.lr=0.001 .* = 0.0003"):
        GlobalBatch(768, 1e-4).setup(Trainer(), module(1e-3), "fit")


def test_var_digits_trains_with_progressive_training_through_the_cli(tmp_path):
    """`genmodels fit` with the VAR digits configs and pg > 0 (raised at the first step before)."""
    tok = _save_tokenizer(tmp_path / "msvq.ckpt", "tokenizers/msvq_digits.yaml", ch=32, num_res_blocks=1,
                          using_sa=False, using_mid_sa=False)
    over = {"data": {"init_args": {"batch_size": 8}},
            "model": {"init_args": {"tokenizer_ckpt": str(tok), "warmup_steps": 0, "generator": {"init_args": {
                "depth": 1, "embed_dim": 32, "num_heads": 2, "pg": 0.5, "pg0": 2}}}},
            "trainer": _cpu_trainer(tmp_path, max_steps=6, limit_val_batches=0, logger=False,
                                    callbacks=[{"class_path": "test_recipes.ProgressRecorder"}])}
    ProgressRecorder.stages = []
    main(["fit", "-c", str(C / "data/digits.yaml"), "-c", str(C / "generators/var_digits.yaml"),
          "-c", str(C / "experiments/var_digits.yaml"), "-c", _write(tmp_path / "over.yaml", over)])
    # 6 scales, pg0 2, stages rise over the first 3 steps, then all scales
    assert ProgressRecorder.stages[0] == 2 and ProgressRecorder.stages[-3:] == [-1, -1, -1]
    assert ProgressRecorder.stages == sorted(ProgressRecorder.stages[:3]) + [-1, -1, -1]


@pytest.fixture(scope="module")
def kl16_latents(imagenet, tmp_path_factory) -> tuple[Path, Path]:
    """A shrunk KL-16 checkpoint and the fake folder cached with it (python -m genmodels.data.latents)."""
    from genmodels.data.latents import main as cache_main
    root = tmp_path_factory.mktemp("kl16")
    train, val = imagenet
    tok = _save_tokenizer(root / "kl.ckpt", "tokenizers/kl16.yaml", embed_dim=4, ch=32, ch_mult=[1, 2],
                          num_res_blocks=1, resolution=8, attn_resolutions=[])
    data = yaml.safe_load((C / "data/imagenet256.yaml").read_text())
    data["data"]["init_args"].update(train_dir=str(train), val_dir=str(val), num_classes=3, image_size=8,
                                     num_workers=0)
    cache_main(["--data", _write(root / "data.yaml", data), "--tokenizer-ckpt", str(tok), "--out", str(root / "c"),
                "--batch-size", "4", "--device", "cpu"])
    return tok, root / "c"


@pytest.mark.parametrize("exp", ["imagenet256_mar_base", "imagenet256_mar_large", "imagenet256_mar_huge"])
def test_mar_recipe_fast_dev_run_on_cached_latents(exp, kl16_latents, tmp_path):
    """configs/data/imagenet256.yaml -> cache -> imagenet256_kl16_latents + generators/mar_<size> +
    experiments/imagenet256_mar_<size> + trainer/ddp_multinode, sizes shrunk."""
    tok, cache = kl16_latents
    over = {
        "data": {"init_args": {"path": str(cache), "batch_size": 2, "num_workers": 0, "pin_memory": False}},
        "model": {"init_args": {
            "tokenizer_ckpt": str(tok), "grid_sample_kwargs": {"num_steps": 2, "num_sampling_steps": 2}, **CHEAP_GRID,
            "generator": {"init_args": {
                "token_shape": [4, 4], "token_channels": 4, "num_classes": 3, "encoder_embed_dim": 32,
                "encoder_depth": 1, "encoder_num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
                "decoder_num_heads": 2, "buffer_size": 2, "diffloss_d": 1, "diffloss_w": 32}}}},
        "trainer": _cpu_trainer(tmp_path, fast_dev_run=True, callbacks=_recipe_callbacks(exp, tmp_path)),
    }
    main(["fit", *_args(_files(exp)), "-c", _write(tmp_path / "over.yaml", over)])
    assert list(tmp_path.glob("**/samples/samples_*.png")), "the validation grid was not drawn"


def test_vq_tokenizer_recipe_fast_dev_run_with_gan(imagenet, tmp_path):
    """configs/data/imagenet256 + tokenizers/maskgit_vqgan_f16 + experiments/imagenet256_vq + trainer/ddp,
    sizes shrunk, GAN on from the first step (manual optimisation)."""
    train, val = imagenet
    over = {
        "data": {"init_args": {"train_dir": str(train), "val_dir": str(val), "num_classes": 3, "image_size": 16,
                               "batch_size": 2, "num_workers": 0, "pin_memory": False}},
        "model": {"init_args": {"perceptual_weight": 0.0, "disc_start": 0, "disc_ndf": 8, "disc_layers": 1,
                                "tokenizer": {"init_args": {"vocab_size": 32, "z_channels": 8, "ch": 32,
                                                            "ch_mult": [1, 2], "v_patch_nums": [8]}}}},
        "trainer": _cpu_trainer(tmp_path, fast_dev_run=True, callbacks=[
            {"class_path": "genmodels.training.recipe.GlobalBatch",
             "init_args": {"global_batch": 2, "base_lr": 1e-4, "base_batch": 2}}]),
    }
    main(["fit", *_args(_files("imagenet256_vq")), "-c", _write(tmp_path / "over.yaml", over)])


def test_maskgit_recipe_fast_dev_run(imagenet, tmp_path):
    """configs/data/imagenet256 + generators/maskgit_imagenet256 + experiments/imagenet256_maskgit + trainer/ddp."""
    train, val = imagenet
    tok = _save_tokenizer(tmp_path / "vq.ckpt", "tokenizers/maskgit_vqgan_f16.yaml", vocab_size=32, z_channels=8,
                          ch=32, ch_mult=[1, 2], v_patch_nums=[4])
    over = {
        "data": {"init_args": {"train_dir": str(train), "val_dir": str(val), "num_classes": 3, "image_size": 8,
                               "batch_size": 2, "num_workers": 0, "pin_memory": False}},
        "model": {"init_args": {"tokenizer_ckpt": str(tok), "generator": {"init_args": {
            "vocab_size": 32, "token_shape": [4, 4], "num_classes": 3, "hidden_size": 32, "depth": 1,
            "num_heads": 2, "intermediate_size": 64}}}},
        "trainer": _cpu_trainer(tmp_path, fast_dev_run=True, callbacks=[
            {"class_path": "genmodels.training.recipe.GlobalBatch",
             "init_args": {"global_batch": 2, "base_lr": 1e-4, "base_batch": 2}}]),
    }
    main(["fit", *_args(_files("imagenet256_maskgit")), "-c", _write(tmp_path / "over.yaml", over)])
    assert list(tmp_path.glob("**/samples/samples_*.png")), "the validation grid was not drawn"


@pytest.mark.parametrize("exp", ["imagenet256_kl16", "imagenet256_var_vqvae"])
def test_tokenizer_recipes_fast_dev_run_with_gan(exp, imagenet, tmp_path):
    """KL-16 (LDM recipe) and VAR's multi-scale VQ-VAE (our recipe), sizes shrunk, GAN from the first step."""
    train, val = imagenet
    tok = {"imagenet256_kl16": {"embed_dim": 4, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "resolution": 16,
                                "attn_resolutions": []},
           "imagenet256_var_vqvae": {"vocab_size": 32, "z_channels": 8, "ch": 32, "ch_mult": [1, 2],
                                     "num_res_blocks": 1, "using_sa": False, "using_mid_sa": False,
                                     "v_patch_nums": [1, 2, 4, 8], "share_quant_resi": 2}}[exp]
    gb = {"imagenet256_kl16": {"global_batch": 2, "base_lr": 4.32e-4 / 2, "base_batch": 1},
          "imagenet256_var_vqvae": {"global_batch": 2, "base_lr": 1e-4, "base_batch": 2}}[exp]
    over = {
        "data": {"init_args": {"train_dir": str(train), "val_dir": str(val), "num_classes": 3, "image_size": 16,
                               "batch_size": 2, "num_workers": 0, "pin_memory": False}},
        "model": {"init_args": {"perceptual_weight": 0.0, "disc_start": 0, "disc_ndf": 8, "disc_layers": 1,
                                "tokenizer": {"init_args": tok}}},
        "trainer": _cpu_trainer(tmp_path, fast_dev_run=True, callbacks=[
            {"class_path": "genmodels.training.recipe.GlobalBatch", "init_args": gb}]),
    }
    main(["fit", *_args(_files(exp)), "-c", _write(tmp_path / "over.yaml", over)])


def test_var_data_config_is_vars_preprocessing(tmp_path):
    """configs/data/imagenet256_var.yaml (image_size shrunk to 16): train items are 16x16 windows of the
    LANCZOS resize of the short side to round(1.125 x 16) = 18, never flipped, at several offsets; val
    items are the centre window (torchvision Resize + RandomCrop / CenterCrop, ToTensor, x * 2 - 1)."""
    from genmodels.utils.config import instantiate
    rng = np.random.default_rng(1)
    img = (rng.random((24, 40, 3)) * 255).astype(np.uint8)  # h 24, w 40: no symmetry
    for split in ("train", "val"):
        (tmp_path / split / "n0").mkdir(parents=True)
        Image.fromarray(img).save(tmp_path / split / "n0" / "a.png")
    cfg = yaml.safe_load((C / "data/imagenet256_var.yaml").read_text())["data"]
    cfg["init_args"].update(train_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"), num_classes=1,
                            image_size=16)
    dm = instantiate(cfg)
    ref = np.asarray(Image.fromarray(img).resize((int(18 * 40 / 24), 18), resample=Image.LANCZOS))  # (18, 30, 3)
    to_x = lambda a: torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1) / 255 * 2 - 1
    windows = {(i, j): to_x(ref[i:i + 16, j:j + 16]) for i in range(3) for j in range(15)}
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        x, _ = dm.dataset("train", augment=True)[0]
        hits = [k for k, w in windows.items() if torch.allclose(x, w, atol=1e-6)]
        assert len(hits) == 1, "a train item is not an unflipped window of the LANCZOS resize"
        seen.add(hits[0])
    assert len(seen) > 5  # random crops
    x, _ = dm.dataset("val")[0]
    assert torch.allclose(x, windows[(1, 7)], atol=1e-6)  # centre: round((18-16)/2) = 1, round((30-16)/2) = 7


# ---------------------------------------------------------------------------------------------- VAR's schedule
# name -> (sche, peak lr, twd, twde, wp_it, max_it, wp0, wpe) and {iteration: (lr, wd)} printed by the OFFICIAL
# lr_wd_annealing (FoundationVision/VAR 78b9539 utils/lr_control.py):
#   python scripts/record_fixtures/var_lr_schedule.py --var-root /path/to/VAR
VAR_SCHEDULE_CASES = {
    "d16": ("lin0", 3e-4, 0.05, 0.05, 4 * 1668, 200 * 1668, 0.005, 0.1),
    "d30_small": ("lin0", 3.2e-4, 0.05, 0.08, 7, 350, 0.005, 0.01),
    "lin0.5": ("lin0.5", 1e-3, 0.05, 0.05, 10, 100, 0.005, 0.01),
    "cos": ("cos", 1e-3, 0.05, 0.0, 10, 100, 0.005, 0.01),
    "lin00": ("lin00", 1e-3, 0.05, 0.05, 10, 100, 0.005, 0.01),
    "lin": ("lin", 1e-3, 0.05, 0.05, 10, 100, 0.005, 0.01),
}
OFFICIAL_VAR_SCHEDULE = {
    'd16': {0: (1.4999999999999998e-06, 0.05), 1: (1.5447392086330935e-06, 0.05), 3336: (0.00015074999999999998, 0.05),
            6671: (0.0002999552607913668, 0.05), 6672: (0.0003, 0.05), 20000: (0.0003, 0.05), 23000: (0.0003, 0.05),
            100000: (0.00023307681756735328, 0.05), 250000: (0.00010267590559811114, 0.05),
            333599: (2.9999999999999997e-05, 0.05)},
    'd30_small': {0: (1.6000000000000001e-06, 0.05), 1: (4.70857142857143e-05, 0.05000060772516788),
                  6: (0.00027451428571428573, 0.05002187293587204), 7: (0.00032, 0.05002976888257804),
                  20: (0.00032, 0.050242435822293555), 24: (0.00032, 0.05034869266084089),
                  25: (0.00031912243767313024, 0.05037823048248605), 100: (0.00024599224376731303, 0.055677845917698934),
                  200: (0.00014848531855955678, 0.06841299243544502), 348: (4.175069252077553e-06, 0.07999939227483213),
                  349: (3.2000000000000003e-06, 0.08)},
    'lin0.5': {0: (5e-06, 0.05), 5: (0.0005024999999999999, 0.05), 10: (0.001, 0.05), 30: (0.0008887640449438203, 0.05),
               54: (0.0007552808988764045, 0.05), 55: (0.0007441573033707865, 0.05), 70: (0.0004938764044943821, 0.05),
               99: (1e-05, 0.05)},
    'cos': {0: (5e-06, 0.05), 5: (0.0005024999999999999, 0.04968597221690986), 10: (0.001, 0.04875177794352364),
            30: (0.0008816844999416791, 0.03950142273927996), 70: (0.00024748147293761336, 0.009859757821558339),
            99: (1e-05, 0.0)},
    'lin00': {0: (5e-06, 0.05), 10: (0.001, 0.05), 50: (0.0005550561797752809, 0.05), 99: (1e-05, 0.05)},
    'lin': {0: (5e-06, 0.05), 10: (0.001, 0.05), 22: (0.001, 0.05), 23: (0.001, 0.05), 60: (0.0005203767349636483, 0.05),
            99: (1e-05, 0.05)},
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_VAR_SCHEDULE))
def test_var_lr_and_weight_decay_follow_the_official_schedule(name):
    """lr_lambda('var_<sche>') x peak and weight_decay_at equal the official lr_wd_annealing (float64 maths in
    another order: relative 1e-12)."""
    from genmodels.training.common import lr_lambda, weight_decay_at
    sche, peak, twd, twde, wp, total, wp0, wpe = VAR_SCHEDULE_CASES[name]
    fn = lr_lambda(f"var_{sche}", wp, total, wpe, wp0)
    for it, (lr, wd) in OFFICIAL_VAR_SCHEDULE[name].items():
        assert math.isclose(peak * fn(it), lr, rel_tol=1e-12), (name, it, peak * fn(it), lr)
        assert math.isclose(weight_decay_at(it, total, twd, twde), wd, rel_tol=1e-12, abs_tol=1e-15), (name, it)


def test_schedule_and_weight_decay_mistakes_name_the_field():
    from genmodels.errors import GenmodelsError
    from genmodels.training.common import lr_lambda
    from genmodels.training.recipe import WeightDecayAnnealing
    for bad in ("var_lin1.5", "lin0", "var_linx"):
        with pytest.raises(GenmodelsError, match="lr_schedule"):
            lr_lambda(bad, 10, 100)
    module = type("M", (), {"hparams": type("H", (), {"weight_decay": 0.02})()})()
    with pytest.raises(GenmodelsError, match=r"WeightDecayAnnealing.start=0.05 but model.init_args.weight_decay=0.02"):
        WeightDecayAnnealing(0.05, 0.08).setup(None, module, "fit")


@pytest.fixture(scope="module")
def msvq(tmp_path_factory) -> Path:
    """A shrunk multi-scale VQ-VAE checkpoint (VAR's tokenizer), scales 1, 2, 3, 4."""
    return _save_tokenizer(tmp_path_factory.mktemp("msvq") / "msvq.ckpt", "tokenizers/var_vqvae.yaml", vocab_size=32,
                           z_channels=8, ch=32, ch_mult=[1, 2], num_res_blocks=1, using_sa=False, using_mid_sa=False,
                           v_patch_nums=[1, 2, 3, 4], share_quant_resi=2)


@pytest.mark.parametrize("exp", ["imagenet256_var_d20", "imagenet256_var_d24", "imagenet256_var_d30"])
def test_var_recipes_fast_dev_run_with_the_official_schedule(exp, imagenet, msvq, tmp_path):
    """VAR-d20 / d24 / d30 through their compositions (d30 with trainer/fsdp.yaml, whose FSDPStrategy needs CUDA
    in this Lightning: one CPU process with strategy auto here; tests/test_ddp_fsdp.py runs FSDP), sizes shrunk,
    warm-up 1 step of 3: the optimiser steps at wp0 x peak, peak, wpe x peak (var_lin0), and d30's weight decay
    anneals 0.05 -> 0.065 -> 0.08 on the decaying group (WeightDecayAnnealing; the other group stays 0)."""
    cfg = yaml.safe_load((C / "experiments" / f"{exp}.yaml").read_text())["model"]["init_args"]
    over = {
        "data": _image_data(imagenet, 8),
        "model": {"init_args": {"tokenizer_ckpt": str(msvq), "warmup_steps": 1, **CHEAP_GRID, "generator": {"init_args": {
            "vocab_size": 32, "Cvae": 8, "patch_nums": [1, 2, 3, 4], "num_classes": 3, "depth": 2, "embed_dim": 32,
            "num_heads": 2}}}},
        "trainer": _cpu_trainer(tmp_path, fast_dev_run=3,
                                callbacks=_recipe_callbacks(exp, tmp_path, ("test_recipes.OptimRecorder",))),
    }
    OptimRecorder.steps = []
    main(["fit", *_args(_files(exp)), "-c", _write(tmp_path / "over.yaml", over)])
    peak, wpe = cfg["lr"], cfg["min_lr_ratio"]
    wd = [0.05, 0.065, 0.08] if exp.endswith("d30") else [0.05] * 3
    assert len(OptimRecorder.steps) == 3
    for step, want_lr, want_wd in zip(OptimRecorder.steps, [0.005 * peak, peak, wpe * peak], wd):
        (lr_d, wd_d), (lr_n, wd_n) = step
        assert math.isclose(lr_d, want_lr, rel_tol=1e-9) and lr_n == lr_d
        assert math.isclose(wd_d, want_wd, rel_tol=1e-9) and wd_n == 0.0


# ---------------------------------------------------------------------------------------------- TiTok
TITOK_TINY = {"image_size": 16, "patch_size": 4, "encoder_size": [32, 1, 2], "decoder_size": [32, 1, 2],
              "num_latent_tokens": 4, "codebook_size": 16, "token_size": 4}


@pytest.fixture(scope="module")
def titok_ckpts(tmp_path_factory) -> tuple[Path, Path]:
    """A shrunk MaskGIT-VQGAN teacher (16 codes on a 4x4 grid of 16-px images) and a shrunk TiTok stage-1
    checkpoint distilled from it (its teacher inside): the inputs of stage 2 and of the generators."""
    root = tmp_path_factory.mktemp("titok")
    teacher = _save_tokenizer(root / "teacher.ckpt", "tokenizers/maskgit_vqgan.yaml", codebook_size=16,
                              z_channels=8, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, image_size=16)
    stage1 = _save_tokenizer(root / "stage1.ckpt", "tokenizers/titok_l32.yaml", **TITOK_TINY,
                             proxy_codebook_size=16, stage=1, teacher_ckpt=str(teacher))
    return teacher, stage1


TITOK_TOKENIZER_RECIPES = [f"imagenet256_titok_{m}_stage{k}" for m in ("l32", "b64", "s128") for k in (1, 2)] + [
    "imagenet256_titok_bl64_vq", "imagenet256_titok_ll32_vae"]


@pytest.mark.parametrize("exp", TITOK_TOKENIZER_RECIPES)
def test_titok_tokenizer_recipes_fast_dev_run(exp, imagenet, titok_ckpts, tmp_path):
    """Stage 1 (CE against the teacher's codes), stage 2 (from the stage-1 file, GAN on), single-stage VQ / VAE
    (GAN on), through their compositions with the sizes shrunk."""
    teacher, stage1 = titok_ckpts
    tok = {k: v for k, v in TITOK_TINY.items() if not (exp.endswith("vae") and k == "codebook_size")}
    if "_stage1" in exp:
        tok.update(teacher_ckpt=str(teacher), proxy_codebook_size=16)
    if "_stage2" in exp:
        tok.update(init_from=str(stage1), proxy_codebook_size=16)
    model = {"tokenizer": {"init_args": tok}, "perceptual_weight": 0.0}
    if "_stage1" not in exp:
        model.update(disc_start=0, disc_ndf=8, disc_layers=1)
    over = {"data": _image_data(imagenet, 16), "model": {"init_args": model},
            "trainer": _cpu_trainer(tmp_path, fast_dev_run=True, callbacks=_recipe_callbacks(exp, tmp_path))}
    main(["fit", *_args(_files(exp)), "-c", _write(tmp_path / "over.yaml", over)])
    assert list(tmp_path.glob("**/samples/recon_*.png")), "the reconstruction grid was not drawn"


@pytest.mark.parametrize("exp", ["imagenet256_titok_maskgit_l32", "imagenet256_titok_maskgit_b64",
                                 "imagenet256_titok_uvit_s128"])
def test_titok_generator_recipes_fast_dev_run(exp, imagenet, titok_ckpts, tmp_path):
    """MaskGIT (ImageBert) and the U-ViT on the tokens of a frozen TiTok, sizes shrunk."""
    _, stage1 = titok_ckpts
    over = {
        "data": _image_data(imagenet, 16),
        "model": {"init_args": {"tokenizer_ckpt": str(stage1), "grid_sample_kwargs": {"num_steps": 2}, **CHEAP_GRID,
                                "generator": {"init_args": {
                                    "vocab_size": 16, "token_shape": [4], "seq_len": 4, "num_classes": 3,
                                    "hidden_size": 32, "depth": 2, "num_heads": 2, "intermediate_size": 64}}}},
        "trainer": _cpu_trainer(tmp_path, fast_dev_run=True, callbacks=_recipe_callbacks(exp, tmp_path)),
    }
    main(["fit", *_args(_files(exp)), "-c", _write(tmp_path / "over.yaml", over)])
    assert list(tmp_path.glob("**/samples/samples_*.png")), "the validation grid was not drawn"


# ---------------------------------------------------------------------------------------------- FractalGen
@pytest.mark.parametrize("exp", ["imagenet64_fractalar", "imagenet64_fractalmar", "imagenet256_fractalmar_base",
                                 "imagenet256_fractalmar_large", "imagenet256_fractalmar_huge"])
def test_fractalgen_recipes_fast_dev_run(exp, imagenet, tmp_path):
    """FractalAR / FractalMAR (64 px: 3 levels) and FractalMAR-B/L/H (256 px: 4 levels, guiding pixel) in pixel
    space through their compositions, shrunk to 8-px images."""
    n = 3 if exp.startswith("imagenet64") else 4
    sizes = [8, 2, 1] if n == 3 else [8, 4, 2, 1]
    over = {
        "data": _image_data(imagenet, 8),
        "model": {"init_args": {
            "tokenizer": {"init_args": {"image_size": 8}},
            "grid_sample_kwargs": {"num_iter_list": [2] * (n - 1)}, **CHEAP_GRID,
            "generator": {"init_args": {"img_size_list": sizes, "embed_dim_list": [32] + [16] * (n - 1),
                                        "num_blocks_list": [1] * n, "num_heads_list": [2] * n, "num_classes": 3,
                                        "num_iter_list": [2] * (n - 1)}}}},
        "trainer": _cpu_trainer(tmp_path, fast_dev_run=True, callbacks=_recipe_callbacks(exp, tmp_path)),
    }
    main(["fit", *_args(_files(exp)), "-c", _write(tmp_path / "over.yaml", over)])
    assert list(tmp_path.glob("**/samples/samples_*.png")), "the validation grid was not drawn"
