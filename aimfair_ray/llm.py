"""One loader for causal LMs: an HF folder, a hub id or a GGUF file (default: the bundled
SmolLM2-135M-Instruct). Used by the prompt writer, EGT's text task and the text generator
that Serve runs."""

from __future__ import annotations

from pathlib import Path


def resolve_llm(llm: str | None) -> tuple[str, str | None]:
    """(model folder or hub id, GGUF file name or None)."""
    if llm is None:
        from aimfair_ray.assets import asset_path

        p = asset_path("smollm2")
        return str(p.parent), p.name
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
