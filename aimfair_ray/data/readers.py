"""Readers for real datasets in their native on-disk formats.

Each returns a :class:`Labeled` frame with columns ``id, path, target, group`` and,
where the dataset defines one, ``split``. Images are read later, in Ray Data.
- CelebA: ``img_align_celeba/``, ``list_attr_celeba.txt``, ``list_eval_partition.txt``;
  any of the 40 attributes as target or sensitive attribute.
- UTKFace: ``[age]_[gender]_[race]_[datetime].jpg`` file names; ``gender``, ``race`` (5 groups),
  ``race_white`` (White vs the rest, as the official AIM-Fair code) or ``age_bin`` as target or
  sensitive attribute.
- A manifest: CSV or Parquet with ``path``, ``target`` and ``group`` columns
  (optional ``split``); relative paths resolve against the manifest's folder.

``data.root`` may be a local path or a URI (``s3://``, ``gs://``): the readers list and read the small
label files through :mod:`aimfair_ray.storage`, and the image paths stay URIs, read by Ray Data's tasks
on whichever node runs them (nothing is downloaded whole to the driver).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from aimfair_ray import AimfairError
from aimfair_ray.prompt_tasks import UTK_NAMES
from aimfair_ray.storage import base_name, exists, files_under, join, missing_files, open_file, read_text, resolve

SPLIT_NAMES = {0: "train", 1: "val", 2: "test"}


@dataclass
class Labeled:
    frame: pd.DataFrame
    target_names: list[str]
    group_names: list[str]
    skipped: list[str] = field(default_factory=list)


def _need(path: str, what: str) -> str:
    if not exists(path):
        raise AimfairError(f"{what} not found: {path}")
    return path


def _pick(name: str, available: list[str], role: str, dataset: str) -> str:
    if name not in available:
        raise AimfairError(
            f"unknown {role} attribute {name!r} for {dataset}; available attributes: {', '.join(available)}"
        )
    return name


def read_celeba(root: str, target: str, sensitive: str) -> Labeled:
    img_dir = _need(join(root, "img_align_celeba"), "CelebA image folder")
    attr_file = _need(join(root, "list_attr_celeba.txt"), "CelebA attribute file")
    lines = read_text(attr_file).splitlines()
    names = lines[1].split()
    _pick(target, names, "target", "CelebA")
    _pick(sensitive, names, "sensitive", "CelebA")
    rows = [ln.split() for ln in lines[2:] if ln.strip()]
    bad = [r[0] for r in rows if len(r) != len(names) + 1]
    if bad:
        raise AimfairError(f"{attr_file}: {len(bad)} rows do not have {len(names)} attribute values, e.g. {bad[:3]}")
    attrs = pd.DataFrame([r[1:] for r in rows], index=[r[0] for r in rows], columns=names).astype(int)
    part_file = join(root, "list_eval_partition.txt")
    df = pd.DataFrame(
        {
            "id": attrs.index,
            "path": [join(img_dir, f) for f in attrs.index],
            "target": (attrs[target].to_numpy() > 0).astype(int),
            "group": (attrs[sensitive].to_numpy() > 0).astype(int),
        }
    )
    if exists(part_file):
        part = dict(ln.split() for ln in read_text(part_file).splitlines() if ln.strip())
        missing = [f for f in attrs.index if f not in part]
        if missing:
            raise AimfairError(f"{part_file}: no partition for {len(missing)} images, e.g. {missing[:3]}")
        df["split"] = [SPLIT_NAMES[int(part[f])] for f in attrs.index]
    return Labeled(df, [f"not {target}", target], [f"not {sensitive}", sensitive])


UTK_RE = re.compile(r"^(\d+)_([01])_([0-4])_\d+\.jpg(\.chip\.jpg)?$")
UTK_ATTRS = ("gender", "race", "race_white", "age_bin")


def _age_names(edges: list[int]) -> list[str]:
    lo = [0] + list(edges)
    return [f"{a}-{b - 1}" for a, b in zip(lo, edges)] + [f"{edges[-1]}+"]


def read_utkface(root: str, target: str, sensitive: str, age_bins: list[int]) -> Labeled:
    root_p = _need(str(root).rstrip("/"), "UTKFace folder")
    _pick(target, list(UTK_ATTRS), "target", "UTKFace")
    _pick(sensitive, list(UTK_ATTRS), "sensitive", "UTKFace")
    recs, skipped = [], []
    for p in files_under(root_p, ".jpg"):
        m = UTK_RE.match(base_name(p))
        if not m:
            skipped.append(p)
            continue
        age, gender, race = int(m.group(1)), int(m.group(2)), int(m.group(3))
        recs.append({"id": base_name(p), "path": p, "gender": gender, "race": race, "race_white": int(race == 0),
                     "age_bin": int(np.searchsorted(age_bins, age, side="right"))})
    if not recs:
        raise AimfairError(f"no UTKFace images named [age]_[gender]_[race]_[datetime].jpg under {root_p}")
    df = pd.DataFrame(recs)
    names = dict(UTK_NAMES, age_bin=_age_names(age_bins))
    out = pd.DataFrame({"id": df["id"], "path": df["path"], "target": df[target], "group": df[sensitive]})
    return Labeled(out, names[target], names[sensitive], skipped)


def _codes(col: pd.Series, what: str, path: str) -> tuple[np.ndarray, list[str]]:
    if col.isna().any():
        raise AimfairError(f"{path}: column {what!r} has {int(col.isna().sum())} empty values")
    if pd.api.types.is_integer_dtype(col):
        if col.min() < 0:
            raise AimfairError(f"{path}: integer column {what!r} must be >= 0")
        return col.to_numpy().astype(int), [str(i) for i in range(int(col.max()) + 1)]
    names = sorted(col.astype(str).unique())
    return col.astype(str).map({n: i for i, n in enumerate(names)}).to_numpy().astype(int), names


def read_manifest(path: str) -> Labeled:
    p = _need(str(path), "manifest")
    if not p.endswith((".csv", ".parquet", ".pq")):
        raise AimfairError(f"manifest {p}: use a .csv or .parquet file")
    with open_file(p) as f:
        df = pd.read_csv(f) if p.endswith(".csv") else pd.read_parquet(f)
    missing = {"path", "target", "group"} - set(df.columns)
    if missing:
        raise AimfairError(f"manifest {p}: missing columns {sorted(missing)}; found {list(df.columns)}; "
                           "needs path, target and group (split optional)")
    target, tnames = _codes(df["target"], "target", p)
    group, gnames = _codes(df["group"], "group", p)
    paths = [resolve(p, q) for q in df["path"].astype(str)]
    out = pd.DataFrame({"id": [f"m{i:07d}" for i in range(len(df))], "path": paths, "target": target, "group": group})
    if "split" in df.columns:
        bad = set(df["split"]) - {"train", "val", "test"}
        if bad:
            raise AimfairError(f"manifest {p}: split values must be train, val or test; found {sorted(bad)}")
        out["split"] = df["split"].to_numpy()
    return Labeled(out, tnames, gnames)


def check_files(paths) -> None:
    """Every image file must exist (on any storage); the error lists the missing ones by path."""
    missing = missing_files(paths)
    if missing:
        shown = "\n  ".join(missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise AimfairError(f"{len(missing)} image files are missing:\n  {shown}{more}")
