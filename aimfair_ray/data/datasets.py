"""Datasets: one registered piece each, which every stage asks instead of naming a dataset.

A :class:`Dataset` says how its splits are made (``read``: a labelled frame of image files that the
shared biased draw splits, or ``build``: tables it draws itself, as Colored MNIST), the CSDG prompt
task its synthetic images are described by (``task``; None: the user's ``generate.task``), the checker
the filter uses by default (``checker``; None: there is none that fits, and the filter says so), and
what of the config it can't serve (``check``, at config load). Prepare, generate, the filter and the
config ask the registry; adding a dataset is one ``register(Dataset(...))`` here and its test::

    register(Dataset("my_faces", "faces in my folder layout", read=read_my_faces,
                     task=_face_task("celeba"), checker=_gender_in("Male")))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from aimfair_ray import AimfairError
from aimfair_ray.registry import Registry


@dataclass(frozen=True)
class Dataset:
    name: str
    help: str
    task: Callable = lambda dcfg: None                 # dcfg -> TaskConfig | None (raises: no phrasing for a pair)
    read: Optional[Callable] = None                    # dcfg -> readers.Labeled (files under data.root)
    build: Optional[Callable] = None                   # dcfg -> {"tables", "cell_counts", ...} (draws its own splits)
    checker: Callable = lambda dcfg: None              # dcfg -> "digits" | "gender" | None: the filter's default
    check: Callable = lambda dcfg: None                # dcfg -> None; ValueError names what it can't serve
    needs_root: bool = True                            # reads data.root
    egt_image: bool = False                            # EGT image can draw its group sets from it


DATASETS: Registry[Dataset] = Registry("unknown dataset {name}: set data.dataset to one of {names}")


def register(ds: Dataset) -> Dataset:
    return DATASETS.add(ds.name, ds)


def get(name: str) -> Dataset:
    return DATASETS.pick(name)


def read_dataset(dcfg):
    """The labelled frame of a dataset read from files (``data.root``)."""
    ds = get(dcfg.dataset)
    if ds.read is None:
        raise AimfairError(f"dataset {ds.name!r} draws its own splits; it has no files to read")
    if ds.needs_root and not dcfg.root:
        what = "manifest file" if ds.name == "manifest" else f"{ds.name} folder"
        raise AimfairError(f"dataset {ds.name!r} needs data.root, the {what} on the machines that read it: "
                           f"--set data.root=/data/{ds.name}")
    return ds.read(dcfg)


def egt_image_source(dcfg) -> None:
    """EGT image draws its group sets from the dataset, or says in one line that it can't."""
    if not get(dcfg.dataset).egt_image:
        can = ", ".join(n for n, d in DATASETS.items() if d.egt_image)
        raise AimfairError(f"aimfair egt image draws its group sets from {can} only, not data.dataset "
                           f"{dcfg.dataset}: run it with --preset cmnist (EGT on face images is not built yet)")


def default_checker(dcfg) -> str:
    """The filter's checker for ``generate.checker=auto``; one line when the dataset has none for its attributes."""
    checker = get(dcfg.dataset).checker(dcfg)
    if checker is None:
        raise AimfairError(f"generate.filter has no checker for {dcfg.dataset} ({dcfg.target} / {dcfg.sensitive}): set "
                           "generate.checker=clip (CLIP on the task's phrases) or generate.filter=false")
    return checker


def _cmnist_check(d) -> None:
    if d.target != "digit_ge5" or d.sensitive != "color":
        raise ValueError("colored_mnist has target 'digit_ge5' and sensitive 'color' only")
    if len(d.colors) < 2:
        raise ValueError("colored_mnist needs at least 2 colors")


def _digit_task(d):
    from aimfair_ray.prompt_tasks import DIGIT_TASK  # not at import: config's defaults are validated while config loads

    return DIGIT_TASK


def _face_task(dataset: str) -> Callable:
    def task(d):
        from aimfair_ray.prompt_tasks import face_task

        return face_task(dataset, d.target, d.sensitive)
    return task


def _cmnist_build(d) -> dict:
    from aimfair_ray.data import cmnist

    return cmnist.build(d)


def _gender_in(attribute: str) -> Callable:
    """The ONNX gender checker where the target or the sensitive attribute is ``attribute``, else none."""
    return lambda d: "gender" if attribute in (d.target, d.sensitive) else None


def _read_celeba(d):
    from aimfair_ray.data.readers import read_celeba

    return read_celeba(d.root, d.target, d.sensitive)


def _read_utkface(d):
    from aimfair_ray.data.readers import read_utkface

    return read_utkface(d.root, d.target, d.sensitive, d.age_bins)


def _read_manifest(d):
    from aimfair_ray.data.readers import read_manifest

    return read_manifest(d.root)


register(Dataset("colored_mnist", "handwritten digits (< 5 vs >= 5) in coloured strokes, built from the bundled MNIST "
                 "digits", task=_digit_task, build=_cmnist_build, checker=lambda d: "digits",
                 check=_cmnist_check, needs_root=False, egt_image=True))
register(Dataset("celeba", "CelebA's folder layout; any two of its 40 attributes", read=_read_celeba,
                 task=_face_task("celeba"), checker=_gender_in("Male")))
register(Dataset("utkface", "UTKFace's file names; gender, race, race_white or age_bin", read=_read_utkface,
                 task=_face_task("utkface"), checker=_gender_in("gender")))
register(Dataset("manifest", "your own images: a CSV or Parquet of path, target, group (split optional)",
                 read=_read_manifest))
