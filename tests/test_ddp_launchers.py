"""configs/trainer/ddp_multinode.yaml under the two launchers the README shows, on CPU: 2 "nodes" of one
process each, started by torchrun (Lightning's TorchElasticEnvironment) or as SLURM's srun would start
them (Lightning's SLURMEnvironment, the environment variables set by hand), train to the weights of one
process with the doubled batch (as tests/test_ddp_equivalence.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from genmodels.cli import main
from test_ddp_equivalence import _config, _max_rel_diff, _weights, _without_key_bias
from test_recipes import C, _fake_imagenet, _save_tokenizer, _write

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launchers")
    train, val = _fake_imagenet(tmp / "imagenet", per_class=4, num_classes=2)
    tok = _save_tokenizer(tmp / "vq.ckpt", "tokenizers/vq_digits.yaml", vocab_size=32, z_channels=8,
                          ch_mult=[1, 2], v_patch_nums=[4])
    files = [str(C / "data/imagenet256.yaml"), str(C / "generators/causal_ar_digits.yaml")]
    one = _config(tmp, "one", devices=1, batch_size=8, train=train, val=val, tok=tok)
    main(["fit", *(a for f in files for a in ("-c", f)), "-c", str(C / "trainer/gpu.yaml"), "-c", str(one)])
    return tmp, train, val, tok, files, _weights(tmp, "one")


def _multinode_args(tmp: Path, name: str, train, val, tok, files) -> list[str]:
    cfg = _config(tmp, name, devices=1, batch_size=4, train=train, val=val, tok=tok)
    over = yaml.safe_load(cfg.read_text())
    over["trainer"]["num_nodes"] = 2  # 2 nodes x 1 CPU process
    return [*(a for f in files for a in ("-c", f)), "-c", str(C / "trainer/ddp_multinode.yaml"),
            "-c", _write(cfg, over)]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "MASTER_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **extra}


def _wait(procs: list[subprocess.Popen]) -> None:
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]


def test_torchrun_two_nodes(setup):
    tmp, train, val, tok, files, w_one = setup
    args = _multinode_args(tmp, "torchrun", train, val, tok, files)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                               "1", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
                               "-m", "genmodels.cli", "fit", *args],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    _wait(procs)
    w = _weights(tmp, "torchrun")
    assert _max_rel_diff(_without_key_bias(w), _without_key_bias(w_one)) <= 1e-5


def test_slurm_two_nodes(setup):
    tmp, train, val, tok, files, w_one = setup
    args = _multinode_args(tmp, "slurm", train, val, tok, files)
    common = dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_NODELIST="localhost", SLURM_JOB_ID="4242",
                  SLURM_JOB_NAME="genmodels", SLURM_LOCALID="0", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, "-m", "genmodels.cli", "fit", *args],
                              env=_env(**common, SLURM_PROCID=str(rank), SLURM_NODEID=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    _wait(procs)
    w = _weights(tmp, "slurm")
    assert _max_rel_diff(_without_key_bias(w), _without_key_bias(w_one)) <= 1e-5
