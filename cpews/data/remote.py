"""Data and caches on S3 (or an S3-compatible store): `s3://bucket/prefix` locations, through boto3.

A dataset at `data.root = s3://bucket/prefix` is copied once per machine into a local cache
(`$CPEWS_DATA_DIR/s3/<bucket>/<prefix>`, default `~/.cache/cpews/s3/...`) and read from there; trials on the same
machine wait for the one copy (a file lock) and later ones find the finished copy (a marker file). The prototype
pool cache (`proto.cache_dir`) may be an `s3://` prefix too, so trials on different machines share pools by
content key.

boto3 finds credentials and the endpoint the usual way (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an
instance role; `AWS_ENDPOINT_URL_S3` for an S3-compatible server). Missing credentials, a missing bucket, a
refused access or an empty prefix are `RemoteDataError`s that name the location.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["RemoteDataError", "SyncResult", "download_if_exists", "is_s3", "local_cache_dir", "parse_s3",
           "sync_prefix", "upload"]

SYNC_MARKER = ".cpews_s3_sync.json"


class RemoteDataError(ValueError):
    """An s3:// location cannot be read or written; the message names it and says why."""


class SyncResult(NamedTuple):
    path: Path  # the local copy
    downloaded: int  # objects fetched by this call (0: the copy was already complete)


def is_s3(location: str | os.PathLike | None) -> bool:
    return isinstance(location, str) and location.startswith("s3://")


def parse_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b") (no trailing slash).

    Raises:
        RemoteDataError: not an s3:// URI with a bucket.
    """
    if not is_s3(uri) or not uri[5:].split("/", 1)[0]:
        raise RemoteDataError(f"{uri!r} is not an s3://bucket/prefix location")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def local_cache_dir() -> Path:
    """Where s3:// data is copied: `$CPEWS_DATA_DIR/s3`, else `~/.cache/cpews/s3`."""
    base = os.environ.get("CPEWS_DATA_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "cpews") / "s3"


def _client() -> Any:
    """A client of a new session: credentials and endpoint are looked up now, not cached from an earlier call."""
    import boto3

    return boto3.session.Session().client("s3")


@contextlib.contextmanager
def _errors(uri: str, action: str) -> Iterator[None]:
    """Turn boto3's credential and access errors into RemoteDataErrors naming `uri`."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise RemoteDataError(
            f"{uri}: cannot {action}: no AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "a profile (AWS_PROFILE) or an instance role"
        ) from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404"):
            raise RemoteDataError(f"{uri}: cannot {action}: bucket {parse_s3(uri)[0]!r} does not exist") from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise RemoteDataError(f"{uri}: cannot {action}: access denied ({code}); check the credentials") from None
        raise RemoteDataError(f"{uri}: cannot {action}: {exc}") from None
    except BotoCoreError as exc:  # endpoint unreachable, ...
        raise RemoteDataError(f"{uri}: cannot {action}: {exc}") from None


def _list(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
    return [obj for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]


def _download(client: Any, bucket: str, key: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        client.download_file(bucket, key, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sync_prefix(uri: str, cache: Path | None = None) -> SyncResult:
    """Copy every object under `uri` into `cache/<bucket>/<prefix>` once; later calls return the copy.

    Concurrent callers on one machine wait for each other (a lock file); a copy cut short is completed by the
    next call (the marker is written last). Objects already present with the right size are not fetched again.
    """
    bucket, prefix = parse_s3(uri)
    dest = (cache or local_cache_dir()) / bucket / prefix
    dest.mkdir(parents=True, exist_ok=True)
    if (dest / SYNC_MARKER).is_file():
        return SyncResult(dest, 0)
    with open(dest.parent / f".{dest.name or bucket}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / SYNC_MARKER).is_file():  # another process finished it while we waited
            return SyncResult(dest, 0)
        client = _client()
        with _errors(uri, "list the dataset"):
            objects = _list(client, bucket, prefix)
        if not objects:
            raise RemoteDataError(f"{uri}: no objects under this prefix (is the dataset uploaded there?)")
        fetched = 0
        with _errors(uri, "download the dataset"):
            for obj in objects:
                relative = obj["Key"][len(prefix) + 1 :] if prefix else obj["Key"]
                target = dest / relative
                if target.is_file() and target.stat().st_size == obj["Size"]:
                    continue
                _download(client, bucket, obj["Key"], target)
                fetched += 1
        marker = {"source": uri, "objects": len(objects), "bytes": sum(o["Size"] for o in objects)}
        (dest / SYNC_MARKER).write_text(json.dumps(marker))
        return SyncResult(dest, fetched)


def download_if_exists(uri: str, dest: Path) -> bool:
    """Fetch object `uri` to `dest` (atomically); False when there is no such object."""
    from botocore.exceptions import ClientError

    bucket, key = parse_s3(uri)
    client = _client()
    with _errors(uri, "read the cache"):
        try:
            client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        _download(client, bucket, key, Path(dest))
    return True


def upload(path: Path, uri: str) -> None:
    """Put a local file at object `uri`."""
    bucket, key = parse_s3(uri)
    with _errors(uri, "write the cache"):
        _client().upload_file(str(path), bucket, key)
