"""Small things tests import by class path (tests/ is on sys.path under pytest)."""
from lightning.pytorch.callbacks import Callback


class StopAfterEpoch(Callback):
    """Simulate an interrupted run: stop after ``epoch`` (0-based) has finished."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= self.epoch:
            trainer.should_stop = True


def mar_fixture_weights():
    """The module ``tests/fixtures/mar/weights.py`` (deterministic perturbation of weights, shared
    with the script that recorded the MAR fixtures from the official code)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("mar_fixture_weights",
                                                  Path(__file__).parent / "fixtures" / "mar" / "weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- float tolerances
# Comparisons of floats against recorded fixtures (made on another CPU) or between two ways of
# computing the same thing follow the float32 (float64) maths, never one machine's last bits:
# the error of a float32 result is a few units of eps32 = 1.2e-7 times the magnitude of the
# values it was computed from, and kernels of other instruction sets (AVX2 / AVX-512 / ARM)
# sum in other orders. So the maximum difference is measured relative to the reference's
# magnitude, max|actual - ref| <= rtol * max(1, max|ref|), with rtol = 1e-5 (~80 eps32) for
# a few layers of float32 maths. Integer outputs (tokens, indices) are compared exactly instead.
F32_RTOL = 1e-5
# Outputs of deep conv nets (the VQ / KL encoders and decoders: ~10 conv + GroupNorm layers,
# each a K ~ 300-600 term float32 sum over activations larger than the output, GroupNorm
# dividing by small stds) and of iterated samplers (DDPM chains, each step dividing by
# sqrt(alpha_bar)): errors compound over the layers / steps. Measured on one AVX-512 CPU with
# torch's AVX-512, AVX2 and non-vectorised kernels: <= 8.3e-6 against the recorded fixtures.
F32_DEEP_RTOL = 1e-4
F64_RTOL = 1e-12


def max_scaled_diff(actual, ref, elementwise: bool = False, floor: float = 1.0) -> float:
    """``max|actual - ref| / max(floor, max|ref|)`` (float64); ``elementwise``: the largest
    ``|actual - ref| / max(floor, |ref|)`` (for a vector of independent quantities, e.g. per-sample
    losses of very different size). ``floor=0``: purely relative, for quantities whose natural
    scale is not 1 (gradients)."""
    import torch

    a = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    r = torch.as_tensor(ref).detach().to("cpu", torch.float64)
    assert a.shape == r.shape, f"shape {tuple(a.shape)} != reference {tuple(r.shape)}"
    if a.numel() == 0:
        return 0.0
    diff = (a - r).abs()
    if elementwise:
        return (diff / r.abs().clamp_min(floor)).max().item()
    return diff.max().item() / max(floor, r.abs().max().item())


def assert_close_f32(actual, ref, rtol: float = F32_RTOL, what: str = "", elementwise: bool = False,
                     floor: float = 1.0) -> None:
    """Assert ``max|actual - ref| <= rtol * max(floor, max|ref|)`` (see ``max_scaled_diff``)."""
    import torch

    err = max_scaled_diff(actual, ref, elementwise, floor)
    _log_tolerance(what, err, rtol)
    if not err <= rtol:  # also fails on NaN
        r = torch.as_tensor(ref).detach().double()
        scale = (f"max({floor:g}, |ref|) per element" if elementwise
                 else f"max({floor:g}, max|ref| = {r.abs().max().item():.4g})")
        raise AssertionError(f"{what or 'values'}: max|diff| = {err:.3g} x {scale} > rtol {rtol:g}")


def assert_close_f64(actual, ref, rtol: float = F64_RTOL, what: str = "", elementwise: bool = False,
                     floor: float = 1.0) -> None:
    """``assert_close_f32`` for float64 maths (eps64 = 2.2e-16; default rtol 1e-12)."""
    assert_close_f32(actual, ref, rtol=rtol, what=what, elementwise=elementwise, floor=floor)


def _log_tolerance(what: str, err: float, rtol: float) -> None:
    """With ``GENMODELS_TOLERANCE_LOG=<file>``, append ``test  what  measured  rtol`` lines (how
    the cross-machine tolerances in tests/fixtures/*/README.md were measured)."""
    import os

    path = os.environ.get("GENMODELS_TOLERANCE_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(f"{test}\t{what}\t{err:.3g}\t{rtol:g}\n")


# Scores computed from float32 features (FID, IS, precision / recall) by two routes (another
# batch size, a cache, another process count): the features carry a float32 relative error of
# ~1e-6 (a few eps32 through the extractor's layers, in another summation order), and FID is
# the difference of terms much larger than itself (tr S1 + tr S2 + |mu1|^2 + |mu2|^2 ~ 2000 for
# FID ~ 40 with the digits classifier: a factor ~50), so FID agrees to ~5e-5 relative at worst.
SCORE_RTOL = 1e-4


# ---------------------------------------------------------------- tiny tokenizers shared by test files
def gen(seed: int = 0):
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    import torch
    return torch.Generator().manual_seed(seed)


def tiny_vq(patch_nums=(8,)):
    """A random 16-px multi-scale VQ-VAE (32 codes; one scale of 8x8 tokens by default = a 2D VQ)."""
    import torch
    from genmodels.tokenizers.multiscale_vq import VQVAE
    torch.manual_seed(0)
    return VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=[1, 2], num_res_blocks=1, decoder_blocks_per_level=1,
                 using_sa=False, using_mid_sa=False, v_patch_nums=list(patch_nums)).eval()


def tiny_var(patch_nums):
    """A random VAR (2 blocks x 64, 5 classes) and its random 64-code multi-scale VQ-VAE (8 dims,
    ``patch_nums``), unbound: (var, vae), both in eval mode."""
    import torch
    from genmodels.generators.var import VAR
    from genmodels.tokenizers.multiscale_vq import VQVAE
    torch.manual_seed(0)
    vae = VQVAE(64, 8, 32, share_quant_resi=2, v_patch_nums=patch_nums, test_mode=True)
    var = VAR(vocab_size=64, Cvae=8, patch_nums=patch_nums, num_classes=5, depth=2, embed_dim=64, num_heads=2,
              init_adaln_gamma=0.5).eval()
    return var, vae


def tiny_kl():
    """A random 16-px KL-VAE (8x8x4 continuous tokens)."""
    import torch
    from genmodels.tokenizers.kl_vae import KLVAE
    torch.manual_seed(0)
    return KLVAE(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16, attn_resolutions=(),
                 scale_factor=1.0).eval()
