"""What a finished output holds, in its ``_manifest.json`` (written last): its files with sizes and
sha256, its rows per cell, and the fingerprint of the config and inputs that made it.

``verify`` is what "reusing" means: the files match the manifest, nothing is missing, and no shard or
weights file is there that the manifest does not list (one left from another run would be read
with the rest; a picture added later, like ``samples.png``, is no data). A damaged output is a
one-line :class:`AimfairError` naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow.fs as pafs

from aimfair_ray import AimfairError
from aimfair_ray.storage import COMPLETE, exists, filesystem, is_uri, published_files, read_json, write_json

MANIFEST = "_manifest.json"  # "_": Parquet readers of the folder skip it, as _COMPLETE
DERIVED = ("samples.png",)  # drawn from the data after it is written (and again on a rerun): not listed
READ = (".parquet", ".safetensors")  # files a reader picks up by their suffix: none may be there unlisted
_VERIFIED: dict = {}  # (folder, its files' sizes and times) -> manifest: each folder is hashed once per process


def digest(obj) -> str:
    """The sha256 of a JSON-able value (sorted keys): a config's or a plan's fingerprint."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: str) -> str:
    fs, p = filesystem(path)
    h = hashlib.sha256()
    with fs.open_input_stream(p) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _listing(directory: str) -> dict[str, pafs.FileInfo]:
    fs, root = filesystem(directory)
    skip = (MANIFEST, COMPLETE, *DERIVED)
    return {rel: info for rel, info in published_files(fs, root).items() if rel.rsplit("/", 1)[-1] not in skip}


def write(directory: str, fingerprint: str | None = None, rows: dict | None = None, redo: str | None = None) -> dict:
    """Write ``directory``'s manifest (call it when every other file is in place); ``redo``: the command
    that makes it again (the fix named for a damaged file)."""
    d = str(directory).rstrip("/")
    files = {rel: {"size": info.size, "sha256": sha256_file(f"{d}/{rel}")} for rel, info in sorted(_listing(d).items())}
    m = {"fingerprint": fingerprint, "rows": rows, "redo": redo, "files": files}
    write_json(f"{d}/{MANIFEST}", m)
    return m


def read(directory: str) -> dict | None:
    path = f"{str(directory).rstrip('/')}/{MANIFEST}"
    return read_json(path) if exists(path) else None


def verify(directory: str, fix: str | None = None) -> dict | None:
    """The manifest of ``directory`` when its files match it (None when it has none: an output from
    before manifests); else a one-line error naming the first file that does not, and ``fix`` (by
    default: rerun the manifest's ``redo`` command).

    Local files are hashed (once per process while unchanged); files on an object store are checked by
    size, which needs no download."""
    d = str(directory).rstrip("/")
    m = read(d)
    if m is None:
        return None
    have = _listing(d)
    key = (d, tuple((rel, i.size, i.mtime_ns) for rel, i in sorted(have.items())))
    if key in _VERIFIED:
        return _VERIFIED[key]
    where = f"{d}/{MANIFEST}"
    fix = fix or (f"rerun `{m['redo']}`" if m.get("redo") else "rerun the stage that wrote it with --force")
    for rel, want in sorted(m["files"].items()):
        if rel not in have:
            raise AimfairError(f"{d}/{rel} is missing (listed in {where}): {fix}")
        if have[rel].size != want["size"]:
            raise AimfairError(f"{d}/{rel} is damaged ({have[rel].size} bytes, {want['size']} in {where}): {fix}")
        if not is_uri(d) and sha256_file(f"{d}/{rel}") != want["sha256"]:
            raise AimfairError(f"{d}/{rel} is damaged (its sha256 is not the one in {where}): {fix}")
    extra = sorted(rel for rel in set(have) - set(m["files"]) if rel.endswith(READ))  # what readers would read
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise AimfairError(f"{d}/{extra[0]} is not in {where} (left from another run?){more}: remove it, or {fix}")
    _VERIFIED[key] = m
    return m
