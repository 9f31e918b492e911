"""Data-parallel training (`cpews.training.distributed`) with the gloo backend and real processes: 2 processes
that split the global batch train exactly as 1 process on the whole batch (losses per step, final weights, the
pool), and a 2-process checkpoint resumes in 1 process; the normaliser shares and the batch split by hand."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpews.training import keys
from cpews.training.checkpoint import load_checkpoint
from cpews.training.distributed import BatchSplit, RankBatchSampler, World, per_process_batch_size

# Every term on from the first step; the pool is built after step 2, so PDL and SSL act in steps 3 and 4; a
# checkpoint every 2 steps, all kept (the resume test starts from step 2's); one report per step.
OVERRIDES = (
    "optim.max_iters=4",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=0",
    "loss.ism_warmup_iters=-1",
    "loss.seg_warmup_iters=-1",
    "proto.n_builds=1",
    "proto.build_iter=2",
    "proto.kmeans_n_init=2",
    "eval.max_images=4",
)
LOSS_KEYS = (keys.TRAIN_LOSS, keys.TRAIN_LOSS_CLS, keys.TRAIN_LOSS_ISM, keys.loss_key("seg"),
             keys.loss_key("pdl"), keys.loss_key("ssl"),  # and the prototype terms' diagnostics:
             *(keys.stat_key(name) for name in ("pdl_rms_pos", "pdl_rms_neg", "pdl_pairs", "ssl_tokens")))


REPO = Path(__file__).resolve().parents[3]

# One process of a gloo group (rank and size from the environment, as torchrun and Ray Train set them): `train`
# with the micro config; rank 0 saves its reports, the others check that they reported nothing.
WORKER = """
import json, os, sys
import torch
import torch.distributed as dist
from cpews.config import load_config
from cpews.training import train
from tests.conftest import MICRO_OVERRIDES

overrides, out_dir, result, resume = json.loads(sys.argv[1])
torch.set_num_threads(1)
dist.init_process_group("gloo")
try:
    reports = []
    cfg = load_config("test_micro", (*MICRO_OVERRIDES, *overrides))
    outcome = train(cfg, lambda m, d: reports.append(dict(m)), out_dir=out_dir, resume=resume, progress=False)
    if dist.get_rank() == 0:
        torch.save({"reports": reports, "iterations": outcome.iterations}, result)
    else:
        assert reports == [] and outcome.metrics == {}, "only rank 0 reports and validates"
finally:
    dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(world_size: int, data_dir: Path, out_dir: Path, resume: Path | None = None) -> dict:
    """Run `WORKER` in `world_size` processes; rank 0's saved result."""
    result = out_dir.parent / f"{out_dir.name}.result.pt"
    args = json.dumps([list(OVERRIDES), str(out_dir), str(result), None if resume is None else str(resume)])
    env = {**os.environ, "CPEWS_DATA_DIR": str(data_dir.parent), "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world_size)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, args], cwd=REPO, env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world_size)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{output[-3000:]}"
    return torch.load(result, weights_only=True)  # reports (floats) and iteration counts


def _train_losses(reports: list[dict]) -> dict[int, dict[str, float]]:
    return {int(m[keys.TRAIN_ITERATION]): {k: m[k] for k in LOSS_KEYS if k in m}
            for m in reports if keys.TRAIN_LOSS in m}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model


@pytest.fixture(scope="module")
def runs(synthetic_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same 4 steps by 1 process (in this one, no process group) and by 2 gloo processes."""
    from cpews.training import train
    from tests.conftest import micro_config

    base = tmp_path_factory.mktemp("distributed")
    reports: list = []
    train(micro_config(*OVERRIDES), lambda m, d: reports.append(dict(m)), out_dir=base / "one", progress=False)
    two = _spawn(2, synthetic_data_dir, base / "two")
    return {"base": base, "data": synthetic_data_dir, "one": reports, "two": two["reports"]}


def test_two_processes_with_the_batch_split_train_as_one_with_the_whole_batch(runs: dict) -> None:
    one, two = _train_losses(runs["one"]), _train_losses(runs["two"])
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    assert {keys.loss_key("pdl"), keys.loss_key("ssl")} <= set(one[3]) and set(one[3]) == set(two[3])
    assert keys.loss_key("pdl") not in one[2]  # the pool exists from step 3 on
    for step in one:
        for key, value in one[step].items():
            assert two[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    f1_one = [m[keys.TRAIN_F1] for m in runs["one"] if keys.TRAIN_F1 in m]
    f1_two = [m[keys.TRAIN_F1] for m in runs["two"] if keys.TRAIN_F1 in m]
    assert f1_two == pytest.approx(f1_one, abs=1e-6)  # over the logits of both slices
    for name, tensor in _weights(runs["base"] / "one" / "last.pt").items():
        other = _weights(runs["base"] / "two" / "last.pt")[name]
        assert torch.allclose(tensor.float(), other.float(), rtol=1e-4, atol=1e-6), name
    pool = json.loads((runs["base"] / "two" / "pool" / "pool.json").read_text())
    assert pool["iteration"] == 2  # built once, by rank 0, after step 2


def test_a_two_process_checkpoint_resumes_in_one_process(runs: dict) -> None:
    from cpews.training import train
    from tests.conftest import micro_config

    checkpoint = runs["base"] / "two" / "iter_0000002.pt"
    assert checkpoint.is_file()
    reports: list = []
    out = runs["base"] / "resumed"
    result = train(micro_config(*OVERRIDES), lambda m, d: reports.append(dict(m)), out_dir=out,
                   resume=checkpoint, progress=False)
    assert result.iterations == 4
    resumed, one = _train_losses(reports), _train_losses(runs["one"])
    assert sorted(resumed) == [3, 4]
    for step in resumed:
        for key, value in one[step].items():
            assert resumed[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    for name, tensor in _weights(runs["base"] / "one" / "last.pt").items():
        assert torch.allclose(tensor.float(), _weights(out / "last.pt")[name].float(), rtol=1e-4, atol=1e-6), name


def test_a_global_batch_that_does_not_split_names_the_setting_and_the_workers() -> None:
    assert per_process_batch_size(8, World(1, 2)) == 4
    with pytest.raises(ValueError, match=r"train.batch_size=6 cannot be split over 4 workers"):
        per_process_batch_size(6, World(0, 4))


def test_each_process_reads_its_slice_of_every_global_batch() -> None:
    batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(RankBatchSampler(batches, World(0, 2))) == [[0, 1], [4, 5]]
    assert list(RankBatchSampler(batches, World(1, 2))) == [[2, 3], [6, 7]]


def test_a_single_process_share_is_the_mean_itself() -> None:
    local = torch.tensor(0.25)
    assert BatchSplit().share(local, 7) is local
    assert BatchSplit().share(local, 7, plus_one=True) is local
