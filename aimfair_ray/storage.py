"""Where outputs go: local paths or URIs (s3://, gs://) through pyarrow filesystems.

Nothing is half-written. Local writes go to a temporary sibling, then are renamed into
place. Object stores have no rename: there the data is written in place and a
``_COMPLETE`` marker is written last, and readers look for that marker.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

COMPLETE = "_COMPLETE"


def is_uri(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str) -> str:
    """A local path without its ``file://`` prefix."""
    return str(path)[len("file://"):] if str(path).startswith("file://") else str(path)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(local_path(path)).absolute())


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_complete(directory: str) -> bool:
    return exists(f"{str(directory).rstrip('/')}/{COMPLETE}")


def read_text(path: str) -> str:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write a whole file or object: a temporary file renamed into place (local), one upload (URI)."""
    if is_uri(path):
        fs, p = filesystem(path)
        with fs.open_output_stream(p) as f:  # object stores publish a whole object at close
            f.write(data)
        return
    p = Path(local_path(path))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, p)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str):
    return json.loads(read_text(path))


@contextmanager
def atomic_dir(directory: str) -> Iterator[str]:
    """Yield a place to write a whole directory; publish it only if the block succeeds.

    A previous complete directory at the same place is replaced; a failed write leaves
    no trace at the final path.
    """
    directory = str(directory).rstrip("/")
    if is_uri(directory):
        fs, p = filesystem(directory)
        if fs.get_file_info(p).type != pafs.FileType.NotFound:
            fs.delete_dir(p)
        yield directory
        atomic_write_text(f"{directory}/{COMPLETE}", "")
        return
    final = Path(local_path(directory))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield str(tmp)
        (tmp / COMPLETE).touch()
        if final.exists():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---- publishing a run to storage_uri ----------------------------------------------------------
def _files(fs: pafs.FileSystem, root: str) -> dict[str, pafs.FileInfo]:
    """Files under ``root`` by relative path, leaving out unpublished temporaries (``.x.tmp-*``, ``.x.old-*``)."""
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return {}
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = info.path[len(root):].lstrip("/")
        if info.type == pafs.FileType.File and not any(
                p.startswith(".") and (".tmp-" in p or ".old-" in p) for p in rel.split("/")):
            out[rel] = info
    return out


def sync_dir(src: str, dst: str, update: bool = True) -> int:
    """Copy the files of ``src`` that ``dst`` lacks (with ``update``: or holds older or at another
    size); returns how many.

    Each file is written whole (a temporary renamed into place, or one object upload), and the
    ``_COMPLETE`` markers go last, so a reader of ``dst`` never sees a directory as complete
    before its files are there. Files that only ``dst`` has are kept.
    """
    sfs, sp = filesystem(src)
    dfs, dp = filesystem(dst)
    have = _files(dfs, dp)
    todo = [rel for rel, info in _files(sfs, sp).items()
            if rel not in have or (update and (have[rel].size != info.size or info.mtime > have[rel].mtime))]
    for rel in sorted(todo, key=lambda r: r.rsplit("/", 1)[-1] == COMPLETE):
        with sfs.open_input_stream(f"{sp}/{rel}") as f:
            atomic_write_bytes(f"{dst.rstrip('/')}/{rel}", f.read())
    return len(todo)


def run_uri(cfg) -> str:
    return f"{cfg.storage_uri.rstrip('/')}/{cfg.name}"


def push_run(cfg) -> int:
    """Publish the run dir (``<output_dir>/<name>``) to ``<storage_uri>/<name>``."""
    return sync_dir(cfg.run_dir, run_uri(cfg))


def pull_run(cfg) -> int:
    """Fetch the files the local run dir lacks from ``<storage_uri>/<name>`` (a fresh node resumes
    a run); local files are never overwritten."""
    return sync_dir(run_uri(cfg), cfg.run_dir, update=False) if exists(run_uri(cfg)) else 0
