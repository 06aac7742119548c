"""Corpus sources: Multi30k (local mirror or upstream, SHA-256 checked), local files,
s3:// objects through boto3 and http(s) URLs, each read as a stream of lines."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import tempfile
import unicodedata
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from automoe.errors import DataError

MULTI30K_URL = "https://github.com/multi30k/dataset/raw/{commit}/data/task1/raw/{name}"
MULTI30K_COMMIT = "a3d2e0d26b56f3846f66a952536ffed4e401d05a"
MULTI30K_SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
MULTI30K_SHA256 = {
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.fr.gz": "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.fr.gz": "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.fr.gz": "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9",
}


class _HashingReader(io.RawIOBase):
    """Reads through to `raw` and hashes every byte as stored (compressed or not)."""

    def __init__(self, raw):
        self.raw, self.sha256 = raw, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha256.update(data)
        return n

    def drain(self) -> None:
        """Hash the bytes nobody read (a run that stops early still records the file's hash)."""
        while chunk := self.raw.read(1 << 20):
            self.sha256.update(chunk)


class LineReader:
    """One corpus file read line by line: gunzipped when it is gzip, UTF-8 decoded (an
    invalid line is named by its number), NFC-normalised and stripped. Memory stays one
    buffer whatever the file's size. `sha256` is the hash of the stored bytes, complete
    once the reader is closed."""

    def __init__(self, uri: str, raw):
        self.uri, self.lines_read = uri, 0
        self._hashing = _HashingReader(raw)
        self._raw = raw
        buffered = io.BufferedReader(self._hashing, 1 << 20)
        try:
            magic = buffered.peek(2)[:2]
        except (OSError, http.client.HTTPException) as exc:
            raw.close()
            raise DataError(f"{uri}: read failed ({exc})") from None
        self._stream = gzip.GzipFile(fileobj=buffered) if magic == b"\x1f\x8b" else buffered
        self.sha256 = ""

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                raw = self._stream.readline()
            except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
                raise DataError(f"{self.uri}: corrupt gzip data after line {self.lines_read} ({exc})") from None
            except (OSError, http.client.HTTPException) as exc:
                raise DataError(f"{self.uri}: read failed after line {self.lines_read} ({exc})") from None
            if not raw:
                return
            self.lines_read += 1
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{self.uri}: line {self.lines_read}: invalid UTF-8 at byte {exc.start}") from None
            yield unicodedata.normalize("NFC", text).strip()

    def close(self) -> None:
        try:
            self._hashing.drain()
        except OSError as exc:
            raise DataError(f"{self.uri}: read failed ({exc})") from None
        finally:
            self._raw.close()
        self.sha256 = self._hashing.sha256.hexdigest()


@contextmanager
def open_lines(uri: str) -> Iterator[LineReader]:
    """A LineReader over a local path, `s3://bucket/key` (downloaded to a temporary file)
    or `http(s)://` URL (streamed); closed, and its hash completed, on leaving."""
    reader = LineReader(uri, _open_raw(uri))
    failed = False
    try:
        yield reader
    except BaseException:
        failed = True
        raise
    finally:
        if failed:
            try:
                reader.close()
            except DataError:
                pass
        else:
            reader.close()


def check_readable(uri: str) -> None:
    """Fail fast on an unknown scheme or a local file that is not there (before hours of
    work on the others)."""
    if "://" in uri and not uri.startswith(("s3://", "http://", "https://")):
        raise DataError(f"{uri}: unknown source scheme (use a path, s3:// or http(s)://)")
    if "://" not in uri:
        path = Path(uri)
        if not path.exists():
            raise DataError(f"{uri}: file not found")
        if path.is_dir():
            raise DataError(f"{uri}: is a folder, expected a text file")


def _open_raw(uri: str):
    """A binary file object for `uri`."""
    if uri.startswith("s3://"):
        return _open_s3(uri)
    if uri.startswith(("http://", "https://")):
        return _open_http(uri)
    if "://" in uri:
        raise DataError(f"{uri}: unknown source scheme (use a path, s3:// or http(s)://)")
    path = Path(uri)
    try:
        return open(path, "rb")  # noqa: SIM115 - closed by LineReader.close
    except FileNotFoundError:
        raise DataError(f"{uri}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{uri}: is a folder, expected a text file") from None
    except OSError as exc:
        raise DataError(f"{uri}: cannot read ({exc.strerror})") from None


def _open_http(uri: str):
    """GET `uri` as a stream; `user:password@` in it is sent as HTTP basic auth (urllib itself does not)."""
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    headers = {}
    if parts.username is not None:
        login = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(login.encode()).decode()
        host = parts.netloc.rsplit("@", 1)[1]
        uri_sent = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    else:
        uri_sent = uri
    try:
        request = urllib.request.Request(uri_sent, headers=headers)  # noqa: S310 - scheme checked above
        return urllib.request.urlopen(request, timeout=60)  # noqa: S310 - closed by LineReader.close
    except urllib.error.HTTPError as exc:
        raise DataError(f"{uri}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"{uri}: download failed ({reason})") from None


def s3_client():
    """A boto3 S3 client configured only from the standard AWS environment
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, profiles)."""
    import boto3
    from botocore.config import Config

    # A fresh session: boto3's default session caches credentials for the process.
    return boto3.session.Session().client(
        "s3",
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60),
    )


def _open_s3(uri: str):
    """Download to an anonymous temporary file, in 1 MiB pieces (memory stays flat)."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise DataError(f"{uri}: expected s3://bucket/key")
    local = tempfile.TemporaryFile()  # noqa: SIM115 - closed by LineReader.close
    try:
        body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        while piece := body.read(1 << 20):
            local.write(piece)
        local.seek(0)
        return local
    except NoCredentialsError:
        local.close()
        raise DataError(f"{uri}: no AWS credentials in the environment") from None
    except ClientError as exc:
        local.close()
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise DataError(f"{uri}: object not found") from None
        if code == "NoSuchBucket":
            raise DataError(f"{uri}: bucket {bucket!r} does not exist") from None
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            raise DataError(f"{uri}: access denied ({code}); check the AWS credentials") from None
        raise DataError(f"{uri}: S3 error {code or exc}") from None
    except BotoCoreError as exc:
        local.close()
        raise DataError(f"{uri}: S3 request failed ({type(exc).__name__})") from None
    except OSError as exc:
        local.close()
        raise DataError(f"{uri}: cannot write its temporary copy ({exc.strerror})") from None


def default_mirror() -> Path | None:
    """`../shared/data/multi30k` beside the project, when it exists."""
    here = Path(__file__).resolve()
    for parent in [Path.cwd(), *here.parents]:
        candidate = parent.parent / "shared" / "data" / "multi30k"
        if (candidate / "SHA256SUMS").is_file():
            return candidate
    return None


def multi30k_uri(split: str, lang: str, mirror: Path | None) -> str:
    name = f"{MULTI30K_SPLITS[split]}.{lang}.gz"
    if name not in MULTI30K_SHA256:
        raise DataError(f"multi30k: no {split} file for language {lang!r} (have en, de, fr)")
    if mirror is not None:
        return str(mirror / name)
    return MULTI30K_URL.format(commit=MULTI30K_COMMIT, name=name)


def verify_multi30k(uri: str, sha256: str) -> None:
    name = uri.rsplit("/", 1)[-1]
    expected = MULTI30K_SHA256[name]
    if sha256 != expected:
        raise DataError(f"{uri}: SHA-256 mismatch (got {sha256[:12]}…, expected {expected[:12]}…)")
