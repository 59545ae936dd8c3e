"""The shared progress display (genmodels.utils.progress): done / total, seconds per image and
time left, on rank 0 only; latent caching uses it."""
from __future__ import annotations

import io

import pytest
import torch

from genmodels.utils.progress import progress

pytestmark = pytest.mark.usefixtures("one_thread")


def test_progress_shows_done_total_seconds_per_image_and_time_left():
    out = io.StringIO()
    with progress(10, "sampling", file=out, enabled=True) as bar:
        for _ in range(5):
            bar.update(2)
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("sampling: 100%") and "10/10" in last and "s/img]" in last and "<00:00" in last
    out = io.StringIO()
    assert list(progress(range(4), "features", unit="batch", file=out, enabled=True)) == [0, 1, 2, 3]
    assert "4/4" in out.getvalue() and "s/batch" in out.getvalue()


def test_progress_is_silent_off_rank_zero(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    out = io.StringIO()
    assert list(progress(range(3), "x", file=out)) == [0, 1, 2]
    assert out.getvalue() == ""
    monkeypatch.setenv("RANK", "0")
    list(progress(range(3), "x", file=out))
    assert "3/3" in out.getvalue()


def test_latent_caching_shows_progress(tmp_path, capsys):
    from genmodels.data import DigitsDataModule
    from genmodels.data.latents import cache_latents
    from genmodels.tokenizers.kl_vae import KLVAE

    torch.manual_seed(0)
    vae = KLVAE(embed_dim=4, ch=32, ch_mult=(1,), num_res_blocks=1, resolution=16, attn_resolutions=()).eval()
    dm = DigitsDataModule(image_size=16, batch_size=100)
    n = len(dm.dataset("val", augment=False))
    cache_latents(vae, dm, tmp_path / "c", splits=("val",), flip=False, batch_size=100)
    err = capsys.readouterr().err
    assert "cache_latents val" in err and f"{n}/{n}" in err and "s/img]" in err
    cache_latents(vae, dm, tmp_path / "d", splits=("val",), flip=False, batch_size=100, progress=False)
    assert "cache_latents" not in capsys.readouterr().err
