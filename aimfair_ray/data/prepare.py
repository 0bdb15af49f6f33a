"""The data stage: real data in -> Parquet splits in the shared schema + ``dataset.json``.

``dataset.json`` is written last, so its presence means the stage finished. A rerun
with the same data config reuses the splits; a changed config rebuilds them.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from aimfair_ray import AimfairError
from aimfair_ray.data.bias import count_cells, counts_dict, draw_biased_subset, resolve_majority
from aimfair_ray.data.codecs import decode_png, encode_png
from aimfair_ray.data.datasets import get, read_dataset
from aimfair_ray.data.io import check_split, read_table, write_split
from aimfair_ray.data.readers import check_files
from aimfair_ray.storage import exists, is_uri, made_with, read_bytes, read_json, write_json

SPLITS = ("train", "val", "test")


def load_meta(data_dir: str) -> dict:
    path = f"{data_dir}/dataset.json"
    if not exists(path):
        raise AimfairError(f"no prepared data in {data_dir}: run `aimfair data prepare` first")
    return read_json(path)


class EncodeImages:
    """Ray Data UDF: file paths -> square PNG bytes in the image schema: the centre square resized
    (``center_crop``) or the whole image resized to a square (``stretch``, the official AIM-Fair test transform)."""

    def __init__(self, size: int, skip_bad: bool, resize: str = "center_crop"):
        self.size, self.skip_bad, self.resize = size, skip_bad, resize

    def _load(self, path: str) -> bytes:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(read_bytes(path)) if is_uri(path) else path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            if self.resize == "center_crop":
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            return encode_png(np.asarray(im.resize((self.size, self.size), Image.BILINEAR)))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        images, keep = [], []
        for path in batch["path"]:
            try:
                images.append(self._load(path))
                keep.append(True)
            except Exception as e:  # noqa: BLE001 - reported by path
                if not self.skip_bad:
                    raise ValueError(f"corrupt or unreadable image {path}: {e}. Fix or remove it, "
                                     "or set data.skip_bad_images=true to skip such files") from None
                print(f"[aimfair] skipping corrupt image {path}: {e}")
                keep.append(False)
        out = batch[keep].drop(columns=["path"]).copy()
        out["image"] = images
        out["source"], out["prompt"], out["generator"] = "real", None, None
        return out


def _assign_splits(df: pd.DataFrame, fractions, seed: int) -> pd.DataFrame:
    if "split" in df.columns:
        return df
    rng = np.random.default_rng(seed)
    u = rng.random(len(df))
    cut = np.cumsum(fractions)
    df = df.copy()
    df["split"] = np.where(u < cut[0], "train", np.where(u < cut[1], "val", "test"))
    return df


def _real_tables(cfg) -> dict:
    import ray

    d = cfg.data
    lab = read_dataset(d)
    df = _assign_splits(lab.frame, d.split_fractions, d.seed)
    C, G = len(lab.target_names), len(lab.group_names)
    majority = resolve_majority(d.majority, df["target"], df["group"], C, G)
    parts, counts = {}, {}
    for split in SPLITS:
        part = df[df["split"] == split].reset_index(drop=True)
        if not len(part):
            raise AimfairError(f"the {split} split of {d.root} is empty: give every split rows (data.split_fractions, "
                               "or the dataset's own split column)")
        b = d.bias if split == "train" else d.val_draw_bias if split == "val" else None
        if split == "val" and b is None and d.n_val < len(part):  # natural: a seeded sample, no biased draw
            part = part.sample(n=d.n_val, random_state=d.seed).sort_values("id").reset_index(drop=True)
        if b is not None:
            n = d.n_train if split == "train" else min(d.n_val, len(part))
            try:
                idx, _ = draw_biased_subset(part["target"], part["group"], n, b, d.seed, C, G, majority)
            except AimfairError:
                if split != "val":
                    raise
                idx, _ = draw_biased_subset(part["target"], part["group"], None, b, d.seed, C, G, majority)
            part = part.iloc[idx].reset_index(drop=True)
        parts[split] = part
        counts[split] = counts_dict(count_cells(part["target"], part["group"], C, G))
    check_files([p for part in parts.values() for p in part["path"]])
    enc = EncodeImages(d.image_size, d.skip_bad_images, d.resize)
    tables = {}
    for split, part in parts.items():
        ds = ray.data.from_pandas(part[["id", "path", "target", "group", "split"]])
        tables[split] = ds.map_batches(enc, batch_format="pandas", batch_size=256)
    return {"tables": tables, "cell_counts": counts, "target_names": lab.target_names,
            "group_names": lab.group_names, "skipped_files": lab.skipped, "majority": majority}


def prepare_data(cfg, force: bool = False, log=print) -> dict:
    """Build and write every split of ``cfg.data``; returns the dataset metadata."""
    data_dir = cfg.data_dir
    wanted = cfg.data.model_dump(mode="json")
    meta = None if force else made_with(f"{data_dir}/dataset.json", wanted, "config")
    if meta is not None:
        for split in meta["splits"]:  # the files are the ones written: a damaged shard is named, not read
            check_split(f"{data_dir}/{split}")
        log(f"data: reusing {data_dir} (same data config; --force rebuilds it)")
        return meta
    if not force and exists(f"{data_dir}/dataset.json"):
        log("data: config changed, rebuilding")
    ds = get(cfg.data.dataset)
    built = ds.build(cfg.data) if ds.build else _real_tables(cfg)
    for split, table in built["tables"].items():
        try:
            write_split(table, f"{data_dir}/{split}", "aimfair data prepare --force")
        except Exception as e:  # noqa: BLE001
            found = re.findall(r"(corrupt or unreadable image [^{].*)", str(e))
            if found:
                raise AimfairError(found[-1].strip()) from None
            raise
        if not ds.build:  # read from files: count what was written (bad images may be skipped)
            written = read_table(f"{data_dir}/{split}", ["target", "group"]).to_pandas()  # labels only: no Ray Data
            C, G = len(built["target_names"]), len(built["group_names"])
            built["cell_counts"][split] = counts_dict(count_cells(written["target"], written["group"], C, G))
        log(f"data: wrote {split} -> {data_dir}/{split}  cells {built['cell_counts'][split]}")
    meta = {
        "dataset": cfg.data.dataset,
        "target": cfg.data.target,
        "sensitive": cfg.data.sensitive,
        "target_names": built["target_names"],
        "group_names": built["group_names"],
        "image_size": cfg.data.image_size,
        "majority": built["majority"],  # the majority group of each class in the biased draws
        "splits": {s: {"n": int(sum(c.values())), "cell_counts": c} for s, c in built["cell_counts"].items()},
        "skipped_files": built.get("skipped_files", []),
        "config": wanted,
    }
    cfg.save(data_dir)
    write_json(f"{data_dir}/dataset.json", meta)
    return meta


def split_dir(cfg, split: str) -> str:
    """A split name (train/val/test/generator) of this run, or a path to a split directory."""
    if "/" in split or split.startswith("."):
        return split
    return f"{cfg.data_dir}/{split}"


__all__ = ["prepare_data", "load_meta", "split_dir", "decode_png"]
