"""The ImageNet recipes as shipped: every composition (data + tokenizer/generator + experiment + trainer
preset) parses, states a global batch that its layout gives and the learning rate its scaling rule
gives; representative compositions run ``--trainer.fast_dev_run`` on a tiny fake ImageNet folder
(written here) with only the sizes shrunk; VAR trains with progressive training (pg > 0) through
``genmodels fit``."""
from __future__ import annotations

import copy
import math
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
    shipped = {p.stem for p in (C / "experiments").glob("imagenet256_*.yaml")}
    assert shipped == set(RECIPES)


@pytest.mark.parametrize("exp", sorted(RECIPES))
def test_recipe_composes_with_its_preset_and_applies_its_lr_rule(exp, capsys):
    cfg = _print_config(_files(exp), capsys)
    t, init = cfg["trainer"], cfg["model"]["init_args"]
    gb = _global_batch_callback(cfg)
    layout = t["devices"] * t["num_nodes"] * cfg["data"]["init_args"]["batch_size"] * t["accumulate_grad_batches"]
    assert layout == gb["global_batch"], (exp, layout, gb)
    assert math.isclose(init["lr"], gb["base_lr"] * gb["global_batch"] / gb["base_batch"], rel_tol=1e-9), exp
    assert t["max_epochs"] > 0 and t["precision"] in ("16-mixed", "bf16-mixed", "32-true")
    if "generator" in init:
        assert 0 < init["grid_classes"] <= 10 or (t["strategy"]["class_path"].endswith("FSDPStrategy")
                                                  and init["grid_classes"] == 0)
        assert init["tokenizer_ckpt"]
    if exp.startswith("imagenet256_var_d"):  # VAR: no flip, LANCZOS 1.125x, random crop; 16-mixed, clip 2
        d = cfg["data"]["init_args"]
        assert (d["preprocess"], d["resize_ratio"], d["interpolation"], d["random_crop"], d["random_flip"]) == (
            "resize_crop", 1.125, "lanczos", True, False)
        assert (t["precision"], t["gradient_clip_val"], init["ema_decay"]) == ("16-mixed", 2.0, None)
    if exp.startswith("imagenet256_mar"):  # MAR: cached latents, clip 3, EMA 0.9999, constant LR
        assert cfg["data"]["class_path"] == "genmodels.data.latents.CachedLatentsDataModule"
        assert (t["gradient_clip_val"], init["ema_decay"], init["lr_schedule"]) == (3.0, 0.9999, "constant")


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


class ProgressRecorder(Callback):
    """Records VAR's progressive stage (prog_si, -1 = all scales) at every training step."""
    stages: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ProgressRecorder.stages.append(int(pl_module.generator.prog_si))


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> tuple[Path, Path]:
    return _fake_imagenet(tmp_path_factory.mktemp("imagenet"))


def test_var_recipe_fast_dev_run_with_progressive_training(imagenet, tmp_path):
    """configs/data/imagenet256_var + generators/var_d16 + experiments/imagenet256_var_d16 +
    trainer/ddp_multinode, sizes shrunk, pg > 0: 4 steps climb the scales (pg0 1 -> all)."""
    train, val = imagenet
    tok = _save_tokenizer(tmp_path / "msvq.ckpt", "tokenizers/var_vqvae.yaml", vocab_size=32, z_channels=8, ch=32,
                          ch_mult=[1, 2], num_res_blocks=1, using_sa=False, using_mid_sa=False,
                          v_patch_nums=[1, 2, 3, 4], share_quant_resi=2)
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


def test_mar_recipe_fast_dev_run_on_cached_latents(imagenet, tmp_path):
    """configs/data/imagenet256.yaml -> cache (python -m genmodels.data.latents) -> imagenet256_kl16_latents +
    generators/mar_base + experiments/imagenet256_mar_base + trainer/ddp_multinode, sizes shrunk."""
    from genmodels.data.latents import main as cache_main
    train, val = imagenet
    tok = _save_tokenizer(tmp_path / "kl.ckpt", "tokenizers/kl16.yaml", embed_dim=4, ch=32, ch_mult=[1, 2],
                          num_res_blocks=1, resolution=8, attn_resolutions=[])
    data = yaml.safe_load((C / "data/imagenet256.yaml").read_text())
    data["data"]["init_args"].update(train_dir=str(train), val_dir=str(val), num_classes=3, image_size=8,
                                     num_workers=0)
    cache = tmp_path / "latents"
    cache_main(["--data", _write(tmp_path / "data.yaml", data), "--tokenizer-ckpt", str(tok), "--out", str(cache),
                "--batch-size", "4", "--device", "cpu"])
    over = {
        "data": {"init_args": {"path": str(cache), "batch_size": 2, "num_workers": 0, "pin_memory": False}},
        "model": {"init_args": {
            "tokenizer_ckpt": str(tok), "grid_sample_kwargs": {"num_steps": 2, "num_sampling_steps": 2},
            "generator": {"init_args": {
                "token_shape": [4, 4], "token_channels": 4, "num_classes": 3, "encoder_embed_dim": 32,
                "encoder_depth": 1, "encoder_num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
                "decoder_num_heads": 2, "buffer_size": 2, "diffloss_d": 1, "diffloss_w": 32}}}},
        "trainer": _cpu_trainer(tmp_path, fast_dev_run=True, callbacks=[
            {"class_path": "genmodels.training.recipe.GlobalBatch",
             "init_args": {"global_batch": 2, "base_lr": 8e-4 * 256 / 2, "base_batch": 256}}]),
    }
    main(["fit", *_args(_files("imagenet256_mar_base")), "-c", _write(tmp_path / "over.yaml", over)])
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
