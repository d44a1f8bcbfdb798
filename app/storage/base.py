"""Object storage: the protocol every backend speaks, and the code they share.

Keys are made by the server (`make_key`), never taken from a user, and an object exists under
its key only once its writer has committed: a crash or an error midway leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Protocol
from urllib.parse import quote

READ_CHUNK = 1 << 20

log = logging.getLogger(__name__)


class ObjectNotFound(Exception):
    def __init__(self, key: str):
        super().__init__(f"no stored object under key {key!r}")
        self.key = key


class ChecksumMismatch(ValueError):
    def __init__(self, key: str, expected: str, got: str):
        super().__init__(
            f"object {key!r} is corrupt: expected sha256 {expected}, got {got}; the stored copy "
            "no longer matches what was uploaded, so upload it again"
        )
        self.key, self.expected, self.got = key, expected, got


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ListedObject:
    """A committed object as the store lists it: no sha256 (that is the database's), its last change in UTC."""

    key: str
    size: int
    modified_at: datetime


class ObjectWriter(Protocol):
    """Streams one object in; sha256 and size are computed on the way."""

    key: str
    size: int

    def write(self, data: bytes) -> None: ...
    def commit(self) -> StoredObject: ...
    def abort(self) -> None: ...
    def __enter__(self) -> ObjectWriter: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class Storage(Protocol):
    # expected_size: what the writer expects to write, where known (S3 sizes its parts by it: part_size_for)
    def writer(self, key: str, expected_size: int | None = None) -> ObjectWriter: ...
    def put_file(self, key: str, path: Path) -> StoredObject: ...
    def open(self, key: str, *, start: int = 0, length: int | None = None,
             chunk_size: int = READ_CHUNK) -> Iterator[bytes]: ...  # see StorageBase.open
    def download(self, key: str, path: Path, expected_sha256: str | None = None,
                 progress: Callable[[int], None] | None = None) -> None: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def list(self, prefix: str) -> list[str]: ...
    def list_objects(self, prefix: str = "") -> Iterator[ListedObject]: ...  # committed ones, with size and age
    def presigned_url(self, key: str, expires_s: int, filename: str | None = None) -> str | None: ...
    def abort_stale_writes(self, older_than_s: float) -> int: ...  # uncommitted writes left by dead processes
    def now(self) -> datetime: ...  # the store's own clock, which dates its objects (an age is measured on it)


def storage_out_of_reach(exc: BaseException) -> bool:
    """Whether `exc` (or an error it was raised from or while handling) is storage out of reach for a
    moment: no connection, a timeout, or a server error or "slow down" past boto's own retries, as opposed
    to a request's fault or a bug. botocore is imported only for an error of its own (the local backend
    needs none)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError | TimeoutError):
            return True
        if type(current).__module__.startswith("botocore"):
            import botocore.exceptions as boto

            if isinstance(current, boto.ConnectionError | boto.HTTPClientError):
                return True
            if isinstance(current, boto.ClientError):  # S3 answered, with a server error or "slow down"
                status = current.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if status >= 500 or current.response.get("Error", {}).get("Code") in ("SlowDown", "Throttling"):
                    return True
        current = current.__cause__ or current.__context__
    return False


# What S3 answers a client whose settings are not the store's (another bucket, a key it does not know or that was
# rotated, a secret that does not match, no permission): the process's fault, never a request's or a job's.
REFUSED_CLIENT_CODES = frozenset({"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                  "ExpiredToken", "InvalidToken", "403", "AllAccessDisabled"})


def storage_refuses_this_client(exc: BaseException) -> str | None:
    """The S3 error code where `exc` (or an error it was raised from) is the store refusing this process's own settings
    or credentials (REFUSED_CLIENT_CODES), else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__module__.startswith("botocore"):
            import botocore.exceptions as boto

            if isinstance(current, boto.ClientError):
                code = str(current.response.get("Error", {}).get("Code", ""))
                if code in REFUSED_CLIENT_CODES:
                    return code
        current = current.__cause__ or current.__context__
    return None


def check_span(start: int, length: int | None) -> None:
    if start < 0 or (length is not None and length < 0):
        raise ValueError(f"a read starts at a byte >= 0 and reads >= 0 bytes, got start={start}, length={length}")


def check_key(key: str) -> str:
    """A key is relative and plain, so it can never name something outside the store."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}: use non-empty segments without '.' or '..'")
    return key


def check_prefix(prefix: str) -> str:
    """A prefix is a key, a key's leading part (`team/`) or empty for everything."""
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix


def make_key(team_id: str, kind: str) -> str:
    for name, segment in (("team_id", team_id), ("kind", kind)):
        if not segment or "/" in segment or segment in (".", ".."):
            raise ValueError(f"{name} {segment!r} cannot be a key segment")
    return f"{team_id}/{kind}/{uuid.uuid4().hex}"


def attachment_disposition(filename: str) -> str:
    """Content-Disposition that saves as `filename`; the user's name is kept even when not ASCII."""
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


class WriterBase:
    """Hashing, sizing and the commit/abort lifecycle; a backend supplies the three `_` steps."""

    def __init__(self, key: str):
        self.key = key
        self.size = 0
        self._sha256 = hashlib.sha256()
        self._state = "open"

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _commit(self, sha256: str) -> None:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        if self._state != "open":
            raise ValueError(f"writer for {self.key!r} is already {self._state}")
        self._sha256.update(data)
        self.size += len(data)
        self._write(data)

    def commit(self) -> StoredObject:
        if self._state != "open":
            raise ValueError(f"writer for {self.key!r} is already {self._state}")
        sha256 = self._sha256.hexdigest()
        try:
            self._commit(sha256)
        except BaseException:
            # A failed commit must not leave a temp file or a pending upload behind.
            self.abort()
            raise
        self._state = "committed"
        return StoredObject(self.key, self.size, sha256)

    def abort(self) -> None:
        if self._state != "open":
            return
        self._abort()
        self._state = "aborted"

    def __enter__(self) -> WriterBase:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Leaving the block without a commit, by an error or by forgetting, keeps nothing.
        self.abort()


class StorageBase:
    """Uploads and downloads of whole files, built once on each backend's `writer` and `open`."""

    def writer(self, key: str, expected_size: int | None = None) -> ObjectWriter:
        raise NotImplementedError

    def open(self, key: str, *, start: int = 0, length: int | None = None,
             chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """The object's bytes from `start`, `length` of them (None: to the end), in chunks of at most
        chunk_size, read without reading what comes before `start` (a resumed download of a 140 GB
        archive must not read 126 GB first). Past the end there is nothing: a read stops there.
        A missing key raises ObjectNotFound here, not at the first chunk."""
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        return sorted(listed.key for listed in self.list_objects(prefix))

    def list_objects(self, prefix: str = "") -> Iterator[ListedObject]:
        """Every committed object under `prefix` (a write not yet committed is not one), in no set order,
        read as it goes: a bucket of millions is never held whole."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        # One delete per key, also on S3: its DeleteObjects call requires a checksum header, and
        # S3-compatible stores disagree on which (Content-MD5 or CRC32). A prefix holds few objects here.
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def put_file(self, key: str, path: Path) -> StoredObject:
        with path.open("rb") as src, self.writer(key, expected_size=path.stat().st_size) as writer:
            while chunk := src.read(READ_CHUNK):
                writer.write(chunk)
            return writer.commit()

    def download(self, key: str, path: Path, expected_sha256: str | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        """`progress`, if given, hears the size of each chunk as it lands (a worker reports long downloads
        and may stop one by raising from it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        chunks = self.open(key)
        # The file appears under its name only whole and checked: a reader never sees a partial one.
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        try:
            digest = hashlib.sha256()
            with tmp.open("wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
                    if progress is not None:
                        progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
                raise ChecksumMismatch(key, expected_sha256, digest.hexdigest())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def delete_objects(storage: Storage, keys: list[str]) -> list[str]:
    """Delete objects whose rows are already gone (committed): each one tried, whatever became of the
    others, and a failure (storage out of reach) logged, not raised: the deletion the caller asked for has
    happened, and an object left behind is a stray, which costs storage, not correctness, and which
    `qlora admin sweep-storage` finds (app/operations/storage_sweep.py). Returns the keys left behind."""
    left = []
    for key in keys:
        try:
            storage.delete(key)
        except Exception:  # noqa: BLE001 (each object on its own; the log has why)
            log.exception("could not delete %s; it stays in storage as a stray (qlora admin sweep-storage)", key)
            left.append(key)
    return left


def storage_from_settings(settings) -> Storage:
    url: str = settings.storage_url
    if url.startswith("file://"):
        from app.storage.local import LocalStorage

        root = Path(url.removeprefix("file://"))
        if not root.is_absolute():
            raise ValueError(f"QLORA_STORAGE_URL {url!r} needs an absolute path: file:///abs/path")
        return LocalStorage(root)
    if url.startswith("s3://"):
        # Imported here so the embedded default runs without boto3.
        from app.storage.s3 import S3Storage

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"QLORA_STORAGE_URL {url!r} names no bucket: use s3://bucket[/prefix]")
        return S3Storage(bucket, prefix.strip("/"), endpoint_url=settings.s3_endpoint_url,
                         public_endpoint_url=settings.s3_public_endpoint_url, region=settings.s3_region)
    raise ValueError(f"QLORA_STORAGE_URL must start with file:// or s3://, got {url!r}")
