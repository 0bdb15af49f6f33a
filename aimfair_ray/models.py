"""Classifier backbones and their checkpoints: safetensors weights + JSON metadata.

Every model maps uint8-derived float images [N, 3, H, W] (normalised with the
checkpoint's mean/std) to logits [N, num_classes].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from aimfair_ray import AimfairError
from aimfair_ray.storage import atomic_dir, exists, is_uri, local_copy

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
WEIGHTS = "model.safetensors"
META = "model.json"
UNSAFE = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


class SmallCNN(nn.Module):
    """Four conv blocks and a linear head: the embedded benchmark's classifier."""

    def __init__(self, num_classes: int = 2, width: int = 32):
        super().__init__()

        def block(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)

        w = width
        self.features = nn.Sequential(block(3, w, False), block(w, w, True), block(w, 2 * w, True), block(2 * w, 4 * w, True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


class HFResNet(nn.Module):
    """ResNet-18 from transformers' ResNetConfig (random init: no hub download)."""

    def __init__(self, num_classes: int):
        super().__init__()
        from transformers import ResNetConfig, ResNetForImageClassification

        conf = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                            layer_type="basic", num_labels=num_classes)
        self.net = ResNetForImageClassification(conf)

    def forward(self, x):
        return self.net(pixel_values=x).logits


def efficientnet_lite0(num_classes: int, image_size: int, pretrained: bool) -> nn.Module:
    """EfficientNet-Lite0; ImageNet weights from the bundled asset (the head is new)."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, image_size=image_size)
    if pretrained:
        from aimfair_ray.assets import asset_path

        state = torch.load(asset_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"_fc.weight", "_fc.bias"}:
            raise AimfairError(f"EfficientNet-Lite0 weights do not match: missing {missing}, unexpected {unexpected}")
    return model


def _external(backbone: str, num_classes: int, pretrained: bool) -> nn.Module:
    lib, _, name = backbone.partition(":")
    try:
        if lib == "torchvision":
            import torchvision.models as tvm

            return tvm.get_model(name, weights="DEFAULT" if pretrained else None, num_classes=num_classes) \
                if not pretrained else _tv_pretrained(tvm, name, num_classes)
        import timm

        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except ImportError as e:
        raise AimfairError(f"backbone {backbone!r} needs the {lib!r} package, which is not installed here "
                           f"({e}); install it on the GPU cluster, or use small_cnn, resnet18 or efficientnet_lite0") from None


def _tv_pretrained(tvm, name: str, num_classes: int) -> nn.Module:
    model = tvm.get_model(name, weights="DEFAULT")
    head_name = "fc" if hasattr(model, "fc") else "classifier"
    head = getattr(model, head_name)
    last = head[-1] if isinstance(head, nn.Sequential) else head
    new = nn.Linear(last.in_features, num_classes)
    if isinstance(head, nn.Sequential):
        head[-1] = new
    else:
        setattr(model, head_name, new)
    return model


BN_MOMENTUM = 0.1  # PyTorch's default: the running statistics follow the training data within tens of batches


def torch_bn_momentum(model: nn.Module) -> nn.Module:
    """Every BatchNorm's momentum at PyTorch's default. A port's TensorFlow convention (EfficientNet-Lite's 0.01)
    leaves the running statistics near their initial values after a short fine-tuning, and the model in eval mode
    then predicts one class for every image. (Momentum is no weight: checkpoints load the same.)"""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None:
            m.momentum = BN_MOMENTUM
    return model


def build_model(backbone: str, num_classes: int, image_size: int = 32, pretrained: bool = False, width: int = 32) -> nn.Module:
    return torch_bn_momentum(_build(backbone, num_classes, image_size, pretrained, width))


def _build(backbone: str, num_classes: int, image_size: int, pretrained: bool, width: int) -> nn.Module:
    if backbone == "small_cnn":
        return SmallCNN(num_classes, width)
    if backbone == "resnet18":
        if pretrained:
            raise AimfairError("backbone 'resnet18' has no pretrained weights here: use torchvision:resnet18 (ImageNet "
                               "weights) or efficientnet_lite0 (bundled), or pretrained=false")
        return HFResNet(num_classes)
    if backbone == "efficientnet_lite0":
        return efficientnet_lite0(num_classes, image_size, pretrained)
    if backbone.startswith(("torchvision:", "timm:")):
        return _external(backbone, num_classes, pretrained)
    raise AimfairError(f"unknown backbone {backbone!r}")


def normalization(backbone: str, pretrained: bool) -> tuple[list[float], list[float]]:
    return IMAGENET if pretrained and backbone != "small_cnn" else HALF


def model_meta(cfg, data_meta: dict) -> dict:
    """What a checkpoint needs to rebuild and use its model."""
    mean, std = normalization(cfg.model.backbone, cfg.model.use_pretrained)
    return {
        "backbone": cfg.model.backbone,
        "width": cfg.model.width,
        "num_classes": len(data_meta["target_names"]),
        "image_size": data_meta["image_size"],
        "mean": mean,
        "std": std,
        "target_names": data_meta["target_names"],
        "group_names": data_meta["group_names"],
        "dataset": data_meta["dataset"],
    }


# ---- checkpoints -------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def state_tensors(model: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}


def write_classifier(model: nn.Module, meta: dict, directory: str | Path) -> None:
    """Write weights and metadata (with the weights' sha256) into an existing directory (no atomicity:
    see save_classifier)."""
    from aimfair_ray.manifest import sha256_file

    d = Path(directory)
    save_file(state_tensors(model), str(d / WEIGHTS))
    meta = {k: v for k, v in meta.items() if k != "weights_sha256"}
    (d / META).write_text(json.dumps(dict(meta, weights_sha256=sha256_file(str(d / WEIGHTS))), indent=2, default=str))


def load_weights(directory: str | Path, meta: dict) -> dict:
    """The tensors of a checkpoint folder, after checking them against the sha256 its ``model.json``
    records (a checkpoint from before the sha was recorded is read as it is)."""
    from aimfair_ray.manifest import sha256_file

    path = Path(directory) / WEIGHTS
    want = meta.get("weights_sha256")
    if want and sha256_file(str(path)) != want:
        raise AimfairError(f"{path} is damaged (its sha256 is not the one in {META}, {path.stat().st_size} bytes): "
                           "rerun the stage that wrote it with --force, or restore the file")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise AimfairError(f"{path} is not readable safetensors ({str(e).splitlines()[0]}): rerun the stage that "
                           "wrote it with --force") from None


def save_classifier(model: nn.Module, meta: dict, directory: str) -> str:
    from aimfair_ray.modelcard import CARD, classifier_card

    with atomic_dir(directory) as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        write_classifier(model, meta, tmp)
        (Path(tmp) / CARD).write_text(str(classifier_card(meta)))  # the audit writes it again with its figures
    return directory


def check_checkpoint_dir(directory: str | Path) -> Path:
    """The local folder of a checkpoint (on an object store: this node's cached copy of it), checked."""
    if is_uri(str(directory)):
        if not exists(str(directory)):
            raise AimfairError(f"checkpoint {directory} does not exist; pass the model folder a training run wrote "
                               "(e.g. s3://bucket/runs/cmnist/baseline/model)")
        directory = local_copy(str(directory))
    d = Path(directory)
    if not d.is_dir():
        raise AimfairError(f"checkpoint {d} does not exist; pass the model folder a training run wrote "
                           "(e.g. runs/cmnist/baseline/model)")
    unsafe = sorted(p.name for p in d.iterdir() if p.suffix in UNSAFE)
    if not (d / WEIGHTS).is_file():
        hint = f" (found {unsafe}: pickled checkpoints are never loaded; convert them to safetensors)" if unsafe else ""
        raise AimfairError(f"checkpoint {d} has no {WEIGHTS}{hint}")
    if not (d / META).is_file():
        raise AimfairError(f"checkpoint {d} has no {META}")
    return d


def load_classifier(directory: str | Path) -> tuple[nn.Module, dict]:
    d = check_checkpoint_dir(directory)
    meta = json.loads((d / META).read_text())
    model = build_model(meta["backbone"], meta["num_classes"], meta["image_size"], pretrained=False, width=meta.get("width", 32))
    tensors = load_weights(d, meta)
    try:
        model.load_state_dict(tensors)
    except (RuntimeError, Exception) as e:  # noqa: BLE001
        raise AimfairError(f"checkpoint {d}: weights do not fit backbone {meta['backbone']!r}: {e}") from None
    return model.eval(), meta


# ---- optimizer state (for resuming), also as safetensors + JSON ---------------------------
def weights_sha(model_dir: str | Path) -> str:
    """A short hash of a checkpoint's weights: what a rerun compares to know the model is the same."""
    import hashlib

    return hashlib.sha256(Path(local_copy(str(model_dir)), WEIGHTS).read_bytes()).hexdigest()[:16]


def save_optimizer(opt: torch.optim.Optimizer, directory: str | Path) -> None:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    d = Path(directory)
    save_file(tensors, str(d / "optimizer.safetensors"))
    (d / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def load_optimizer(opt: torch.optim.Optimizer, directory: str | Path) -> None:
    d = Path(directory)
    tensors = load_file(str(d / "optimizer.safetensors"))
    extra = json.loads((d / "optimizer.json").read_text())
    state: dict = {}
    for key, v in list(tensors.items()) + list(extra["scalars"].items()):
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": extra["param_groups"]})
