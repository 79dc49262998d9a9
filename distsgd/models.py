"""Reference models of the experiments, built for any of the data sets' input shapes.

Every model is an `nn.Sequential` whose top-level children are meaningful blocks (a conv block, a
ResNet stage, the classifier): Crossover-SGD's default segments are those children. Convolutions
keep the spatial size ('same' padding) and a 2x2 max-pool is added only while the feature map is
at least 4 pixels on each side, so 8x8 digits, 28x28 Fashion-MNIST and 32x32 CIFAR-10 all work::

    torch.manual_seed(0)
    model = build("cnn", (1, 28, 28), num_classes=10)
    flops = forward_flops(model, (1, 28, 28))
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from distsgd.data import DATASETS
from distsgd.errors import UsageError

MODELS = ("mlp", "cnn", "easgd-cnn", "resnet20")
MIN_POOL_SIZE = 4  # pool only while it leaves a map of at least 2x2


def build(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Model `name` (one of `MODELS`) for inputs of `input_shape` (without the batch dimension)."""
    if name not in _BUILDERS:
        raise UsageError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    if num_classes < 2:
        raise UsageError(f"num_classes={num_classes} is out of range: it must be at least 2")
    if not input_shape or any(d < 1 for d in input_shape):
        raise UsageError(f"input_shape={input_shape} is invalid: every size must be at least 1")
    if name != "mlp" and len(input_shape) != 3:
        raise UsageError(f"model {name!r} needs an image input shape (C, H, W), got "
                         f"{input_shape}; use 'mlp' for feature vectors")
    return _BUILDERS[name](tuple(input_shape), num_classes)


def default_model(dataset_name: str) -> str:
    """The model the experiments use for a data set: 'cnn' for images, 'mlp' for 'synthetic'."""
    if dataset_name not in DATASETS:
        raise UsageError(f"unknown dataset {dataset_name!r}: choose one of {', '.join(DATASETS)}")
    return "mlp" if dataset_name == "synthetic" else "cnn"


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 128), nn.ReLU(),
        nn.Linear(128, 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _conv_block(in_channels: int, out_channels: int, kernel: int,
                size: tuple[int, int]) -> tuple[nn.Sequential, tuple[int, int]]:
    """conv (same padding) -> ReLU -> max-pool 2 when the map is large enough; and the new size."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2), nn.ReLU()]
    if min(size) >= MIN_POOL_SIZE:
        layers.append(nn.MaxPool2d(2))
        size = (size[0] // 2, size[1] // 2)
    return nn.Sequential(*layers), size


def _cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3x3 conv blocks (16, 32 channels) and a linear classifier: about 20k parameters at
    28x28, small enough that the simulator runs many workers quickly."""
    channels, height, width = input_shape
    block1, size = _conv_block(channels, 16, 3, (height, width))
    block2, size = _conv_block(16, 32, 3, size)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * size[0] * size[1], num_classes))
    return nn.Sequential(block1, block2, classifier)


def _easgd_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The EASGD paper's 7-layer CIFAR-10 network (Zhang, Choromanska, LeCun 2015).

    conv5x5(64) -> pool -> conv5x5(128) -> pool -> conv3x3(64) -> linear(256) + dropout 0.5 ->
    linear(classes), ReLU throughout. The third conv has no pool, as in the paper.
    """
    channels, height, width = input_shape
    block1, size = _conv_block(channels, 64, 5, (height, width))
    block2, size = _conv_block(64, 128, 5, size)
    block3 = nn.Sequential(nn.Conv2d(128, 64, 3, padding=1), nn.ReLU())
    hidden = nn.Sequential(nn.Flatten(), nn.Linear(64 * size[0] * size[1], 256), nn.ReLU(),
                           nn.Dropout(0.5))
    return nn.Sequential(block1, block2, block3, hidden, nn.Linear(256, num_classes))


class _ShortcutA(nn.Module):
    """He et al.'s option A shortcut: subsample by `stride`, zero-pad the new channels.

    Parameter-free, as in the paper's CIFAR experiments, so every parameter of ResNet-20 sits in a
    conv, BatchNorm or the classifier.
    """

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra_channels // 2
        return nn.functional.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _ShortcutA(stride, out_channels - in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _stage(in_channels: int, out_channels: int, stride: int, blocks: int = 3) -> nn.Sequential:
    first = _BasicBlock(in_channels, out_channels, stride)
    rest = [_BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(first, *rest)


def _resnet20(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """CIFAR ResNet-20 (He, Zhang, Ren, Sun 2016, section 4.2): 3 stages x 3 basic blocks of
    16/32/64 channels, option-A shortcuts, global average pooling; about 0.27M parameters."""
    stem = nn.Sequential(nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False),
                         nn.BatchNorm2d(16), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
    model = nn.Sequential(stem, _stage(16, 16, 1), _stage(16, 32, 2), _stage(32, 64, 2), head)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):  # He initialisation, as in the paper
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


_BUILDERS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "mlp": _mlp, "cnn": _cnn, "easgd-cnn": _easgd_cnn, "resnet20": _resnet20}


@torch.no_grad()
def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Floating-point operations (2 x multiply-adds) of one forward pass of one sample.

    Counts Conv2d and Linear layers only, by forward hooks on a dummy input: they dominate the
    cost, and the count stays deterministic for modelling compute time. The model runs in eval
    mode so that BatchNorm statistics are untouched; its mode is restored afterwards.
    """
    total = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        per_output = 0  # multiply-adds per output element
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            per_output = module.in_features
        total += 2 * per_output * output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    first = next(model.parameters(), torch.empty(0))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((1, *input_shape), dtype=first.dtype, device=first.device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total
