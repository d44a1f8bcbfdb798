"""A directory as object storage: the embedded default, and what a single machine needs."""

from __future__ import annotations

import os
import stat
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from app.storage.base import (
    READ_CHUNK,
    ListedObject,
    ObjectNotFound,
    StorageBase,
    WriterBase,
    check_key,
    check_prefix,
    check_span,
)
from worker.training.protocol import fsync_dir

# Writes land here first; on the same filesystem as the objects, so a commit is one rename.
TMP_DIR = ".tmp"


class LocalWriter(WriterBase):
    def __init__(self, key: str, tmp_path: Path, final_path: Path):
        super().__init__(key)
        self._tmp_path = tmp_path
        self._final_path = final_path
        self._file = tmp_path.open("xb")

    def _write(self, data: bytes) -> None:
        self._file.write(data)

    def _commit(self, sha256: str) -> None:
        # fsync before the rename: after a crash the key holds the whole object or nothing.
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._final_path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp_path, self._final_path)
        # The rename itself survives a crash only once the directory is synced.
        fsync_dir(self._final_path.parent)

    def _abort(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # its buffer could not be flushed (a full disk): the file is closed all the same
        # Removed even then: a full disk is where a partial object's bytes matter most.
        self._tmp_path.unlink(missing_ok=True)


class LocalStorage(StorageBase):
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / TMP_DIR).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if check_key(key).split("/")[0] == TMP_DIR:
            raise ValueError(f"invalid storage key {key!r}: {TMP_DIR}/ holds uncommitted writes")
        return self.root / key

    def writer(self, key: str, expected_size: int | None = None) -> LocalWriter:  # a file takes any size
        return LocalWriter(key, self.root / TMP_DIR / uuid.uuid4().hex, self._path(key))

    def open(self, key: str, *, start: int = 0, length: int | None = None,
             chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        check_span(start, length)
        # Opened now, not on the first chunk, so a missing key fails where open() is called.
        try:
            f = self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        f.seek(start)  # past the end is allowed: the reads then find nothing
        return self._read(f, length, chunk_size)

    @staticmethod
    def _read(f, length: int | None, chunk_size: int) -> Iterator[bytes]:
        left = sys.maxsize if length is None else length
        with f:
            while left and (chunk := f.read(min(chunk_size, left))):
                left -= len(chunk)
                yield chunk

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.stat().st_size

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list_objects(self, prefix: str = "") -> Iterator[ListedObject]:
        # The files a writer renamed into place: never its temp files under TMP_DIR, never a symbolic link
        # (the service writes none). A file's mtime is its last write, which a commit's rename keeps.
        # Prefixes match like S3's, as plain string prefixes; the walk starts at the deepest directory the
        # prefix names so listing one team never walks every team.
        start = self.root / check_prefix(prefix).rpartition("/")[0]
        for dirpath, dirnames, filenames in os.walk(start):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if d != TMP_DIR]
            for name in filenames:
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    status = path.lstat()
                except FileNotFoundError:
                    continue  # deleted meanwhile
                if stat.S_ISREG(status.st_mode):
                    yield ListedObject(key, status.st_size, datetime.fromtimestamp(status.st_mtime, UTC))

    def presigned_url(self, key: str, expires_s: int, filename: str | None = None) -> str | None:
        # No URL can serve a local file; the API streams it instead.
        self._path(key)
        return None

    def now(self) -> datetime:
        """The filesystem's clock, as it dates a file written now: a probe file's mtime. That is this host's clock
        on a local disk, and the file server's on a network filesystem, where the files' mtimes come from it."""
        probe = self.root / TMP_DIR / f"clock-{uuid.uuid4().hex}"
        try:
            probe.touch()
            try:
                return datetime.fromtimestamp(probe.stat().st_mtime, UTC)
            finally:
                probe.unlink(missing_ok=True)
        except OSError:  # a full disk refuses even this: this host's clock, which a local disk's files have too
            return datetime.now(UTC)

    def abort_stale_writes(self, older_than_s: float) -> int:
        """Delete temp files of writes nobody finished: a process died between open and commit. Their ages are
        the filesystem's (now()), as their mtimes are."""
        cutoff = self.now().timestamp() - older_than_s
        removed = 0
        for path in (self.root / TMP_DIR).iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # committed or aborted meanwhile
        return removed
