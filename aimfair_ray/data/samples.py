"""A picture of an image set: a grid with one row per (target, group) cell, the first images of
each cell by id, and a prompt under each synthetic image. Written as ``samples.png`` beside every
synthetic set (generated, filtered or imported) and shown by the run report."""

from __future__ import annotations

import textwrap

import pyarrow.parquet as pq

from aimfair_ray.data.codecs import decode_png
from aimfair_ray.storage import atomic_write_bytes


def first_per_cell(directory: str, per_cell: int = 6) -> dict[tuple[int, int], list[dict]]:
    """Up to ``per_cell`` rows of each cell (lowest ids first), reading the shards' small columns first
    and then only the chosen images."""
    from aimfair_ray.storage import filesystem, listdir

    files = listdir(directory, "*.parquet")  # a local folder or one on an object store
    if not files:
        return {}
    fs, first = filesystem(files[0])
    with fs.open_input_file(first) as f:
        names = pq.read_schema(f).names
    cols = [c for c in ("id", "target", "group", "prompt") if c in names]
    rows = [dict(r, _file=str(f), _row=i) for f in files for i, r in enumerate(pq.read_table(f, columns=cols).to_pylist())]
    cells: dict[tuple[int, int], list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["id"]):
        cell = cells.setdefault((int(r["target"]), int(r["group"])), [])
        if len(cell) < per_cell:
            cell.append(r)
    images = {}
    for f in {r["_file"] for cell in cells.values() for r in cell}:
        want = [r["_row"] for cell in cells.values() for r in cell if r["_file"] == f]
        col = pq.read_table(f, columns=["image"])["image"]
        images |= {(f, i): col[i].as_py() for i in want}
    for cell in cells.values():
        for r in cell:
            r["image"] = decode_png(images[(r["_file"], r["_row"])])
    return dict(sorted(cells.items()))


def sample_grid(directory: str, title: str, target_names=None, group_names=None, per_cell: int = 6) -> bytes | None:
    """The grid as PNG bytes (None for an empty set)."""
    from aimfair_ray.tables import figure_png, pyplot

    cells = first_per_cell(directory, per_cell)
    if not cells:
        return None
    plt = pyplot()
    prompts = any(r.get("prompt") for cell in cells.values() for r in cell)
    fig, axes = plt.subplots(len(cells), per_cell, figsize=(1.4 * per_cell, (2.0 if prompts else 1.4) * len(cells)),
                             squeeze=False)
    for row, ((c, g), rows) in zip(axes, cells.items()):
        name = f"y{c}_s{g}"
        if target_names and group_names:
            name += f"\n{target_names[c]} / {group_names[g]}"
        for k, ax in enumerate(row):
            ax.axis("off")
            if k < len(rows):
                ax.imshow(rows[k]["image"], interpolation="nearest")
                if rows[k].get("prompt"):
                    ax.set_title("\n".join(textwrap.wrap(str(rows[k]["prompt"]), 30)[:4]), fontsize=4.5, loc="left")
        row[0].text(-0.08, 0.5, name, transform=row[0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0.06, 0, 1, 0.97))
    return figure_png(fig)


def write_samples(directory: str, title: str, target_names=None, group_names=None, per_cell: int = 6) -> str | None:
    """``samples.png`` beside the set's shards; its path, or None for an empty set."""
    png = sample_grid(directory, title, target_names, group_names, per_cell)
    if png is None:
        return None
    path = f"{directory.rstrip('/')}/samples.png"
    atomic_write_bytes(path, png)
    return path

