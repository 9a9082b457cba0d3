"""Models: sizes from the papers' code, shapes on every dataset's inputs, the registry."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hvdcomp.train import models


def test_preact_resnets_have_the_size_of_liec_sgds_models():
    # Research notes §1.3: LIEC-SGD's PreActResNet18 has 11,171,146 parameters and ResNet34
    # 21,279,306 (CIFAR-10 heads), counted from the released code.
    assert models.count_parameters(models.build_model("resnet18", (3, 32, 32), 10)) == 11_171_146
    assert models.count_parameters(models.build_model("resnet34", (3, 32, 32), 10)) == 21_279_306
    # CIFAR-100 head: 512·100 + 100 instead of 512·10 + 10
    assert models.count_parameters(models.build_model("resnet34", (3, 32, 32), 100)) == \
        21_279_306 + 512 * 90 + 90


def test_resnet20_is_he_et_al_cifar_model():
    model = models.build_model("resnet20", (3, 32, 32), 10)
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters.
    assert 0.265e6 < models.count_parameters(model) < 0.275e6
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19  # 1 stem + 3 stages × 3 blocks × 2 convs (+ the dense layer = 20)
    assert all(c.kernel_size == (3, 3) for c in convs)  # option A: no projection shortcuts
    assert [c.out_channels for c in convs][::6] == [16, 16, 32, 64]


def test_preact_block_normalises_before_convolving():
    block = models.PreActBlock(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    # plain pre-activation: relu(bn1(x)) feeds both the conv path and the projection shortcut
    block.eval()
    act = torch.relu(block.bn1(x))
    expected = block.conv2(torch.relu(block.bn2(block.conv1(act)))) + block.shortcut(act)
    assert torch.allclose(block(x), expected)


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "cnn", "mlp", "logreg"])
@pytest.mark.parametrize("shape,classes", [((1, 8, 8), 10), ((3, 32, 32), 100)])
def test_every_model_maps_images_to_logits(name, shape, classes):
    torch.manual_seed(0)
    model = models.build_model(name, shape, classes)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, classes)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_flat_models_take_feature_vectors():
    assert models.build_model("mlp", (32,), 5)(torch.randn(3, 32)).shape == (3, 5)
    with pytest.raises(ValueError, match="image inputs"):
        models.build_model("cnn", (32,), 5)
    assert models.needs_images("cnn") and not models.needs_images("logreg")


def test_logistic_regression_is_an_affine_map_to_logits():
    model = models.build_model("logreg", (1, 8, 8), 10)
    linear = model[1]
    assert models.count_parameters(model) == 64 * 10 + 10
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    model = model.double()
    expected = x.reshape(4, 64) @ linear.weight.T + linear.bias
    assert torch.allclose(model(x), expected)


def test_mlp_layer_sizes():
    model = models.build_model("mlp", (1, 8, 8), 10)
    # 64 -> 128 -> 64 -> 10
    assert models.count_parameters(model) == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*resnet18.*mlp"):
        models.check_model_name("vgg")
    assert models.check_model_name("PreAct_ResNet18") == "resnet18"


def test_torchvision_models_when_torchvision_imports():
    tv = models.torchvision_models()
    if tv is None:
        with pytest.raises(ValueError, match="needs torchvision"):
            models.check_model_name("torchvision:resnet18")
        return
    model = models.build_model("torchvision:resnet18", (3, 32, 32), 7)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
