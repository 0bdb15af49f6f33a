"""Your own synthetic images: a manifest (CSV or Parquet with ``path``, ``target``, ``group``, optional
``prompt`` and ``generator``; paths relative to the manifest) converted into a synthetic set of the
run, in the image schema, tagged ``source=synthetic`` with the generator's name.

``aimfair data import-synthetic MANIFEST --as balanced|imbalanced --generator NAME`` writes the set
where the generate stage would (``<run>/synthetic/balanced`` ...), with ``import.json`` beside it;
``finetune.synthetic=PATH`` (and ``finetune.synthetic_imbalanced=PATH``) import on the fly into
``<run>/synthetic/import-<hash>``, reused while the manifest and the data config stay the same.
Target and group values are the real data's names (or their indices); anything else is an error.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from aimfair_ray import AimfairError
from aimfair_ray.data.io import SCHEMA, check_split, read_table, write_manifest
from aimfair_ray.data.prepare import EncodeImages, load_meta
from aimfair_ray.data.readers import check_files
from aimfair_ray.data.samples import write_samples
from aimfair_ray.manifest import digest
from aimfair_ray.storage import absolute, atomic_dir, base_name, exists, is_dir, made_with, open_file, resolve, stat, write_json

IMPORT = "import.json"
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")


def is_manifest(path: str) -> bool:
    return str(path).endswith(MANIFEST_SUFFIXES)


def _codes(values: pd.Series, names: list[str], what: str, manifest: str) -> np.ndarray:
    """Labels as the real data's indices: its names, or integers in range."""
    if pd.api.types.is_integer_dtype(values):
        bad = sorted(set(values[(values < 0) | (values >= len(names))].tolist()))
        if bad:
            raise AimfairError(f"{manifest}: {what} values {bad[:5]} are outside the real data's {len(names)} "
                               f"{what}s {names} (give their names or indices 0..{len(names) - 1})")
        return values.to_numpy().astype(np.int64)
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(values.astype(str)) - set(index))
    if unknown:
        raise AimfairError(f"{manifest}: {what} names {unknown[:5]} are not the real data's {what}s {names}; "
                           "rename them to match (or give indices)")
    return values.astype(str).map(index).to_numpy().astype(np.int64)


def read_synthetic_manifest(manifest: str, target_names: list[str], group_names: list[str]) -> pd.DataFrame:
    """The manifest as ``id, path, target, group, prompt, generator`` with the real data's codes."""
    p = str(manifest)
    if not exists(p):
        raise AimfairError(f"synthetic manifest {p} does not exist")
    with open_file(p) as f:
        df = pd.read_csv(f) if p.endswith(".csv") else pd.read_parquet(f)
    missing = {"path", "target", "group"} - set(df.columns)
    if missing:
        raise AimfairError(f"synthetic manifest {p}: missing columns {sorted(missing)}; found {list(df.columns)}; "
                           "needs path, target and group (prompt, generator optional)")
    if df[["path", "target", "group"]].isna().any().any():
        raise AimfairError(f"synthetic manifest {p}: empty path, target or group values")
    if df.empty:
        raise AimfairError(f"synthetic manifest {p} lists no images")
    rel = df["path"].astype(str)
    dup = rel[rel.duplicated()]
    if len(dup):
        raise AimfairError(f"synthetic manifest {p} lists {len(dup)} paths twice, e.g. {dup.iloc[0]}")
    out = pd.DataFrame({
        # ids from the paths, not the row order: reordering the manifest changes nothing a model learns
        "id": ["syn-" + hashlib.sha1(r.encode()).hexdigest()[:16] for r in rel],
        "path": [resolve(p, q) for q in rel],
        "target": _codes(df["target"], target_names, "target", p),
        "group": _codes(df["group"], group_names, "group", p),
        "prompt": df["prompt"].astype(str) if "prompt" in df.columns else None,
        "generator": df["generator"].astype(str) if "generator" in df.columns else None,
    })
    check_files(out["path"])
    return out


