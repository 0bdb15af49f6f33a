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
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from aimfair_ray import AimfairError

COMPLETE = "_COMPLETE"


def is_uri(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def on_store(path, storage: str):
    """A path Ray gives under ``storage`` (a checkpoint's, without the scheme when it is on an object store) as
    a reader elsewhere can open it: with the store's scheme again. None stays None."""
    if path and is_uri(storage) and not is_uri(path):
        return f"{storage.split('://', 1)[0]}://{str(path).lstrip('/')}"
    return path


def local_path(path: str) -> str:
    """A local path without its ``file://`` prefix."""
    return str(path)[len("file://"):] if str(path).startswith("file://") else str(path)


_STORES: dict = {}  # (scheme, bucket, credentials and endpoint in the environment) -> its filesystem


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem that holds ``path`` and the path in it. A store's filesystem is made once per
    process and bucket (making one may ask the store for the bucket's region): a reader of many files, like
    the data stage reading a dataset on S3, makes it once."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(local_path(path)).absolute())
    scheme, rest = str(path).split("://", 1)
    if "?" in rest:  # options in the URI (endpoint_override=...): as given
        return pafs.FileSystem.from_uri(path)
    bucket = rest.split("/", 1)[0]
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "GCS_"))))
    key = (scheme, bucket, env)
    if key not in _STORES:
        _STORES[key] = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]
    return _STORES[key], rest.rstrip("/")


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def is_complete(directory: str) -> bool:
    return exists(f"{str(directory).rstrip('/')}/{COMPLETE}")


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (``pathlib`` would fold ``s3://`` into ``s3:/``)."""
    return "/".join([str(base).rstrip("/"), *(str(p).strip("/") for p in parts)])


def base_name(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def parent(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[0]


def _entries(directory: str, pattern: str, ftype: pafs.FileType) -> list[str]:
    import fnmatch

    fs, p = filesystem(directory)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    return sorted(join(directory, i.base_name) for i in fs.get_file_info(pafs.FileSelector(p))
                  if i.type == ftype and fnmatch.fnmatch(i.base_name, pattern))


def listdir(directory: str, pattern: str = "*") -> list[str]:
    """The files directly in ``directory`` whose names match ``pattern`` (fnmatch), sorted, as full paths
    (URIs stay URIs); none when the folder does not exist."""
    return _entries(directory, pattern, pafs.FileType.File)


def subdirs(directory: str, pattern: str = "*") -> list[str]:
    """The folders directly in ``directory`` whose names match ``pattern``, sorted, as full paths."""
    return _entries(directory, pattern, pafs.FileType.Directory)


def remove(path: str) -> None:
    """Remove a file, or a folder with everything in it; nothing when it is not there."""
    fs, p = filesystem(path)
    ftype = fs.get_file_info(p).type
    if ftype == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif ftype == pafs.FileType.File:
        fs.delete_file(p)


def make_dir(path: str) -> None:
    fs, p = filesystem(path)
    fs.create_dir(p, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def append_line(path: str, line: str) -> None:
    """One line appended to a small text file (a log): in place locally; read and written whole on an
    object store, which has no append."""
    if is_uri(path):
        old = read_text(path) if exists(path) else ""
        atomic_write_text(path, old + line + "\n")
        return
    Path(local_path(path)).parent.mkdir(parents=True, exist_ok=True)
    with open(local_path(path), "a") as f:
        f.write(line + "\n")


def made_with(path: str, key, field: str | None = None) -> dict | None:
    """The one "reuse if it matches" test every stage's output goes through: the JSON record at ``path`` (the
    key file a stage writes with its output, on any storage) when it holds ``key`` (as a whole, or at
    ``field``), compared as JSON reads it back; None when the record is missing or was made with another
    key. The stage then reuses its output, or redoes it (refuses, when asked to keep it)."""
    if not exists(path):
        return None
    record = read_json(path)
    have = record if field is None else (record or {}).get(field)
    return record if have == json.loads(json.dumps(key, default=str)) else None


def open_file(path: str):
    """A seekable binary file on any storage (for pandas, PIL): ``with open_file(p) as f``."""
    fs, p = filesystem(path)
    return fs.open_input_file(p)


def resolve(base_file: str, path: str) -> str:
    """``path`` as written in the file ``base_file`` (a manifest): absolute paths and URIs as they are,
    relative ones against the folder that holds ``base_file``, on the same storage."""
    path = str(path)
    if is_uri(path) or path.startswith("/"):
        return path
    return join(parent(absolute(base_file)), path)


def absolute(path: str) -> str:
    """A local path made absolute (symlinks resolved); a URI as it is."""
    return str(path) if is_uri(path) else str(Path(local_path(path)).resolve())


def stat(path: str) -> dict:
    """A file's size and modification time (what a reuse key of a user's file holds); one line when missing."""
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type != pafs.FileType.File:
        raise AimfairError(f"{path} does not exist (or is not a file): check the path or URI")
    return {"size": info.size, "mtime_ns": info.mtime_ns}


def files_under(directory: str, suffix: str = "") -> list[str]:
    """Every file below ``directory`` (recursively) whose name ends with ``suffix``, sorted, as full paths:
    one listing, on any storage."""
    fs, root = filesystem(directory)
    return sorted(join(directory, rel) for rel in published_files(fs, root) if rel.endswith(suffix))


def missing_files(paths) -> list[str]:
    """Those of ``paths`` that are not files. Files on a store are checked by listing each folder once
    (not one request per file: a dataset may hold 200,000 images)."""
    paths = [str(p) for p in paths]
    local = [p for p in paths if not is_uri(p)]
    gone = {p for p in local if not Path(local_path(p)).is_file()}
    folders: dict[str, set] = {}
    for p in paths:
        if is_uri(p) and parent(p) not in folders:
            folders[parent(p)] = set(listdir(parent(p)))
    gone |= {p for p in paths if is_uri(p) and p not in folders[parent(p)]}
    return [p for p in paths if p in gone]


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
def atomic_dir(directory: str, direct: bool = False) -> Iterator[str]:
    """Yield a place to write a whole directory; publish it only if the block succeeds.

    A previous complete directory at the same place is replaced; a failed write leaves
    no trace at the final path. On an object store the block writes to a temporary folder on
    this node (local file APIs work there); once it succeeds, the old objects go, the new ones
    are uploaded and ``_COMPLETE`` is written last, so a reader sees the whole output or none.
    ``direct``: the block writes to the store itself (Ray Data write tasks on any node).
    """
    directory = str(directory).rstrip("/")
    if is_uri(directory):
        if direct:
            remove(directory)
            yield directory
            atomic_write_text(f"{directory}/{COMPLETE}", "")
            return
        staging = Path(tempfile.mkdtemp(prefix="aimfair-stage-"))
        try:
            yield str(staging)
            remove(directory)
            upload_dir(str(staging), directory)
            atomic_write_text(f"{directory}/{COMPLETE}", "")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
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


def upload_dir(src: str, dst: str) -> int:
    """Every file under the local folder ``src`` to ``dst`` (a URI), ``_COMPLETE`` left out; returns how many."""
    n = 0
    for p in sorted(Path(src).rglob("*")):
        if p.is_file() and p.name != COMPLETE:
            atomic_write_bytes(join(dst, str(p.relative_to(src))), p.read_bytes())
            n += 1
    return n


def cache_root() -> Path:
    """This node's cache of outputs read from an object store (``AIMFAIR_CACHE``, default ~/.cache/aimfair/store):
    never a place another node reads."""
    return Path(os.environ.get("AIMFAIR_CACHE", Path.home() / ".cache" / "aimfair" / "store"))


def work_dir(uri: str) -> str:
    """A node-local folder that stands for ``uri`` while this process appends to files there (logs), synced
    to the store with :func:`upload_dir`; a local path is its own."""
    if not is_uri(uri):
        return local_path(uri)
    return str(cache_root().parent / "work" / uri.replace("://", "/", 1))


def local_copy(directory: str, skip: tuple[str, ...] = ()) -> str:
    """A local folder holding ``directory``'s files: the folder itself when it is local; for an output on an
    object store, a copy in this node's cache (:func:`cache_root`), keyed by the sha256 of its manifest
    (``_manifest.json``, which lists its files' sha256; of its listing, names, sizes and times, where it has
    none) and its URI, fetched once per content and whole (into a temporary folder, then
    renamed). A reader on any node calls this; nothing is assumed of another node's disk. ``skip``: top
    folders and file suffixes left out (a report reads a run's records, not its shards or weights)."""
    import hashlib

    if not is_uri(directory):
        return local_path(directory)
    fs, root = filesystem(directory)
    files = {rel: i for rel, i in published_files(fs, root).items()
             if rel.split("/", 1)[0] not in skip and not rel.endswith(tuple(x for x in skip if x.startswith(".")))}
    if not files:
        raise AimfairError(f"nothing at {directory}: run the stage that writes it first (or check the URI)")
    if "_manifest.json" in files:  # what the output holds, by its files' sha256 (manifest.py)
        content = read_bytes(f"{directory.rstrip('/')}/_manifest.json")
    else:
        content = json.dumps(sorted((rel, i.size, i.mtime_ns) for rel, i in files.items()), default=str).encode()
    key = hashlib.sha256(content + directory.rstrip("/").encode() + repr(skip).encode()).hexdigest()[:32]
    final = cache_root() / key
    if final.is_dir():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{key}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        for rel in files:
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{root}/{rel}") as f:
                out.write_bytes(f.read())
        try:
            os.replace(tmp, final)
        except OSError:  # another process of this node fetched it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
