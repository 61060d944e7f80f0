"""The checkpoint storage of jobs: a local folder or an object-store URI (`s3://`, `gs://`, ...).

Paths inside it are joined as strings (`posixpath`), never through `os.path.abspath`: a URI means
the same thing from any working directory, and a local path was made absolute once, when the
job's config was localized. Small JSON files (a job's state, its lock) are read and written
through pyarrow's filesystems, as Ray Train writes the checkpoints themselves.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError, first_line


def is_remote(location: str) -> bool:
    """Whether a storage location is object storage (a URI other than `file://`)."""
    return "://" in location and not location.startswith("file://")


class Storage:
    def __init__(self, location: str, *, filesystem: Any = None) -> None:
        """`filesystem`: a pyarrow filesystem to use as object storage for `location` (tests)."""
        self.uri = location
        self.remote = filesystem is not None or is_remote(location)
        if filesystem is not None:
            self._fs, self._root = filesystem, location.split("://", 1)[-1]
        elif self.remote:
            import pyarrow as pa
            from pyarrow import fs

            try:  # a scheme pyarrow has no filesystem for (ftp://), an object store it cannot reach
                self._fs, self._root = fs.FileSystem.from_uri(location)
            except (pa.ArrowException, OSError) as exc:
                raise UserError(f"checkpoint.storage_path: {location}: {first_line(exc)[:300]}") from None
        else:
            self._fs, self._root = None, location.removeprefix("file://")

    def join(self, *parts: str) -> str:
        """A location inside the storage, in the storage's own form (path or URI)."""
        return posixpath.join(self.uri, *parts)

    def local_path(self, *parts: str) -> Path | None:
        """The local folder of a location, or None on object storage."""
        return None if self.remote else Path(self._root, *parts)

    def read_json(self, relative: str) -> Any:
        """The JSON at `relative`, or None when there is none; UserError naming it when it is no JSON."""
        if not self.remote:
            path = Path(self._root, relative)
            if not path.is_file():
                # A folder in its place is no "no record": taken for a first run, whose write then
                # failed naming its own temporary file (.job.json.<random>: Is a directory).
                if path.exists():
                    raise UserError(f"{self.join(relative)}: not a regular file (a folder?); move it aside")
                return None
            data = path.read_bytes()
        else:
            from pyarrow import fs

            path = posixpath.join(self._root, relative)
            kind = self._fs.get_file_info(path).type
            if kind == fs.FileType.Directory:
                raise UserError(f"{self.join(relative)}: not a regular file (a folder?); move it aside")
            if kind != fs.FileType.File:
                return None
            with self._fs.open_input_stream(path) as f:
                data = f.read()
        try:
            return json.loads(data.decode())
        except UnicodeDecodeError:
            raise UserError(f"{self.join(relative)}: not UTF-8 text, so no JSON this program wrote") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.join(relative)}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        except ValueError as exc:  # an integer past Python's 4,300 digits
            raise UserError(f"{self.join(relative)}: not valid JSON ({str(exc)[:80]})") from None
        except RecursionError:  # thousands of nested brackets: past the decoder's stack
            raise UserError(f"{self.join(relative)}: nested too deeply to be JSON this program wrote") from None

    def write_json(self, relative: str, data: Any) -> None:
        """Write `data` at `relative`: under a temporary name and renamed, where that is atomic."""
        payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        if self.remote:
            path = posixpath.join(self._root, relative)
            self._fs.create_dir(posixpath.dirname(path), recursive=True)
            with self._fs.open_output_stream(path) as f:  # an object PUT: all or nothing
                f.write(payload)
            return
        path = Path(self._root, relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary: str | None = None
        try:
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
                temporary = f.name
                f.write(payload)
            os.replace(temporary, path)
        except OSError as exc:  # a full disk, a quota: no half-written file left, the file named
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            raise

    def modified(self, relative: str) -> float | None:
        """When the file at `relative` was last written (seconds since the epoch), or None where
        there is none or the storage does not say."""
        if not self.remote:
            try:
                return Path(self._root, relative).stat().st_mtime
            except OSError:
                return None
        mtime = self._fs.get_file_info(posixpath.join(self._root, relative)).mtime
        return None if mtime is None else mtime.timestamp()

    def delete(self, relative: str) -> None:
        if self.remote:
            self._fs.delete_file(posixpath.join(self._root, relative))
        else:
            Path(self._root, relative).unlink(missing_ok=True)
