"""Models of the papers' experiments, built for any input shape and number of classes.

==================  ==========================================================================
name                what
==================  ==========================================================================
``resnet18``        PreAct-ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks",
                    ECCV 2016), the CIFAR variant used by LIEC-SGD's code (``PreActBlock``,
                    3×3 stem, no max-pool): 11,171,146 parameters for CIFAR-10.
``resnet34``        PreAct-ResNet-34, LIEC-SGD's CIFAR-100 model.
``resnet20``        ResNet-20 for CIFAR (He et al., CVPR 2016, §4.2: 3 stages of 3 basic blocks,
                    16/32/64 channels, option-A identity shortcuts), DGC's CIFAR-10 model (0.27M).
``cnn``             a small CNN (two 3×3 conv + pool, one hidden dense layer).
``mlp``             a two-hidden-layer perceptron (the default: digits in seconds).
``logreg``          multinomial logistic regression (EF21's experiments are logistic regression).
``torchvision:X``   ``torchvision.models.X(num_classes=...)`` when torchvision imports.
==================  ==========================================================================

Image models take ``(N, C, H, W)`` inputs and end with adaptive average pooling, so they work on
8×8 digits as well as 64×64 Tiny ImageNet; ``mlp``/``logreg`` flatten whatever they get.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

InputShape = Tuple[int, ...]


# --- PreAct-ResNet ------------------------------------------------------------------------------
class PreActBlock(nn.Module):
    """BN-ReLU-conv, BN-ReLU-conv, identity added after (He et al. 2016b, Fig. 4(e))."""
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # the projection shortcut sees the pre-activated input, as in the paper's full
        # pre-activation
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, blocks_per_stage: Sequence[int], in_channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, in_planes = [], 64
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            for i in range(count):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(PreActBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        # LIEC-SGD's code (like the widely copied CIFAR PreActResNet) pools the last block's
        # output directly, without a final BN-ReLU; that is what gives 11,171,146 parameters.
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(x))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# --- ResNet-20 (CIFAR) --------------------------------------------------------------------------
class BasicBlockA(nn.Module):
    """Post-activation basic block with the parameter-free option-A shortcut (stride-2
    subsampling and zero-padding of the new channels), as in He et al. 2016a §4.2."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.pad = stride, planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride != 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int, num_classes: int):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(n):
                layers.append(BasicBlockA(in_planes, planes, 2 if (stage > 0 and i == 0) else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# --- small models -------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.conv1(x)), 2, ceil_mode=True)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2, ceil_mode=True)
        out = F.adaptive_avg_pool2d(out, 4).flatten(1)  # any input size -> 4×4
        return self.fc2(F.relu(self.fc1(out)))


def mlp(in_features: int, num_classes: int, hidden: Sequence[int] = (128, 64)) -> nn.Module:
    layers, width = [nn.Flatten()], in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def logistic_regression(in_features: int, num_classes: int) -> nn.Module:
    """Multinomial logistic regression: softmax(W x + b) trained with cross-entropy."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


# --- registry -----------------------------------------------------------------------------------
def _channels(shape: InputShape) -> int:
    if len(shape) != 3:
        raise ValueError(f"this model needs image inputs (C, H, W); the dataset gives {shape}")
    return shape[0]


BUILDERS: Dict[str, Callable[[InputShape, int], nn.Module]] = {
    "resnet18": lambda s, k: PreActResNet((2, 2, 2, 2), _channels(s), k),
    "resnet34": lambda s, k: PreActResNet((3, 4, 6, 3), _channels(s), k),
    "resnet20": lambda s, k: CifarResNet(20, _channels(s), k),
    "cnn": lambda s, k: SmallCNN(_channels(s), k),
    "mlp": lambda s, k: mlp(math.prod(s), k),
    "logreg": lambda s, k: logistic_regression(math.prod(s), k),
}
ALIASES = {"preact_resnet18": "resnet18", "preact_resnet34": "resnet34", "logistic": "logreg"}


def model_names() -> Sequence[str]:
    return tuple(BUILDERS) + ("torchvision:<name>",)


def torchvision_models():
    """The torchvision.models module, or None. torchvision wheels built for CUDA fail to import
    with a CPU torch with a RuntimeError (not ImportError), hence the broad except."""
    try:
        import torchvision.models as tv_models
        return tv_models
    except Exception:  # noqa: BLE001 - see docstring
        return None


def check_model_name(name: str) -> str:
    """Canonical model name, or ValueError naming the choices."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key in BUILDERS:
        return key
    if key.startswith("torchvision:"):
        tv = torchvision_models()
        if tv is None:
            raise ValueError(f"model {name!r} needs torchvision, which does not import here")
        if key.split(":", 1)[1] not in tv.list_models(module=tv):
            raise ValueError(f"torchvision has no model {key.split(':', 1)[1]!r}")
        return key
    raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")


def build_model(name: str, input_shape: InputShape, num_classes: int) -> nn.Module:
    key = check_model_name(name)
    if key.startswith("torchvision:"):
        tv = torchvision_models()
        return tv.get_model(key.split(":", 1)[1], num_classes=num_classes)
    return BUILDERS[key](tuple(input_shape), num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def needs_images(name: str) -> bool:
    """Whether the model takes (C, H, W) images rather than flat feature vectors."""
    key = check_model_name(name)
    return key not in ("mlp", "logreg")
