"""CPM in the trainer (method.md §6.1, §8.1-§8.2): the build schedule, the loss weights, a short run that builds
the pool at step 2, the checkpoint source, and the errors."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from cpews.config import TrainConfig, load_config
from cpews.data import read_split_ids
from cpews.model import build_model
from cpews.prototypes import POOL_KEYS, Pool, load_pool, save_pool
from cpews.training import TrainHooks, TrainState, keys, load_checkpoint, train
from cpews.training.data import DATA_DIR_ENV, resolve_data_root
from cpews.training.prototype_hooks import (
    STAT_PDL_PAIRS,
    STAT_PDL_RMS_NEG,
    STAT_PDL_RMS_POS,
    STAT_SSL_TOKENS,
    PrototypeModule,
    build_model_pool,
    pdl_weight,
    pool_build_iterations,
    pool_from_checkpoint,
    prototype_hooks,
    ssl_weight,
)
from cpews.training.step import StepContext, compute_losses

RUN_OVERRIDES = (
    "data.synthetic_train=48",
    "data.synthetic_val=16",
    "data.num_workers=0",
    "train.device=cpu",
    "proto.build_iter=2",
    "proto.resize=64",
    "proto.num_prototypes=3",
    "optim.max_iters=4",
)
NUM_CLASSES = 6  # synthetic dataset


def _config(*overrides: str) -> TrainConfig:
    return load_config("test_micro", (*RUN_OVERRIDES, *overrides))


# ------------------------------------------------------------------------------------------------------------
# Schedule and weights (pure).
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "n_builds", "expected"),
    [
        ("warmup", 0, []),
        ("warmup", 1, [4000]),
        ("warmup", 2, [4000, 12000]),  # spacing (20000 - 4000) // 2 = 8000
        ("warmup", 5, [4000, 7200, 10400, 13600, 16800]),  # spacing 16000 // 5 = 3200
        ("checkpoint", 0, []),
        ("checkpoint", 1, [0]),
        ("checkpoint", 2, [0, 10000]),
        ("checkpoint", 5, [0, 4000, 8000, 12000, 16000]),
    ],
)
def test_pool_build_iterations(source, n_builds, expected):
    cfg = load_config(None, [f"proto.source={source}", f"proto.n_builds={n_builds}", "proto.checkpoint=x.pt"])
    assert cfg.proto.build_iter == 4000 and cfg.optim.max_iters == 20000
    assert pool_build_iterations(cfg) == expected


def test_pool_build_iterations_edge_cases():
    # build_iter at or after the end: never built; more builds than steps left: merged
    assert pool_build_iterations(load_config(None, ["proto.build_iter=20000"])) == []
    assert pool_build_iterations(load_config(None, ["optim.max_iters=4002", "proto.n_builds=5"])) == [4000]
    assert pool_build_iterations(load_config(None, ["optim.max_iters=4010", "proto.n_builds=5"])) == [
        4000,
        4002,
        4004,
        4006,
        4008,
    ]


def test_weights_switch_on_at_the_first_build():
    cfg = load_config(None, [])
    assert pdl_weight(cfg, 3999) == 0.0 and ssl_weight(cfg, 3999) == 0.0
    assert pdl_weight(cfg, 4000) == cfg.loss.pdl_weight == 0.12
    assert ssl_weight(cfg, 19999) == cfg.loss.ssl_weight == 1.5e-4
    off = load_config(None, ["proto.n_builds=0"])
    assert pdl_weight(off, 10**6) == 0.0 and ssl_weight(off, 10**6) == 0.0
    from_checkpoint = load_config(None, ["proto.source=checkpoint", "proto.checkpoint=x.pt"])
    assert pdl_weight(from_checkpoint, 0) == 0.12


def test_checkpoint_source_needs_a_checkpoint():
    with pytest.raises(ValueError, match="proto.checkpoint"):
        prototype_hooks(load_config(None, ["proto.source=checkpoint"]))


# ------------------------------------------------------------------------------------------------------------
# A short run (4 steps, pool built after step 2, log every 2).
# ------------------------------------------------------------------------------------------------------------


class PoolRun(NamedTuple):
    cfg: TrainConfig
    reports: list
    out_dir: Path
    model: torch.nn.Module
    module: PrototypeModule
    data_root: Path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    previous = os.environ.get(DATA_DIR_ENV)
    os.environ[DATA_DIR_ENV] = str(tmp_path_factory.mktemp("cpm_data"))
    try:
        yield resolve_data_root(_config())
    finally:
        if previous is None:
            os.environ.pop(DATA_DIR_ENV, None)
        else:
            os.environ[DATA_DIR_ENV] = previous


@pytest.fixture(scope="module")
def pool_run(data_dir, tmp_path_factory) -> PoolRun:
    cfg = _config()
    module = PrototypeModule(cfg, progress=None)
    hooks = module.hooks()
    captured = {}
    reports: list = []
    out_dir = tmp_path_factory.mktemp("cpm_run") / "run"
    train(
        cfg,
        lambda metrics, checkpoint_dir: reports.append(dict(metrics)),
        out_dir=out_dir,
        hooks=TrainHooks(
            extra_terms=hooks.extra_terms,
            after_step=(*hooks.after_step, lambda state: captured.setdefault("model", state.model)),
        ),
        progress=False,
    )
    return PoolRun(cfg, reports, out_dir, captured["model"], module, data_dir)


def test_run_builds_the_pool_at_step_two(pool_run):
    folder = pool_run.out_dir / "pool"
    names = {p.name for p in folder.iterdir()}
    assert {
        "pool.pt",
        "pool.json",
        "pool.png",
        "pool_it0000002.pt",
        "pool_it0000002.json",
        "pool_it0000002.png",
    } <= names
    assert (folder / "pool.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pool = load_pool(folder / "pool.pt")
    assert pool.meta == json.loads((folder / "pool.json").read_text())
    assert pool.meta["iteration"] == 2 and pool.meta["num_images"] == 48 and pool.meta["source"] == "warmup"
    assert pool.meta["split"] == pool_run.cfg.data.train_split and pool.meta["resize"] == 64
    model = pool_run.model
    assert bool(model.pool_ready)
    for key in POOL_KEYS:  # the installed buffers are the saved pool
        assert torch.equal(getattr(model, f"pool_{key}"), pool.tensors[key]), key
    k = pool_run.cfg.proto.num_prototypes
    assert pool.tensors["pos"].shape == (NUM_CLASSES, k, model.backbone.embed_dim)
    t = pool.tensors
    assert (t["pos_n"] <= k).all() and (t["neg_ss_n"] <= t["neg_n"]).all() and (t["neg_n"] <= k).all()
    # the checkpoint carries the pool
    state = load_checkpoint(pool_run.out_dir / "last.pt").model
    assert bool(state["pool_ready"]) and torch.equal(state["pool_pos"], t["pos"])


def test_prototype_losses_reported_after_the_build_only(pool_run):
    train_reports = [m for m in pool_run.reports if keys.TRAIN_LOSS in m]
    assert [m[keys.TRAIN_ITERATION] for m in train_reports] == [2.0, 4.0]
    # iterations 0-1 (window ending at step 2): no pool yet; iterations 2-3: PDL and SSL active
    assert keys.TRAIN_LOSS_PDL not in train_reports[0] and keys.TRAIN_LOSS_SSL not in train_reports[0]
    assert keys.TRAIN_LOSS_PDL in train_reports[1] and keys.TRAIN_LOSS_SSL in train_reports[1]
    assert math.isfinite(train_reports[1][keys.TRAIN_LOSS_PDL]) and train_reports[1][keys.TRAIN_LOSS_PDL] >= 0
    assert math.isfinite(train_reports[1][keys.TRAIN_LOSS_SSL])
    stats = pool_run.module.last_stats
    assert {STAT_PDL_RMS_POS, STAT_PDL_RMS_NEG, STAT_PDL_PAIRS, STAT_SSL_TOKENS} <= set(stats)
    if stats[STAT_PDL_PAIRS] > 0:
        assert math.isfinite(float(stats[STAT_PDL_RMS_POS])) and float(stats[STAT_PDL_RMS_NEG]) > 0


def test_checkpoint_source_loads_the_weights_then_builds(pool_run, tmp_path):
    checkpoint = pool_run.out_dir / "last.pt"
    # K may differ from the checkpoint's: its pool buffers are not loaded
    cfg = _config("proto.source=checkpoint", f"proto.checkpoint={checkpoint}", "proto.num_prototypes=2")
    torch.manual_seed(1)
    model = build_model(cfg, num_classes=NUM_CLASSES)
    module = PrototypeModule(cfg, progress=None)
    assert module.builds == [0]
    module.before_training(TrainState(cfg, model, 0, pool_run.data_root, None, tmp_path))
    saved = load_checkpoint(checkpoint).model
    for name, value in model.state_dict().items():
        if not name.startswith("pool_"):
            assert torch.equal(value, saved[name]), name
    assert bool(model.pool_ready) and model.pool_pos.shape[1] == 2
    pool = load_pool(tmp_path / "pool" / "pool_it0000000.pt")
    assert pool.meta["checkpoint"] == str(checkpoint) and pool.meta["checkpoint_iteration"] == 4
    assert torch.equal(model.pool_neg, pool.tensors["neg"])


def test_checkpoint_of_another_architecture_is_refused(pool_run, tmp_path):
    cfg = _config(
        "proto.source=checkpoint", f"proto.checkpoint={pool_run.out_dir / 'last.pt'}", "model.depth=3"
    )
    model = build_model(cfg, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="model.depth"):
        pool_from_checkpoint(cfg, model, data_root=pool_run.data_root, out_dir=tmp_path, progress=None)


def test_losses_without_a_pool_fail_clearly(pool_run):
    # source=checkpoint makes the terms active from iteration 0; without the before_training build there is
    # no pool in the model
    cfg = _config("proto.source=checkpoint", "proto.checkpoint=unused.pt")
    model = build_model(cfg, num_classes=NUM_CLASSES)
    batch = {
        "image": torch.randn(2, 3, 64, 64),
        "labels": torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0]]),
        "box": torch.tensor([[0, 64, 0, 64]] * 2),
    }
    hooks = prototype_hooks(cfg, progress=None)
    with pytest.raises(RuntimeError, match="no pool"):
        compute_losses(model, batch, cfg, 0, extra_terms=hooks.extra_terms)


def test_warmup_build_at_step_zero(pool_run, tmp_path):
    cfg = _config("proto.build_iter=0")
    model = build_model(cfg, num_classes=NUM_CLASSES)
    module = PrototypeModule(cfg, progress=None)
    module.after_step(TrainState(cfg, model, 1, pool_run.data_root, None, tmp_path))  # not a build step
    assert not bool(model.pool_ready)
    module.before_training(
        TrainState(
            cfg,
            model,
            0,
            pool_run.data_root,
            read_split_ids(pool_run.data_root, cfg.data.dataset, cfg.data.train_split)[:10],
            tmp_path,
        )
    )
    assert bool(model.pool_ready)
    assert load_pool(tmp_path / "pool" / "pool.pt").meta["num_images"] == 10  # the train_ids subset


# ------------------------------------------------------------------------------------------------------------
# Through `train(...)` with the trainer's `before_training` hook and `StepContext.stats` (skipped until the
# trainer offers them).
# ------------------------------------------------------------------------------------------------------------

needs_trainer_hooks = pytest.mark.skipif(
    "before_training" not in TrainHooks._fields
    or "stats" not in getattr(StepContext, "__dataclass_fields__", {}),
    reason="needs TrainHooks.before_training and StepContext.stats in the trainer",
)


@needs_trainer_hooks
def test_train_from_checkpoint_source_reports_prototype_stats(pool_run, tmp_path):
    cfg = _config(
        "proto.source=checkpoint", f"proto.checkpoint={pool_run.out_dir / 'last.pt'}", "optim.max_iters=2"
    )
    reports: list = []
    train(
        cfg,
        lambda m, d: reports.append(dict(m)),
        out_dir=tmp_path,
        hooks=prototype_hooks(cfg, progress=None),
        progress=False,
    )
    assert (tmp_path / "pool" / "pool_it0000000.pt").is_file() and (tmp_path / "pool" / "pool.pt").is_file()
    (first,) = [m for m in reports if keys.TRAIN_LOSS in m]
    # the pool exists before iteration 0: PDL and SSL act from the first window on
    assert keys.TRAIN_LOSS_PDL in first and keys.TRAIN_LOSS_SSL in first
    assert first[keys.TRAIN_PDL_PAIRS] >= 0 and first[keys.TRAIN_SSL_TOKENS] >= 0
    if first[keys.TRAIN_PDL_PAIRS] > 0:
        assert first[keys.TRAIN_PDL_RMS_POS] > 0 and first[keys.TRAIN_PDL_RMS_NEG] > 0


def test_pool_cache_hit_when_images_model_and_settings_match(data_dir, tmp_path):
    """Two identical runs share one cached pool (content key); another pool setting misses."""
    cache = tmp_path / "cache"
    messages: list[str] = []
    runs = {}
    for name, extra in (("first", ()), ("second", ()), ("other_k", ("proto.num_prototypes=2",))):
        cfg = _config(f"proto.cache_dir={cache}", *extra)
        train(
            cfg,
            lambda metrics, checkpoint_dir: None,
            out_dir=tmp_path / name,
            hooks=PrototypeModule(cfg, progress=messages.append).hooks(),
            progress=False,
        )
        runs[name] = load_pool(tmp_path / name / "pool" / "pool.pt")
    cache_lines = [m for m in messages if m.startswith("pool cache:")]
    assert [line.split()[2] for line in cache_lines] == ["miss,", "hit", "miss,"]
    assert len(list(cache.glob("*.pt"))) == 2
    assert runs["second"].meta["cache"] == "hit"
    assert runs["first"].meta["content_key"] == runs["second"].meta["content_key"] != runs["other_k"].meta["content_key"]
    for key in POOL_KEYS:
        assert torch.equal(runs["first"].tensors[key], runs["second"].tensors[key])


# ------------------------------------------------------------------------------------------------------------
# A pool cache entry that cannot be trusted: reported, moved aside, rebuilt.
# ------------------------------------------------------------------------------------------------------------


class CacheCase(NamedTuple):
    cfg: TrainConfig
    model: torch.nn.Module
    data_root: Path
    entry: Path  # the cache file of this model, images and settings
    pool: Pool  # the pool it holds (built once)


def _cache_build(case: CacheCase, messages: list[str] | None = None) -> Pool:
    return build_model_pool(case.cfg, case.model, data_root=case.data_root, train_ids=None, out_dir=None,
                            iteration=2, progress=None if messages is None else messages.append)


@pytest.fixture
def cache_case(data_dir, tmp_path) -> CacheCase:
    cfg = _config(f"proto.cache_dir={tmp_path / 'cache'}")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=NUM_CLASSES)
    pool = build_model_pool(cfg, model, data_root=data_dir, train_ids=None, out_dir=None, iteration=2, progress=None)
    (entry,) = (tmp_path / "cache").glob("*.pt")
    assert entry.name == f"{pool.meta['content_key']}.pt" and pool.meta["cache"] == "miss"
    return CacheCase(cfg, model, data_dir, entry, pool)


def _rebuilt(case: CacheCase, capfd, what: str) -> str:
    """Build again over the bad entry: one warning naming it and `what`; the pool is the right one, rebuilt and
    stored; the bad file lies beside it as `<name>.bad-<time>`; the next build is a hit. Returns the warning."""
    capfd.readouterr()
    messages: list[str] = []
    pool = _cache_build(case, messages)
    (warning,) = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert warning.startswith(f"cpews: warning: pool cache: prototype pool {str(case.entry)!r}"), warning
    assert what in warning and warning.endswith(", building the pool again"), warning
    (aside,) = case.entry.parent.glob(f"{case.entry.name}.bad-*")
    assert f"moved aside to {aside.name!r}" in warning
    assert pool.meta["cache"] == "miss" and [m.split()[2] for m in messages if m.startswith("pool cache:")] == ["miss,"]
    for key in POOL_KEYS:
        assert torch.equal(pool.tensors[key], case.pool.tensors[key]), key
        assert torch.equal(case.model.pool()[key], case.pool.tensors[key]), key  # installed in the model
    assert load_pool(case.entry).meta["content_key"] == case.pool.meta["content_key"]
    assert _cache_build(case).meta["cache"] == "hit"
    return warning


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated ("),
        (lambda p: p.write_bytes(bytes(range(256)) * 8), "not a PyTorch file"),
        (lambda p: p.write_bytes(b""), "empty file"),
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_a_damaged_cache_entry_is_moved_aside_and_rebuilt(cache_case, capfd, damage, what):
    damage(cache_case.entry)
    damaged = cache_case.entry.read_bytes()
    _rebuilt(cache_case, capfd, what)
    (aside,) = cache_case.entry.parent.glob(f"{cache_case.entry.name}.bad-*")
    assert aside.read_bytes() == damaged  # kept as it was, for a look, with its meta beside it
    assert aside.with_name(aside.name.replace(".pt.bad-", ".json.bad-")).is_file()


def test_a_pool_of_another_content_key_is_not_used(cache_case, data_dir, tmp_path, capfd):
    """A valid pool of the same shapes (another k-means seed) stored under this key's name: refused, rebuilt."""
    other_cfg = _config(f"proto.cache_dir={tmp_path / 'other'}", "proto.kmeans_seed=7")
    other = build_model_pool(other_cfg, cache_case.model, data_root=data_dir, train_ids=None, out_dir=None,
                             iteration=2, progress=None)
    assert other.meta["content_key"] != cache_case.pool.meta["content_key"]
    assert all(other.tensors[k].shape == cache_case.pool.tensors[k].shape for k in POOL_KEYS)
    (other_entry,) = (tmp_path / "other").glob("*.pt")
    shutil.copyfile(other_entry, cache_case.entry)
    warning = _rebuilt(cache_case, capfd, f"holds content key {other.meta['content_key'][:16]}..., not the expected")
    assert cache_case.pool.meta["content_key"][:16] in warning


