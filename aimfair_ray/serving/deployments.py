"""The model deployments behind the ingress: a batched classifier per model, a diffusers
text-to-image generator and a causal-LM text generator. Each wraps the plain-PyTorch call
that the pipeline stages use (``loop.to_input``, ``images.generate_batch``)."""

from __future__ import annotations

import numpy as np
from ray import serve


def n_params(model_dir: str) -> int:
    """A checkpoint's parameter count, from the safetensors header (nothing loaded)."""
    from safetensors import safe_open

    from aimfair_ray.models import check_checkpoint_dir

    with safe_open(str(check_checkpoint_dir(model_dir) / "model.safetensors"), framework="pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


def predict(model, meta: dict, images: list[np.ndarray], device: str = "cpu") -> list[dict]:
    """One forward pass over ``images`` (HxWx3 uint8 at the model's size): label, class and probability each."""
    import torch

    from aimfair_ray.train.loop import to_input

    x = to_input(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), meta["mean"], meta["std"], device)
    with torch.no_grad():
        probs = model(x).float().softmax(1).cpu().numpy()
    names = meta["target_names"]
    return [{"label": names[int(p.argmax())], "target": int(p.argmax()), "probability": float(p.max())} for p in probs]


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)  # >= max_batch_size, so batches can fill
class Classifier:
    """One model (safetensors only); requests are batched across callers with ``@serve.batch``."""

    def __init__(self, model_dir: str, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.01):
        import torch

        from aimfair_ray.models import load_classifier

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.meta = load_classifier(model_dir)
        self.model.to(self.device)
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def predict_batch(self, images: list[np.ndarray]) -> list[dict]:
        return predict(self.model, self.meta, images, self.device)

    async def __call__(self, image: np.ndarray) -> dict:
        return await self.predict_batch(image)


ADAPTERS_PER_REPLICA = 8  # LoRA adapters an ImageGenerator replica keeps loaded (the least recently used leaves)


class _Adapter:
    """A LoRA adapter loaded into a replica's pipeline; Serve drops it (and it leaves the pipeline) when the
    replica makes room for another."""

    def __init__(self, pipe, name: str, folder: str):
        from aimfair_ray.generate.t2i import load_adapter

        self.pipe, self.name = pipe, name
        load_adapter(pipe, folder, name)

    def __del__(self):
        try:
            self.pipe.delete_adapters(self.name)
        except Exception:  # noqa: BLE001 - a replica shutting down
            pass


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class ImageGenerator:
    """Any diffusers text-to-image pipeline folder or hub id (default: the embedded model), and EGT LoRA adapters
    over it: one base pipeline per replica, the adapter chosen per request by its multiplexed model id."""

    def __init__(self, pipeline: str | None = None, dtype: str = "float32", guidance_scale: float = 3.0,
                 adapters: dict[str, str] | None = None):
        import asyncio

        import torch

        from aimfair_ray.generate.t2i import embedded_weights, load_pipeline

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.name = pipeline or "embedded"
        self.pipe = load_pipeline(pipeline or embedded_weights(), device=self.device,
                                  dtype=dtype if self.device == "cuda" else "float32")
        self.guidance, self.adapters = guidance_scale, dict(adapters or {})
        self.lock = asyncio.Lock()  # one generation at a time: the active adapter is the pipeline's state

    @serve.multiplexed(max_num_models_per_replica=ADAPTERS_PER_REPLICA)
    async def get_adapter(self, adapter_id: str) -> _Adapter:
        return _Adapter(self.pipe, adapter_id, self.adapters[adapter_id])

    def _generate(self, prompts: list[str], seed: int, steps: int) -> list[bytes]:
        from aimfair_ray.data.codecs import encode_png
        from aimfair_ray.generate.images import generate_batch

        imgs = generate_batch(self.pipe, prompts, [seed + i for i in range(len(prompts))], steps, self.guidance)
        return [encode_png(im) for im in imgs]

    async def __call__(self, prompts: list[str], seed: int, steps: int) -> list[bytes]:
        import asyncio

        adapter_id = serve.get_multiplexed_model_id()
        adapter = await self.get_adapter(adapter_id) if adapter_id else None
        async with self.lock:
            if adapter is not None:
                self.pipe.enable_lora()
                self.pipe.set_adapters([adapter.name])
            elif self.adapters:
                self.pipe.disable_lora()  # the base pipeline
            return await asyncio.to_thread(self._generate, prompts, seed, steps)


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class TextGenerator:
    """A causal LM: an HF folder, a GGUF file or a hub id (default: the bundled SmolLM2-135M-Instruct)."""

    def __init__(self, model: str | None = None):
        import torch

        from aimfair_ray.llm import load_causal_lm

        self.name = model or "smollm2-135m-instruct"
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok, self.model = load_causal_lm(model, self.device)
        self.model.eval()

    def __call__(self, prompt: str, max_new_tokens: int, temperature: float, seed: int,
                 max_prompt_tokens: int = 512) -> dict:
        """``{"text": ...}``, or ``{"error": ..., "status": 422}`` for a prompt over ``max_prompt_tokens``
        (counted before anything runs, so a long prompt costs a tokenizer call, not a generation)."""
        import torch

        n = len(self.tok(prompt)["input_ids"])
        if n > max_prompt_tokens:
            return {"status": 422, "error": f"the prompt has {n} tokens; the limit is {max_prompt_tokens} "
                                            "(max_prompt_tokens)"}
        messages = [{"role": "user", "content": prompt}]
        text = (self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                if self.tok.chat_template else prompt)
        enc = self.tok(text, return_tensors="pt").to(self.device)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                      temperature=max(temperature, 1e-5), top_p=0.95,
                                      pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id)
        return {"text": self.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()}
