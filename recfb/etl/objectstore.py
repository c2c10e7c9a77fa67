"""Inputs in an object store (`s3://bucket/events/*.parquet`, `gs://...`): listed with
fsspec (the `s3` extra installs s3fs; gcsfs or adlfs serve their schemes the same way), read
by Polars' own cloud readers, opened through fsspec where a reader needs the bytes (a
malformed CSV or JSONL file's slow path, a header check).

Credentials and endpoints come from the environment, as every AWS tool takes them
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` for an
S3-compatible store, `AWS_ALLOW_HTTP=true` for one without TLS): both fsspec and Polars read
them, so one setting serves the listing and the reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, Any

from recfb.errors import InputError

_URI = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
LOCAL_SCHEMES = ("file",)
_GLOB = re.compile(r"[*?\[]")


def is_object_uri(spec: Any) -> bool:
    """True for a URI with a scheme other than `file://` and the database logs' schemes."""
    if not isinstance(spec, str):
        return False
    match = _URI.match(spec)
    return bool(match) and match.group(1).lower() not in (
        *LOCAL_SCHEMES,
        "postgresql",
        "postgres",
    )


@dataclass(frozen=True)
class ObjectFile:
    """One object of an object store, by its URI: what the readers need of a path."""

    uri: str

    def __str__(self) -> str:
        return self.uri

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.uri.split("://", 1)[1]).suffix

    @property
    def name(self) -> str:
        return PurePosixPath(self.uri.split("://", 1)[1]).name

    def open(self, mode: str = "rb") -> IO[bytes]:
        fs, path = _filesystem(self.uri)
        return fs.open(path, mode)

    def fingerprint(self) -> tuple[str, int, str]:
        """(URI, size, version): the store's ETag (or modification time) changes when the
        object is rewritten, so a pipeline runs its ETL again exactly then."""
        fs, path = _filesystem(self.uri)
        info = fs.info(path)
        version = info.get("ETag") or info.get("etag") or info.get("LastModified") or ""
        return self.uri, int(info.get("size") or 0), str(version)


def _filesystem(uri: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ModuleNotFoundError as exc:  # pragma: no cover - fsspec ships with the core deps
        raise ModuleNotFoundError("object-store inputs need fsspec", name="fsspec") from exc
    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        scheme = uri.split("://", 1)[0]
        hint = " (pip install 'recfb[s3]')" if scheme in ("s3", "s3a") else ""
        raise InputError(
            f"cannot open the '{scheme}://' object store: {exc}{hint}", file=uri
        ) from exc


def list_objects(spec: str, suffixes: tuple[str, ...]) -> list[ObjectFile]:
    """The objects `spec` names: one object, a glob (`*`, `?`, `[...]`, `**`), or a prefix
    (every object under it with one of `suffixes`), sorted by URI."""
    fs, path = _filesystem(spec)
    scheme = spec.split("://", 1)[0]
    fs.invalidate_cache()  # fsspec keeps listings: a scheduled pipeline must see new objects
    try:
        if _GLOB.search(path):
            found = [p for p in fs.glob(path) if fs.isfile(p)]
            what = "no object matches the glob"
        elif fs.isfile(path):
            found = [path]
            what = ""
        else:
            found = [p for p in fs.find(path) if PurePosixPath(p).suffix.lower() in suffixes]
            what = "no parquet/csv/jsonl object under the prefix"
    except Exception as exc:  # the store's own words: no bucket, denied, no credentials
        raise InputError(
            f"cannot list the object store: {type(exc).__name__}: {exc}", file=spec
        ) from exc
    if not found:
        raise InputError(what or "no such object", file=spec)
    return [ObjectFile(f"{scheme}://{p.split('://', 1)[-1]}") for p in sorted(found)]