def _key(manifest: str, cfg) -> dict:
    return {"manifest": absolute(manifest), **stat(manifest), "data": cfg.data.model_dump(mode="json")}


def import_synthetic(cfg, manifest: str, balance: str, generator: str | None, out_dir: str, force: bool = False,
                     log=print) -> dict:
    """Convert ``manifest`` into the set ``out_dir``; returns its ``import.json`` (reused when the
    manifest file and the data config are unchanged)."""
    import json

    import ray

    from aimfair_ray.runtime import ensure_ray

    key = _key(manifest, cfg)
    done = None if force else made_with(f"{out_dir}/{IMPORT}", key, "key")
    if done is not None:
        log(f"import: reusing {out_dir} (same manifest and data config)")
        return done
    meta = load_meta(cfg.data_dir)
    df = read_synthetic_manifest(manifest, meta["target_names"], meta["group_names"])
    name = generator or df["generator"].iloc[0] or f"manifest:{base_name(manifest)}"
    gen = json.dumps({"pipeline": name, "prompt_backend": None, "imported_from": absolute(manifest)})
    ensure_ray(cfg.ray, cfg.output_dir)
    enc = EncodeImages(cfg.data.image_size, cfg.data.skip_bad_images, cfg.data.resize)

    def tag(batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.copy()
        batch["source"], batch["generator"], batch["split"] = "synthetic", gen, balance
        return batch[SCHEMA.names]

    def encode(batch: pd.DataFrame) -> pd.DataFrame:  # EncodeImages tags rows as real; keep the prompts
        prompts = batch["prompt"].tolist()
        out = enc(batch.drop(columns=["prompt"]))
        out["prompt"] = [pr for pr, ok in zip(prompts, batch["id"].isin(out["id"])) if ok]
        return tag(out)

    ds = ray.data.from_pandas(df[["id", "path", "target", "group", "prompt"]].assign(split=balance))
    C, G = len(meta["target_names"]), len(meta["group_names"])
    counts = {f"y{y}_s{s}": int(((df["target"] == y) & (df["group"] == s)).sum()) for y in range(C) for s in range(G)}
    info = {"key": key, "balance": balance, "generator": name, "n": len(df), "cell_counts": counts}
    with atomic_dir(out_dir, direct=True) as tmp:  # on a store, Ray Data's write tasks write there from any node
        ds.map_batches(encode, batch_format="pandas", batch_size=256).write_parquet(tmp, min_rows_per_file=2048)
        write_json(f"{tmp}/{IMPORT}", info)
        write_samples(tmp, f"{balance} set imported from {base_name(manifest)} ({name})", meta["target_names"],
                      meta["group_names"])
        write_manifest(tmp, f"aimfair data import-synthetic {manifest} --as {balance} --force", digest(key))
    log(f"import: {len(df)} images from {manifest} -> {out_dir} as the {balance} set (generator {name}); cells {counts}")
    return info


def synthetic_source(cfg, path: str, balance: str, log=print) -> str:
    """A ``finetune.synthetic*`` path as a set directory: a directory in the image schema as it is,
    a manifest imported into the run (once)."""
    if is_manifest(path):
        tag = hashlib.sha1(absolute(path).encode()).hexdigest()[:10]
        out = f"{cfg.paths.synthetic}/import-{balance}-{tag}"
        import_synthetic(cfg, path, balance, None, out, log=log)
        return out
    if not is_dir(path):
        raise AimfairError(f"synthetic set {path} is neither a directory in the aimfair image schema nor a "
                           f"manifest ({', '.join(MANIFEST_SUFFIXES)})")
    check_split(path)
    meta = load_meta(cfg.data_dir)
    t = read_table(path, ["target", "group"])
    C, G = len(meta["target_names"]), len(meta["group_names"])
    if t.num_rows and (max(t["target"].to_pylist()) >= C or max(t["group"].to_pylist()) >= G):
        raise AimfairError(f"synthetic set {path} has targets or groups outside the real data's "
                           f"{meta['target_names']} / {meta['group_names']}")
    return path
