import pytest
import torch

from aimfair_ray import AimfairError
from aimfair_ray.assets import asset_path
from aimfair_ray.models import build_model, load_classifier, save_classifier


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18", "efficientnet_lite0"])
def test_backbones_give_logits(backbone):
    m = build_model(backbone, num_classes=3, image_size=32, pretrained=False)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_efficientnet_uses_bundled_imagenet_weights():
    m = build_model("efficientnet_lite0", 2, 32, pretrained=True)
    ref = torch.load(asset_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(m.state_dict()["_conv_stem.weight"], ref["_conv_stem.weight"])
    assert m._fc.out_features == 2


def test_checkpoint_roundtrip_and_pickle_refusal(tmp_path):
    m = build_model("small_cnn", 2, width=8).eval()
    meta = {"backbone": "small_cnn", "width": 8, "num_classes": 2, "image_size": 32}
    save_classifier(m, meta, str(tmp_path / "ck"))
    m2, meta2 = load_classifier(tmp_path / "ck")
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(m(x), m2(x)) and meta2 == dict(meta, weights_sha256=meta2["weights_sha256"])
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["_COMPLETE", "model.json", "model.safetensors"]
    bad = tmp_path / "pickled"
    bad.mkdir()
    torch.save(m.state_dict(), bad / "model.pt")
    with pytest.raises(AimfairError, match="pickled checkpoints are never loaded"):
        load_classifier(bad)


def test_external_backbone_missing_package_is_clear():
    with pytest.raises(AimfairError, match="needs the 'timm' package"):
        build_model("timm:resnet50", 2)
