"""Credentials out of everything recorded: a URL's `user:password@` and the values of its
query string (presigned S3 URLs carry their signature, key id and session token there) are
replaced by `***` in MLflow params, tags and run names, the data manifest, error lines and
logs. The URL still says which host and file it was."""

from __future__ import annotations

import re
from typing import Any

HIDDEN = "***"
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_PARTS = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/?#]*)(.*)$", re.S)


def redact_url(url: str) -> str:
    """`url` without its userinfo and query values (the query's keys stay), otherwise as
    written (no re-encoding)."""
    parts = _PARTS.match(url)
    if parts is None:
        return url
    scheme, netloc, rest = parts.groups()
    if "@" in netloc:
        netloc = f"{HIDDEN}@{netloc.rsplit('@', 1)[1]}"
    path, mark, query = rest.partition("?")
    if mark:
        query, hash_mark, fragment = query.partition("#")
        keys = (p.partition("=") for p in query.split("&"))
        query = "&".join(f"{key}={HIDDEN}" if sep else key for key, sep, _ in keys)
        rest = f"{path}?{query}{hash_mark}{fragment}"
    return scheme + netloc + rest


def redact(text: str) -> str:
    """Every URL inside `text` redacted (the rest of the text, and punctuation right after
    a URL, as it is)."""
    if "://" not in text:
        return text

    def one(m: re.Match) -> str:
        url = m.group(0)
        trail = len(url) - len(url.rstrip(".,:;)]"))
        return redact_url(url[: len(url) - trail]) + url[len(url) - trail :]

    return _URL.sub(one, text)


def redact_all(obj: Any) -> Any:
    """`obj` (dicts, lists and strings, nested) with every string and key redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_all(k): redact_all(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact_all(v) for v in obj)
    return obj