def test_a_pool_of_another_shape_is_not_a_hit(cache_case, capfd):
    """The right content key, but tensors of 2 prototypes where the model's pool holds 3."""
    pool = load_pool(cache_case.entry)
    save_pool(cache_case.entry, Pool({k: v[:, :2] if v.dim() > 1 else v for k, v in pool.tensors.items()}, pool.meta))
    _rebuilt(cache_case, capfd, "tensor 'pos' has shape (6, 2, ")


def test_a_tensor_that_disagrees_with_its_recorded_shape_is_damaged(cache_case, capfd):
    payload = torch.load(cache_case.entry, weights_only=True)
    payload["tensors"]["neg"] = payload["tensors"]["neg"][:, :1]
    torch.save(payload, cache_case.entry)
    _rebuilt(cache_case, capfd, "is damaged: tensor 'neg' has shape (6, 1, ")


@pytest.mark.integration
def test_a_bad_pool_on_s3_is_replaced_and_a_bad_local_copy_is_fetched_again(data_dir, tmp_path, monkeypatch, capfd):
    """Against moto's S3 server on 127.0.0.1: garbage stored in the bucket is reported, rebuilt and replaced there;
    a damaged local copy of a good remote entry is fetched again (a hit, nothing rebuilt)."""
    import boto3

    from cpews.data.remote import local_cache_dir
    from orchestration.services import moto_s3

    server = moto_s3(tmp_path / "moto")
    server.start()
    try:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{server.port}",
                            DATA_DIR_ENV: str(tmp_path / "local")}.items():
            monkeypatch.setenv(name, value)
        client = boto3.client("s3")
        client.create_bucket(Bucket="pools")
        cfg = _config("proto.cache_dir=s3://pools/cpm")
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=NUM_CLASSES)

        def build(messages: list[str]) -> Pool:
            return build_model_pool(cfg, model, data_root=data_dir, train_ids=None, out_dir=None, iteration=2,
                                    progress=messages.append)

        first = build([])
        key = f"cpm/{first.meta['content_key']}.pt"
        remote = f"s3://pools/{key}"
        local = local_cache_dir() / "pools" / f"{first.meta['content_key']}.pt"
        # garbage in the bucket, nothing on this machine: fetched, refused, rebuilt, and replaced in the bucket
        client.put_object(Bucket="pools", Key=key, Body=bytes(range(256)) * 8)
        shutil.rmtree(local_cache_dir())
        capfd.readouterr()
        messages: list[str] = []
        second = build(messages)
        (warning,) = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
        assert warning.startswith(f"cpews: warning: pool cache: prototype pool {str(local)!r}: not a PyTorch file")
        assert f"(a copy of {remote}); moved aside to " in warning and warning.endswith(", building the pool again")
        assert second.meta["cache"] == "miss" and any(m == f"pool cache: miss, stored {remote}" for m in messages)
        replaced = client.get_object(Bucket="pools", Key=key)["Body"].read()
        assert replaced == local.read_bytes() and load_pool(local).meta["content_key"] == first.meta["content_key"]
        # a truncated local copy of the good entry: fetched again, a hit
        local.write_bytes(local.read_bytes()[:100])
        messages = []
        third = build(messages)
        (warning,) = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
        assert "truncated (100 bytes" in warning and warning.endswith(", fetching it again")
        assert third.meta["cache"] == "hit" and messages == [f"pool cache: hit {remote}"]
        for name in POOL_KEYS:
            assert torch.equal(third.tensors[name], first.tensors[name])
    finally:
        server.stop()
