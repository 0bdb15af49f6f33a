"""One Parquet schema for all image data, real or synthetic, read and written through
Ray Data as directories of shards. A split directory is published atomically and holds
a ``_COMPLETE`` marker; readers refuse a directory without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aimfair_ray import AimfairError, manifest
from aimfair_ray.data.codecs import decode_png
from aimfair_ray.storage import atomic_dir, exists, is_complete, is_uri, listdir

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # PNG bytes
        pa.field("target", pa.int64(), nullable=False),
        pa.field("group", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # "real" | "synthetic"
        pa.field("prompt", pa.string(), nullable=True),
        pa.field("generator", pa.string(), nullable=True),  # JSON metadata of the generator
    ]
)
SOURCES = ("real", "synthetic")


def make_table(columns: dict) -> pa.Table:
    """Build a table in the shared schema; optional columns default to null."""
    n = len(columns["id"])
    cols = {f.name: columns.get(f.name, [None] * n) for f in SCHEMA}
    bad = set(columns) - set(SCHEMA.names)
    if bad:
        raise ValueError(f"columns not in the image schema: {sorted(bad)}; schema: {SCHEMA.names}")
    if any(s not in SOURCES for s in set(cols["source"])):
        raise ValueError(f"source must be one of {SOURCES}")
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def write_split(ds, directory: str, redo: str, rows_per_file: int = 2048) -> str:
    """Write a Ray Dataset (or a pyarrow Table) as Parquet shards, atomically, with its manifest
    (``redo``: the command that writes it again, named in the fix for a damaged file)."""
    import ray

    if isinstance(ds, pa.Table):
        ds = ray.data.from_arrow(ds.cast(SCHEMA))
    with atomic_dir(directory, direct=True) as tmp:  # on a store, Ray Data's write tasks write there from any node
        ds.write_parquet(tmp, min_rows_per_file=rows_per_file)
        write_manifest(tmp, redo)
    return directory


def write_manifest(directory: str, redo: str, fingerprint: str | None = None) -> dict:
    """The manifest of a finished split or set folder: its files, and its rows per cell (``y<c>_s<g>``)."""
    t = read_table(directory, ["target", "group"]) if listdir(directory, "*.parquet") else None
    rows = {} if t is None else cell_rows(t)
    return manifest.write(directory, fingerprint, rows, redo=redo)


def cell_rows(t: pa.Table) -> dict[str, int]:
    """Rows per cell ``y<target>_s<group>`` of a table with target and group columns."""
    counts = t.group_by(["target", "group"]).aggregate([([], "count_all")]).to_pylist()
    return {f"y{r['target']}_s{r['group']}": r["count_all"] for r in sorted(counts, key=lambda r: (r["target"], r["group"]))}


def read_parquet(path, columns: list[str] | None = None,
                 fix: str = "rerun the stage that wrote it with --force (or remove the file)") -> pa.Table:
    """One Parquet shard; an unreadable one is a one-line error naming it and ``fix``."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise unreadable(path, e, fix) from None


def unreadable(path, e: Exception, fix: str) -> AimfairError:
    return AimfairError(f"{path} is not a readable Parquet shard ({str(e).splitlines()[0]}): {fix}")


def check_split(directory: str, fix: str | None = None) -> None:
    """A complete split or set directory in the image schema whose files match its manifest, or a
    one-line error saying what to run."""
    if not exists(directory):
        raise AimfairError(f"no data at {directory}: run `aimfair data prepare` first (or check the path)")
    if not is_complete(directory):
        raise AimfairError(f"{directory} is incomplete (no _COMPLETE marker): a write was interrupted; rerun the stage")
    manifest.verify(directory, fix)
    # Check the columns from a file footer: ds.schema() would start a Ray Data execution.
    import pyarrow.parquet as pq

    from aimfair_ray.storage import filesystem

    files = listdir(directory, "*.parquet")
    if not files:
        raise AimfairError(f"{directory} holds no Parquet files")
    try:
        fs, p = filesystem(files[0])
        with fs.open_input_file(p) as f:
            names = pq.read_schema(f).names
    except (pa.ArrowInvalid, OSError) as e:
        raise unreadable(files[0], e, "rerun the stage that wrote it with --force") from None
    missing = set(SCHEMA.names) - set(names)
    if missing:
        raise AimfairError(f"{directory}: not in the aimfair image schema, missing columns {sorted(missing)}")


def read_split(directory: str):
    """A Ray Dataset over a complete split directory in the shared schema."""
    import ray

    check_split(directory)
    return ray.data.read_parquet(directory, file_extensions=["parquet"])


def read_table(directory: str, columns: list[str] | None = None) -> pa.Table:
    """The Parquet files of a split or set directory as one table, without Ray (small reads: ids, labels)."""
    manifest.verify(directory)  # a damaged or unlisted shard is named as such, before it is read
    files = listdir(directory, "*.parquet")
    if not files:
        raise AimfairError(f"no Parquet files in {directory}")
    return pa.concat_tables([read_parquet(f, columns=columns) for f in files])


def files_sha(directory: str) -> str:
    """A short hash of a set directory's Parquet file names and sizes: a rewritten set (another import,
    a regenerated set) gets another, so what was computed from the old one is not reused."""
    import hashlib

    m = manifest.read(directory)
    if m is not None:  # the files' contents
        return manifest.digest(m["files"])[:16]
    files = sorted((p.name, p.stat().st_size) for p in Path(directory).glob("*.parquet")) if not is_uri(directory) else []
    return hashlib.sha1(repr(files).encode()).hexdigest()[:16]


