"""Where files live: local paths or fsspec URLs (`s3://`, `gs://`, `az://`, `file://`), one API.

Every stage takes a workdir, a dataset or a folder as a path or a URL. `as_path` turns either into
a path object - `pathlib.Path` for local files, a `upath.UPath` (universal-pathlib, over fsspec)
for object storage - with the same `/`, `name`, `parent`, `exists`, `is_file`, `iterdir`,
`read_text`, `open` that the stages use. Credentials and endpoints come from each library's
standard environment (for S3: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, profiles, instance roles),
never from files in the project.

Writes never leave half a file under the real name: `replacing` writes beside and renames
locally, and on object storage writes a local temporary file and uploads it in one PUT (an object
appears whole or not at all). Libraries that need a real file (nibabel, torch) get one from
`local_file` or write through `replacing`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Union

try:  # universal-pathlib: only needed (and imported) for URLs
    from upath import UPath
except ImportError:  # pragma: no cover - a dependency; kept optional for tools that read local files only
    UPath = None  # type: ignore[assignment,misc]

AnyPath = Union[Path, "UPath"]

# Other processes (Dask workers, Ray workers) write into the same bucket while this one reads it: a
# cached listing would hide their files (a finished case, a model), so listings are never cached.
STORAGE_OPTIONS = {"use_listings_cache": False}


def is_url(path: object) -> bool:
    """True for an fsspec URL other than file:// (those are local paths)."""
    if UPath is not None and isinstance(path, UPath) and not isinstance(path, Path):
        return True
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    return "://" in text and not text.startswith("file://")


def as_path(path: str | os.PathLike) -> AnyPath:
    """A local `Path` (file:// stripped, ~ expanded) or a `UPath` for a URL; path objects pass through."""
    if is_url(path):
        if UPath is not None and isinstance(path, UPath):
            return path
        if UPath is None:
            raise RuntimeError(f"{path}: object storage needs universal-pathlib (pip install universal-pathlib)")
        return UPath(str(path), **STORAGE_OPTIONS)
    if isinstance(path, Path):
        return path
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return Path(text).expanduser()


def absolute(path: str | os.PathLike) -> AnyPath:
    """`as_path`, made absolute when local (workers may run in another folder or on another machine)."""
    p = as_path(path)
    return p if is_url(p) else p.absolute()


def url_of(path: str | os.PathLike) -> str:
    """The string other libraries take: an absolute local path, or the URL."""
    p = as_path(path)
    return str(p) if is_url(p) else str(p.absolute())


def inside(root: AnyPath, path: AnyPath) -> bool:
    """True when `path` stays inside `root`: symlinks resolved locally; on object storage (which has
    no links) the key, with any `..` resolved, must start with the root's."""
    if is_url(root) or is_url(path):
        if not (is_url(root) and is_url(path)) or type(root) is not type(path):
            return False
        norm = lambda p: PurePosixPath(os.path.normpath("/" + as_path(p).path.strip("/")))  # noqa: E731
        r, q = norm(root), norm(path)
        return q == r or r in q.parents
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def size_of(path: AnyPath) -> int:
    return path.fs.size(path.path) if is_url(path) else os.path.getsize(path)


def stat(path: str | os.PathLike) -> tuple[int, int]:
    """(size in bytes, modification time in ns); on object storage the object's LastModified."""
    p = as_path(path)
    if not is_url(p):
        st = os.stat(p)
        return st.st_size, st.st_mtime_ns
    info = p.fs.info(p.path)
    when = info.get("LastModified") or info.get("mtime") or info.get("last_modified") or info.get("updated")
    if hasattr(when, "timestamp"):
        when = when.timestamp()
    elif isinstance(when, str):
        from datetime import datetime

        when = datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    return int(info["size"]), int(float(when or 0) * 1e9)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary local path to write; on success it becomes `path` (renamed locally,
    uploaded in one piece to object storage), on failure it is removed. `suffix` is for writers
    that infer the format from the name (nibabel's .nii.gz)."""
    target = as_path(path)
    if is_url(target):
        with tempfile.TemporaryDirectory(prefix="segpipe-upload-") as tmpdir:
            tmp = Path(tmpdir) / f"{target.name}{suffix}"
            yield tmp
            target.fs.put_file(str(tmp), target.path)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def local_file(path: str | os.PathLike, suffix: str = "", siblings: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local file with `path`'s content for libraries that need one: the file itself when local,
    a temporary download (removed afterwards) from object storage. A folder (a DICOM series) is
    downloaded whole; `siblings` names files beside `path` that its reader opens too (the data
    file of a `.mhd` header), downloaded beside it."""
    source = as_path(path)
    if not is_url(source):
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="segpipe-download-") as tmpdir:
        tmp = Path(tmpdir) / f"{source.name}{suffix}"
        if source.is_dir():
            tmp.mkdir()
            for entry in source.fs.ls(source.path, detail=True):
                if entry.get("type") == "file":
                    source.fs.get_file(entry["name"], str(tmp / entry["name"].rstrip("/").rsplit("/", 1)[-1]))
        else:
            source.fs.get_file(source.path, str(tmp))
        for name in siblings:
            sibling = source.parent / name
            source.fs.get_file(sibling.path, str(Path(tmpdir) / name))
        yield tmp


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append to a text file (a log). Object storage cannot append: the object is rewritten whole,
    which is fine for the small logs this is for."""
    p = as_path(path)
    if is_url(p):
        before = p.read_text() if p.exists() else ""
        write_text_atomic(p, before + text)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a") as f:
        f.write(text)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike) or (UPath is not None and isinstance(obj, UPath)):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """JSON (numpy scalars and arrays as plain numbers), written under a temporary name, then renamed."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy one file between any two places (server-side within one object store)."""
    s, d = as_path(src), as_path(dst)
    if is_url(s) and is_url(d) and type(s) is type(d):
        s.fs.copy(s.path, d.path)
    elif is_url(d) or is_url(s):
        with local_file(s) as local, replacing(d) as tmp:
            shutil.copyfile(local, tmp)
    else:
        with replacing(d) as tmp:
            shutil.copyfile(s, tmp)


def link(target: str | os.PathLike, name: str | os.PathLike) -> None:
    """Make `name` show `target`'s content: a symlink on a local filesystem (a stale one is
    re-pointed), a copy (server-side within one object store) where links do not exist."""
    t, n = as_path(target), as_path(name)
    if is_url(n) or is_url(t):
        if not n.exists():
            copy_file(t, n)
        return
    if n.is_symlink() and not n.exists():
        n.unlink()  # the target moved since: point at where it is now
    if not n.exists():
        os.symlink(os.path.realpath(t), n)


def remove_tree(path: str | os.PathLike) -> None:
    p = as_path(path)
    if is_url(p):
        if p.exists():
            p.fs.rm(p.path, recursive=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename a file or folder (on object storage: copy every object, then delete the originals)."""
    s, d = as_path(src), as_path(dst)
    if is_url(s):
        s.fs.mv(s.path, d.path, recursive=True)
    else:
        s.rename(d)
