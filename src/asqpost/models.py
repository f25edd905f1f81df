"""Model registry: ``name -> factory(num_classes, input_shape, **kwargs)``; never ``eval``.

``input_shape`` is one sample's shape without the batch: ``(C, H, W)`` for images, ``(C, L)`` for 1-D
signals.

Built in: CIFAR-style ResNet-20/32/56 (He et al. 2016, option-B shortcuts; any input size and channels), a
small CNN, an MLP, and a tiny transformer encoder classifier. torchvision's ResNet-18/34/50 and MobileNetV2
are registered when the optional ``[vision]`` extra is installed (random init: pretrained weights download,
so load your own by path).

Text encoders from Hugging Face / sentence-transformers folders (``hf``, ``minilm``) are specified by
:func:`asqpost.text.text_model_spec` and rebuilt here from their spec like the registered models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry
from .text import encoder_from_spec, hf_model_from_spec, is_hf_model_spec, is_text_spec

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make ``factory(num_classes=, input_shape=, **kwargs)`` buildable as ``create_model(name)``;
    a name registered twice raises ``ValueError``."""
    return MODELS.register(name)


def list_models() -> tuple[str, ...]:
    """Every registered model name (torchvision's with the ``[vision]`` extra), in registration order."""
    _register_vision()
    return MODELS.names()


def create_model(name: str, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), **kwargs) -> nn.Module:
    """Build a registered model by name for inputs of ``input_shape`` (no batch dimension)."""
    _register_vision()
    factory = MODELS.get(name)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    try:
        return factory(num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for model {name!r}: {err}") from err


def model_spec(name: str, num_classes: int, input_shape: tuple[int, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The plain-data description of a registered model that checkpoints and exports save."""
    return {"name": name, "num_classes": num_classes, "input_shape": list(input_shape), "kwargs": dict(kwargs)}


def model_from_spec(spec: Any) -> nn.Module:
    """Rebuild the float model a saved :func:`model_spec` (or :func:`asqpost.text.text_model_spec`) names, randomly
    initialised; ``ValueError`` if it is malformed or unknown."""
    if is_text_spec(spec):
        return encoder_from_spec(spec)
    if is_hf_model_spec(spec):
        return hf_model_from_spec(spec)
    try:
        return create_model(spec["name"], spec["num_classes"], tuple(spec["input_shape"]), **spec["kwargs"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"malformed model spec {spec!r}: {type(err).__name__}: {err}") from err


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{name} takes images (C, H, W), got input shape {input_shape}")
    return input_shape  # type: ignore[return-value]


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: 3 stages of ``depth = 6n + 2`` layers, widths ``w, 2w, 4w``."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, in_planes = [], width
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            layers = []
            for j in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _cifar_resnet(depth: int) -> ModelFactory:
    def make(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), width: int = 16) -> nn.Module:
        channels = _image_shape(f"resnet{depth}", input_shape)[0]
        return CifarResNet(depth, num_classes, channels, width)

    return make


for _depth in (20, 32, 56):
    register_model(f"resnet{_depth}")(_cifar_resnet(_depth))


@register_model("smallcnn")
def small_cnn(num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28), width: int = 32) -> nn.Module:
    """Three conv layers and a two-layer classifier: fast on 28x28 images."""
    in_channels = _image_shape("smallcnn", input_shape)[0]
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 4 * width),
        nn.ReLU(),
        nn.Linear(4 * width, num_classes),
    )


@register_model("mlp")
def mlp(num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28), hidden: int = 256) -> nn.Module:
    """Flatten, then two hidden layers (any input shape)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class TokenEncoder(nn.Module):
    """A tiny pre-norm transformer classifier over image rows as tokens (Linear layers on (N, T, C))."""

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
    ):
        super().__init__()
        if len(input_shape) == 3:  # (C, H, W): H tokens of C * W features
            tokens, features = input_shape[1], input_shape[0] * input_shape[2]
        elif len(input_shape) == 2:  # (T, C) token sequences
            tokens, features = input_shape
        else:
            raise ValueError(f"transformer takes (C, H, W) or (T, C) inputs, got {input_shape}")
        self.embed = nn.Linear(features, dim)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.ModuleList(_EncoderBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # (N, C, H, W) -> (N, H, C * W): one token per row
            x = x.permute(0, 2, 1, 3).flatten(2)
        h = self.embed(x) + self.pos[:, : x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, c)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


register_model("transformer")(TokenEncoder)

_VISION_DONE = False


def _register_vision() -> None:
    """Register torchvision models if the optional extra imports (it fails beside some torch builds)."""
    global _VISION_DONE
    if _VISION_DONE:
        return
    _VISION_DONE = True
    try:
        import torchvision.models as tvm
    except Exception:  # any import failure (missing, or built for another torch) means: not available
        return

    def factory(build: Callable[..., nn.Module]) -> ModelFactory:
        def make(num_classes: int = 1000, input_shape: tuple[int, ...] = (3, 224, 224), **kwargs) -> nn.Module:
            if _image_shape("torchvision model", input_shape)[0] != 3:
                raise ValueError("torchvision models take 3 input channels")
            return build(weights=None, num_classes=num_classes, **kwargs)

        return make

    for name in ("resnet18", "resnet34", "resnet50", "mobilenet_v2"):
        register_model(name)(factory(getattr(tvm, name)))
