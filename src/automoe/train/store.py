"""The durable run store: an S3 prefix that outlives the pod, for checkpoints and search state.

On Kubeflow a task's outputs stay on its pod until the task succeeds, so a retry (a fresh
pod) would start a multi-day training from update 0, and the nodes of a multi-node job share
no folder. With `AUTOMOE_RUN_STORE=s3://bucket/prefix` (the pipeline sets it from
`pipeline.run_store`, by default under its S3 pipeline root):

- every checkpoint is uploaded as soon as it is written, and pruned there as it is locally;
- the key is the pipeline run (`KFP_RUN_ID`; `local` outside Kubeflow), the stage and the
  digest of its identity (config, data, arch: the same identity that decides a local
  resume), so only a run of the same work ever resumes from it;
- before training, one process per node downloads what the store holds into a local cache
  outside the output folder (`AUTOMOE_SCRATCH`, else the temp folder): a retried task and
  every node resume from rank 0's newest checkpoint;
- checkpoints then stay out of the output artifact: it holds the final weights only.

Without the variable nothing changes: checkpoints live in the output folder (DVC persists
them). Credentials and the endpoint come from the standard AWS environment, as for S3
corpora (data/sources.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automoe.errors import ConfigError, DataError

ENV = "AUTOMOE_RUN_STORE"
SCRATCH_ENV = "AUTOMOE_SCRATCH"


@dataclass(frozen=True)
class RunStore:
    bucket: str
    prefix: str  # no leading or trailing slash

    @classmethod
    def from_env(cls, stage: str, identity: Callable[[], dict[str, Any]]) -> RunStore | None:
        """The store of this stage's work, or None when AUTOMOE_RUN_STORE is unset (then
        `identity` is not computed: it may hash a large file)."""
        uri = os.environ.get(ENV, "").strip()
        if not uri:
            return None
        bucket, root = split_uri(uri, ENV)
        run = os.environ.get("KFP_RUN_ID", "").strip() or "local"
        digest = hashlib.sha256(json.dumps(identity(), sort_keys=True, default=str).encode()).hexdigest()[:16]
        return cls(bucket, "/".join(p for p in (root, run, stage, digest) if p))

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def cache(self) -> Path:
        """This work's local folder, outside any output folder (the same on every process of a node)."""
        root = Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir())
        return root / "automoe-runs" / self.prefix.replace("/", "_")

    def _client(self):
        from automoe.data.sources import s3_client

        return s3_client()

    def names(self) -> list[str]:
        """File names the store holds for this work."""
        return sorted(key.rsplit("/", 1)[1] for key in self._call("list", lambda c: _keys(c, self.bucket, self.prefix)))

    def pull(self, folder: Path) -> list[str]:
        """Download every file the store holds that `folder` lacks (atomically: temp + rename)."""
        fetched = []
        for name in self.names():
            if not (folder / name).exists():
                key, path = f"{self.prefix}/{name}", folder / name
                self._call(f"download {name}", lambda c, k=key, p=path: _download(c, self.bucket, k, p))
                fetched.append(name)
        return fetched

    def push(self, path: Path) -> None:
        """Upload one file under its name (S3 replaces an object whole: a reader never sees half)."""
        key = f"{self.prefix}/{path.name}"
        self._call(f"upload {path.name}", lambda c: c.upload_file(str(path), self.bucket, key))

    def keep_only(self, names: set[str], pattern) -> None:
        """Delete the store's files that match `pattern` (a compiled regex) but are not in `names`."""
        for name in self.names():
            if pattern.search(name) and name not in names:
                key = f"{self.prefix}/{name}"
                self._call(f"delete {name}", lambda c, k=key: c.delete_object(Bucket=self.bucket, Key=k))

    def _call(self, what: str, fn):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(self._client())
        except (BotoCoreError, ClientError) as exc:
            raise DataError(f"run store {self.uri}: {what} failed ({type(exc).__name__}: {exc})") from None


def split_uri(uri: str, what: str = "") -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, prefix without slashes at its ends)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise ConfigError(f"{what + '=' if what else ''}{uri}: expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def _keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _download(client, bucket: str, key: str, path: Path) -> None:
    """One object to `path`, atomically (temp file beside it, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        client.download_file(bucket, key, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def sync(source: str, target: str) -> int:
    """Copy a folder to an S3 prefix or an S3 prefix to a folder, recursively (files only,
    each written atomically on the local side); returns the number of files copied. What a
    multi-node TrainJob uses to take its input artifact and hand its output back."""
    from automoe.data.sources import s3_client

    client = s3_client()
    if source.startswith("s3://") and not target.startswith("s3://"):
        bucket, prefix = split_uri(source)
        keys = _keys(client, bucket, prefix)
        if not keys:
            raise DataError(f"{source}: nothing there")
        for key in keys:
            _download(client, bucket, key, Path(target) / key[len(prefix) + 1 :])
        return len(keys)
    if target.startswith("s3://") and not source.startswith("s3://"):
        bucket, prefix = split_uri(target)
        files = [p for p in sorted(Path(source).rglob("*")) if p.is_file()]
        if not files:
            raise DataError(f"{source}: no files to copy")
        for path in files:
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(source).as_posix()}")
        return len(files)
    raise ConfigError(f"sync {source} {target}: one side must be s3://, the other a folder")