def first_row(directory: str, columns: list[str]) -> dict:
    """The first row of a split or set directory (its first shard's), without reading the rest."""
    manifest.verify(directory)
    files = listdir(directory, "*.parquet")
    if not files:
        raise AimfairError(f"no Parquet files in {directory}")
    return read_parquet(files[0], columns=columns).slice(0, 1).to_pylist()[0]


def image_dataset(directories: list[str], image_size: int, cache_mb: float, keep: list | None = None,
                  sets: bool = False, shuffle_seed: int | None = None, weights: dict | None = None,
                  default_weight: float = 1.0):
    """The decoded rows (``image`` uint8 NCHW, ``target``, ``group``) of split or set directories, as a
    source for Ray Train workers (:mod:`data.feed`); ``keep[i]``, when not None, is the set of ids kept
    from directory i; with ``sets``, a ``set`` column holds each row's directory index; with ``weights``
    ({id: weight}), a ``weight`` column holds each row's loss weight (``default_weight`` for the rest).

    A small set (rows x size² x 3 bytes ≤ ``cache_mb``) is read and decoded here, once per run (once per
    shared worker group: :func:`workgroup.kept`), into Ray's object store (:class:`feed.InMemory`: exact
    seeded shuffles, no Ray Data tasks per epoch). A larger one streams from Parquet (:class:`feed.Streamed`:
    one read of all the files, decoded by Ray Data tasks every epoch; with ``shuffle_seed`` its block order
    is redrawn every epoch)."""
    import ray

    from aimfair_ray.data.feed import InMemory, Streamed, shuffled_blocks
    from aimfair_ray.workgroup import kept

    keep = keep or [None] * len(directories)
    for d in directories:
        check_split(d)
    rows = sum(len(k) if k is not None else read_table(d, ["id"]).num_rows for d, k in zip(directories, keep))
    if rows * image_size * image_size * 3 > cache_mb * 2**20:
        prefixes = [d.split("://", 1)[-1].rstrip("/") + "/" for d in directories]
        ds = ray.data.read_parquet(list(directories), file_extensions=["parquet"], include_paths=True)
        if shuffle_seed is not None:
            ds = shuffled_blocks(ds, shuffle_seed)
        ds = ds.map_batches(_decode_sets, fn_kwargs={"prefixes": prefixes, "keep": keep, "sets": sets,
                                                     "weights": weights, "default_weight": default_weight},
                            batch_format="numpy")
        return Streamed(ds, rows)
    key = ("image_dataset", tuple((d, files_sha(d)) for d in directories), image_size,
           tuple(None if k is None else frozenset(k) for k in keep), sets,
           None if weights is None else frozenset(weights.items()), default_weight)
    return kept(key, lambda: InMemory(_decode_all(directories, keep, sets, weights, default_weight)))


def _decode_all(directories: list[str], keep: list, sets: bool, weights: dict | None, default_weight: float) -> dict:
    """Every kept row of ``directories`` decoded, by directory and then id (see :func:`image_dataset`)."""
    parts = []
    for i, (d, k) in enumerate(zip(directories, keep)):
        t = read_table(d, ["id", "image", "target", "group"])
        if k is not None:
            t = t.filter(pa.array([x in k for x in t["id"].to_pylist()]))
        t = t.take(pc.sort_indices(t, [("id", "ascending")]))  # by id: the files' layout never orders the rows
        if t.num_rows:
            part = decode_batch({c: t[c].to_numpy(zero_copy_only=False) for c in ("image", "target", "group")})
            if sets:
                part["set"] = np.full(t.num_rows, i, dtype=np.int64)
            if weights is not None:
                part["weight"] = row_weights(t["id"].to_pylist(), weights, default_weight)
            parts.append(part)
    if not parts:
        raise AimfairError(f"no rows to read in {', '.join(directories)}")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def row_weights(ids, weights: dict, default: float) -> np.ndarray:
    return np.array([weights.get(i, default) for i in ids], dtype=np.float32)


def _decode_sets(batch: dict, prefixes: list[str], keep: list, sets: bool, weights: dict | None = None,
                 default_weight: float = 1.0) -> dict:
    paths = [str(p).split("://", 1)[-1] for p in batch["path"]]
    where = np.array([next(i for i, pre in enumerate(prefixes) if p.startswith(pre) or f"/{p}".startswith(pre))
                      for p in paths], dtype=np.int64)
    mask = np.array([keep[s] is None or i in keep[s] for s, i in zip(where, batch["id"])], dtype=bool)
    if not mask.any():  # keep the image shape of the other batches
        one = _decode_sets({k: v[:1] for k, v in batch.items()}, prefixes, [None] * len(prefixes), sets, weights,
                           default_weight)
        return {k: v[:0] for k, v in one.items()}
    out = decode_batch({k: batch[k][mask] for k in ("image", "target", "group")})
    if sets:
        out["set"] = where[mask]
    if weights is not None:
        out["weight"] = row_weights(batch["id"][mask], weights, default_weight)
    return out


def decode_batch(batch: dict) -> dict:
    """Ray Data UDF: PNG bytes -> uint8 NCHW images, keeping target and group."""
    imgs = np.stack([decode_png(b) for b in batch["image"]]).transpose(0, 3, 1, 2)
    return {"image": imgs, "target": batch["target"].astype(np.int64), "group": batch["group"].astype(np.int64)}
