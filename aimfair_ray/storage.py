"""Where outputs go: local paths or URIs (s3://, gs://) through pyarrow filesystems.

Nothing is half-written. Local writes go to a temporary sibling, then are renamed into
place. Object stores have no rename: there the data is written in place and a
``_COMPLETE`` marker is written last, and readers look for that marker.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from aimfair_ray import AimfairError

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


def _no_space(e: BaseException) -> bool:
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e)


def _full(path: str) -> AimfairError:
    return AimfairError(f"no space left on the device writing {path}: free some space or set output_dir elsewhere, then "
                        "rerun (what was there before is intact)")


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
    try:
        tmp.write_bytes(data)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if _no_space(e):
            raise _full(str(p)) from None
        raise
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
        try:
            yield str(tmp)
            (tmp / COMPLETE).touch()
        except Exception as e:  # noqa: BLE001 - a full disk is said in one line; the rest as it is
            if _no_space(e):
                raise _full(str(final)) from None
            raise
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
# A run is published entry by entry (each top-level folder or file of the run dir: data, synthetic,
# baseline, ray, logs, ...). An entry's files go under a fresh version, <uri>/<name>/_versions/<entry>/<v>/,
# and its pointer, <uri>/<name>/_pointers/<entry>.json (one object, written last), then names that
# version: a reader follows the pointer and sees the old version or the new one, never a mix, and
# files that only an old version had are gone with it.
VERSIONS, POINTERS = "_versions", "_pointers"


def published_files(fs: pafs.FileSystem, root: str) -> dict[str, pafs.FileInfo]:
    """Files under ``root`` by relative path, leaving out unpublished temporaries (``.x.tmp-*``, ``.x.old-*``)."""
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return {}
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = info.path[len(root):].lstrip("/")
        if info.type == pafs.FileType.File and not any(
                p.startswith(".") and (".tmp-" in p or ".old-" in p) for p in rel.split("/")) and not rel.endswith(".tmp"):
            out[rel] = info
    return out


def _copy(src: str, dst: str) -> None:
    sfs, sp = filesystem(src)
    with sfs.open_input_stream(sp) as f:
        atomic_write_bytes(dst, f.read())


def _pointer(store: str, entry: str) -> dict | None:
    path = f"{store}/{POINTERS}/{entry}.json"
    return read_json(path) if exists(path) else None


def publish(src: str, store: str) -> int:
    """Publish each entry of the folder ``src`` whose files changed (by size and time) to ``store``, as a
    new version; returns how many files were uploaded (files an entry's last version already holds are
    copied inside the store)."""
    sfs, sp = filesystem(src)
    dfs, dp = filesystem(store)
    entries: dict[str, dict] = {}
    for rel, info in published_files(sfs, sp).items():
        entries.setdefault(rel.split("/", 1)[0], {})[rel] = [info.size, info.mtime_ns]
    uploaded = 0
    for entry, listing in sorted(entries.items()):
        old = _pointer(store, entry)
        if old and old["listing"] == listing:
            continue
        version = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"  # sorts by time
        for rel in sorted(listing):
            if old and old["listing"].get(rel) == listing[rel]:  # unchanged: copied inside the store
                to = f"{dp}/{VERSIONS}/{entry}/{version}/{rel}"
                dfs.create_dir(to.rsplit("/", 1)[0], recursive=True)
                dfs.copy_file(f"{dp}/{VERSIONS}/{entry}/{old['version']}/{rel}", to)
            else:
                _copy(f"{sp}/{rel}", f"{store}/{VERSIONS}/{entry}/{version}/{rel}")
                uploaded += 1
        write_json(f"{store}/{POINTERS}/{entry}.json", {"version": version, "listing": listing})
        # the version the pointer named before, and any older one (a killed publish's); a newer one may be
        # another publisher's, still writing
        for info in dfs.get_file_info(pafs.FileSelector(f"{dp}/{VERSIONS}/{entry}")) if old else []:
            if info.base_name != version and info.base_name <= old["version"]:
                dfs.delete_dir(info.path)
    return uploaded


def fetch(store: str, dst: str) -> int:
    """Fetch each published entry of ``store`` that the folder ``dst`` lacks (local entries are never
    overwritten), whole: into a temporary folder, then renamed into place. Returns how many files."""
    dfs, dp = filesystem(store)
    if dfs.get_file_info(f"{dp}/{POINTERS}").type != pafs.FileType.Directory:
        return 0
    n = 0
    for info in dfs.get_file_info(pafs.FileSelector(f"{dp}/{POINTERS}")):
        entry = info.base_name[:-len(".json")]
        final = Path(local_path(dst)) / entry
        if final.exists():
            continue
        ptr = read_json(f"{store}/{POINTERS}/{info.base_name}")
        tmp = final.with_name(f".{entry}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            for rel, (_, mtime_ns) in ptr["listing"].items():
                out = tmp / rel.split("/", 1)[1] if "/" in rel else tmp  # a folder's file, or the entry is a file
                out.parent.mkdir(parents=True, exist_ok=True)
                _copy(f"{store}/{VERSIONS}/{entry}/{ptr['version']}/{rel}", str(out))
                os.utime(out, ns=(mtime_ns, mtime_ns))  # the published time: an unchanged entry is not published again
                n += 1
            os.replace(tmp, final)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            tmp.unlink(missing_ok=True)
    return n


def run_uri(cfg) -> str:
    return f"{cfg.storage_uri.rstrip('/')}/{cfg.name}"


def push_run(cfg) -> int:
    """Publish the run dir (``<output_dir>/<name>``) to ``<storage_uri>/<name>``."""
    return publish(cfg.run_dir, run_uri(cfg))


def pull_run(cfg) -> int:
    """Fetch the entries the local run dir lacks from ``<storage_uri>/<name>`` (a fresh node resumes
    a run); local entries are never overwritten."""
    return fetch(run_uri(cfg), cfg.run_dir)
