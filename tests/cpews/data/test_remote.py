"""s3:// datasets and pool caches against a real S3-compatible server on 127.0.0.1 (moto's standalone server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from orchestration.services import moto_s3

    server = moto_s3(tmp_path_factory.mktemp("moto"))
    server.start()
    endpoint = f"http://127.0.0.1:{server.port}"
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """boto3 pointed at the server (test credentials), a fresh bucket, and the local cache under tmp_path."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("CPEWS_DATA_DIR", str(tmp_path / "cache"))
    client = boto3.client("s3")
    bucket = f"cpews-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def upload_tree(client, bucket: str, root: Path, prefix: str) -> set[str]:
    names = set()
    for path in root.rglob("*"):
        if path.is_file():
            name = path.relative_to(root).as_posix()
            client.upload_file(str(path), bucket, f"{prefix}/{name}")
            names.add(name)
    return names


def test_an_s3_dataset_is_copied_once_and_trains_like_the_local_one(s3, synthetic_data_dir: Path) -> None:
    from cpews.config import load_config
    from cpews.data.remote import SYNC_MARKER, sync_prefix
    from cpews.training.data import eval_dataset, resolve_data_root

    client, bucket = s3
    names = upload_tree(client, bucket, synthetic_data_dir, "datasets/syn")
    first = sync_prefix(f"s3://{bucket}/datasets/syn")
    assert first.downloaded == len(names)
    copied = {p.relative_to(first.path).as_posix() for p in first.path.rglob("*") if p.is_file()} - {SYNC_MARKER}
    assert copied == names
    for name in list(names)[:20]:
        assert (first.path / name).read_bytes() == (synthetic_data_dir / name).read_bytes()
    assert sync_prefix(f"s3://{bucket}/datasets/syn") == (first.path, 0)  # once per machine

    cfg = load_config("test_micro", [f"data.root=s3://{bucket}/datasets/syn"])
    root = resolve_data_root(cfg)
    assert root == first.path
    local = eval_dataset(cfg, synthetic_data_dir)
    remote = eval_dataset(cfg, root)
    assert len(remote) == len(local) and remote[0]["labels"].tolist() == local[0]["labels"].tolist()


def test_s3_errors_name_the_location(s3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cpews.data.remote import RemoteDataError, sync_prefix

    _, bucket = s3
    with pytest.raises(RemoteDataError, match="bucket 'no-such-bucket' does not exist"):
        sync_prefix("s3://no-such-bucket/data")
    with pytest.raises(RemoteDataError, match=f"s3://{bucket}/empty: no objects under this prefix"):
        sync_prefix(f"s3://{bucket}/empty")
    with pytest.raises(RemoteDataError, match="is not an s3://bucket/prefix location"):
        sync_prefix("s3:///nobucket")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(RemoteDataError, match=f"s3://{bucket}/data: cannot list the dataset: no AWS credentials"):
        sync_prefix(f"s3://{bucket}/data")


def test_pool_cache_on_s3_is_shared_by_content_key(s3, synthetic_data_dir: Path, tmp_path: Path) -> None:
    """A pool built on one machine is found by another (an empty local cache) through the bucket."""
    import shutil

    import torch

    from cpews.config import load_config
    from cpews.data.remote import local_cache_dir
    from cpews.model import build_model
    from cpews.training.prototype_hooks import build_model_pool

    client, bucket = s3
    cfg = load_config("test_micro", [f"proto.cache_dir=s3://{bucket}/pools"])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=6)
    messages: list[str] = []
    first = build_model_pool(cfg, model, data_root=synthetic_data_dir, train_ids=None, out_dir=None, iteration=1,
                             progress=messages.append)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="pools/").get("Contents", [])]
    assert keys == [f"pools/{first.meta['content_key']}.pt"]
    shutil.rmtree(local_cache_dir())  # "another machine": nothing cached locally
    second = build_model_pool(cfg, model, data_root=synthetic_data_dir, train_ids=None, out_dir=None, iteration=1,
                              progress=messages.append)
    assert (first.meta["cache"], second.meta["cache"]) == ("miss", "hit")
    assert [m.split()[2] for m in messages if m.startswith("pool cache:")] == ["miss,", "hit"]
    for name, tensor in first.tensors.items():
        assert torch.equal(tensor, second.tensors[name])


def test_pretrained_backbone_is_shared_through_the_bucket(s3, synthetic_data_dir: Path):
    """A backbone pretrained on one machine is fetched, not trained again, by another (an empty local cache)."""
    import shutil

    import torch

    from cpews.config import load_config
    from cpews.data.remote import local_cache_dir
    from cpews.training.pretrain import ensure_pretrained

    client, bucket = s3
    cfg = load_config("test_micro", ["model.weights=synthetic", "pretrain.images=16", "pretrain.val_images=8",
                                     "pretrain.iters=2", "pretrain.cls_iters=1", "pretrain.pool_iter=0", "pretrain.batch_size=8",
                                     f"pretrain.cache_dir=s3://{bucket}/pretrained"])
    first = ensure_pretrained(cfg)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="pretrained/")["Contents"])
    assert keys == [f"pretrained/{first.key}.json", f"pretrained/{first.key}.pt"]
    saved = torch.load(first.path, weights_only=True)
    shutil.rmtree(local_cache_dir() / "pretrained")  # "another machine"
    second = ensure_pretrained(cfg)
    assert (first.cached, second.cached) == (False, True) and second.meta["key"] == first.key
    fetched = torch.load(second.path, weights_only=True)
    assert saved.keys() == fetched.keys() and all(torch.equal(saved[k], fetched[k]) for k in saved)
