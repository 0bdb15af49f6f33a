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
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["README.md", "_COMPLETE", "model.json",
                                                                   "model.safetensors"]  # README.md: its model card
    bad = tmp_path / "pickled"
    bad.mkdir()
    torch.save(m.state_dict(), bad / "model.pt")
    with pytest.raises(AimfairError, match="pickled checkpoints are never loaded"):
        load_classifier(bad)


def test_external_backbone_missing_package_is_clear():
    with pytest.raises(AimfairError, match="needs the 'timm' package"):
        build_model("timm:resnet50", 2)


@pytest.mark.parametrize("backbone,pretrained", [("small_cnn", False), ("resnet18", False), ("efficientnet_lite0", True)])
def test_a_short_training_leaves_eval_mode_agreeing_with_train_mode(backbone, pretrained):
    """After 40 steps, predictions with the running BatchNorm statistics (eval mode) match those with the batch's
    own (train mode): the running statistics followed the data. With EfficientNet-Lite's own momentum (0.01) they
    stay near their initial values and eval mode gave one class for every image."""
    from aimfair_ray.models import BN_MOMENTUM

    torch.manual_seed(0)
    m = build_model(backbone, 2, 32, pretrained=pretrained, width=8)
    assert {x.momentum for x in m.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)} == {BN_MOMENTUM}

    def batch(n):  # class 1: a brighter red channel; offset and scale far from a BatchNorm's initial 0 and 1
        y = torch.randint(0, 2, (n,))
        x = 3.0 + 2.0 * torch.rand(n, 3, 32, 32)
        x[:, 0] += 1.5 * y.view(-1, 1, 1).float()
        return x, y

    opt = torch.optim.Adam(m.parameters(), 1e-3)
    m.train()
    for _ in range(40):
        x, y = batch(32)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    x, _ = batch(128)
    with torch.no_grad():
        evl = m.eval()(x).argmax(1)
        trn = m.train()(x).argmax(1)
    assert (evl == trn).float().mean() >= 0.9 and 0 < evl.sum() < len(evl), (evl.float().mean(), (evl == trn).float().mean())
