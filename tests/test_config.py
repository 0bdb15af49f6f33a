import pytest
import yaml

from aimfair_ray import AimfairError
from aimfair_ray.config import load_config, load_saved


def test_preset_and_overrides(tmp_path):
    cfg = load_config("cmnist", overrides=["train.epochs=3", "data.colors=[[1,2,3],[4,5,6]]", "train.storage_path=null"])
    assert cfg.train.epochs == 3 and cfg.data.colors == [(1, 2, 3), (4, 5, 6)]
    assert abs(cfg.data.bias - 1 / 9) < 1e-12
    path = cfg.save(tmp_path)
    assert load_saved(path) == cfg
    assert yaml.safe_load(open(path))["train"]["epochs"] == 3


def test_user_yaml_is_merged(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("train: {lr: 0.01}\nmodel: {backbone: resnet18}\n")
    cfg = load_config("cmnist", str(f))
    assert cfg.train.lr == 0.01 and cfg.model.backbone == "resnet18" and cfg.train.epochs == 6


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.optimizer=adam", ["train.optimizer", "'adamw'", "'sgd'"]),
        ("data.dataset=imagenet", ["data.dataset", "'colored_mnist'", "'celeba'", "'utkface'", "'manifest'"]),
        ("model.backbone=vgg", ["model.backbone", "small_cnn", "resnet18", "efficientnet_lite0"]),
        ("train.epochs=0", ["train.epochs", "greater than or equal to 1"]),
        ("train.epoch=3", ["unknown field 'epoch'", "epochs", "batch_size"]),
        ("trian.epochs=3", ["unknown field 'trian'", "train", "data"]),
    ],
)
def test_bad_values_name_field_and_allowed(override, expected):
    with pytest.raises(AimfairError) as e:
        load_config("cmnist", overrides=[override])
    for text in expected:
        assert text in str(e.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(AimfairError, match="available presets: celeba, cmnist"):
        load_config("nope")


def test_cli_bad_set_exits_nonzero():
    from typer.testing import CliRunner

    from aimfair_ray.cli import app

    res = CliRunner().invoke(app, ["config", "show", "--set", "train.optimizer=adam"])
    assert res.exit_code == 2
    assert "train.optimizer" in res.output and "'adamw'" in res.output
    ok = CliRunner().invoke(app, ["config", "show", "--set", "train.epochs=4"])
    assert ok.exit_code == 0 and "epochs: 4" in ok.output


@pytest.mark.parametrize("preset", ["cmnist", "celeba", "utkface"])
def test_every_preset_loads_imagenet_weights_wherever_its_backbone_has_them(preset):
    """No preset turns the weights off: with efficientnet_lite0 they load unless the user sets model.pretrained=false
    (a CelebA run with them off trained a baseline that predicted one class)."""
    root = [] if preset == "cmnist" else ["data.root=/nonexistent"]
    assert load_config(preset, overrides=root + ["model.backbone=efficientnet_lite0"]).model.use_pretrained
    assert not load_config(preset, overrides=root + ["model.backbone=efficientnet_lite0",
                                                    "model.pretrained=false"]).model.use_pretrained
    assert not load_config(preset, overrides=root + ["model.backbone=resnet18"]).model.use_pretrained  # none to load
