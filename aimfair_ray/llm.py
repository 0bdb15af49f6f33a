"""One loader for causal LMs: an HF folder, a hub id or a GGUF file (default: the bundled
SmolLM2-135M-Instruct). Used by the prompt writer, EGT's text task and the text generator
that Serve runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def cache_dir() -> Path:
    """Where setup keeps derived assets (``AIMFAIR_CACHE``, default ``~/.cache/aimfair``)."""
    return Path(os.environ.get("AIMFAIR_CACHE") or Path.home() / ".cache" / "aimfair")


def cached_llm_dir() -> Path:
    """The bundled SmolLM2 as an HF folder in the cache (written by `make setup`; see cache_bundled_llm)."""
    return cache_dir() / "smollm2-135m-instruct"


def _bundled() -> tuple[Path, Path, dict]:
    """(the bundled GGUF, its HF-folder copy in the cache, the stamp that ties them)."""
    from aimfair_ray.assets import asset_path

    gguf = asset_path("smollm2")
    return gguf, cached_llm_dir(), _identity(gguf)


def _identity(path: Path) -> dict:
    """The file, wherever it is installed: its name, size and the hashes of its first and last MiB
    (two checkouts of the project share one cached copy)."""
    import hashlib

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(2**20)).hexdigest()[:16]
        f.seek(max(0, size - 2**20))
        tail = hashlib.sha256(f.read(2**20)).hexdigest()[:16]
    return {"gguf": path.name, "bytes": size, "head": head, "tail": tail}


def resolve_llm(llm: str | None) -> tuple[str, str | None]:
    """(model folder or hub id, GGUF file name or None). The bundled SmolLM2 (``llm`` None) comes
    from its safetensors copy when setup wrote one (:func:`cache_bundled_llm`), else from the GGUF."""
    if llm is None:
        gguf, folder, stamp = _bundled()
        stamp_file = folder / "aimfair-source.json"
        if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
            return str(folder), None
        return str(gguf.parent), gguf.name
    if llm.endswith(".gguf"):
        return str(Path(llm).parent), Path(llm).name
    return llm, None


def load_causal_lm(llm: str | None, device: str = "cpu", padding_side: str | None = None, dtype=None):
    """(tokenizer, model) of ``llm`` on ``device``; the tokenizer gets a pad token (EOS when it has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = resolve_llm(llm)
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    if padding_side:
        tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}), **kw)
    return tok, model.to(device)


def cache_bundled_llm() -> str:
    """Write the bundled SmolLM2 GGUF once as an HF safetensors folder (float32, the same weights the
    GGUF loads to, about 0.5 GB): it then loads in under a second instead of being dequantized (about
    20 s) by every prompt actor, EGT worker and text generator. Written whole, then renamed."""
    gguf, folder, stamp = _bundled()
    stamp_file = folder / "aimfair-source.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return f"smollm2: cached at {folder}"
    tok, model = load_causal_lm(str(gguf))
    fresh = type(model)(model.config)  # save_pretrained refuses a model loaded from GGUF
    fresh.load_state_dict(model.state_dict())
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / "aimfair-source.json").write_text(json.dumps(stamp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return f"smollm2: wrote {folder} from {gguf.name}"
