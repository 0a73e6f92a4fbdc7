"""Generators and discriminators, registered by name; every discriminator returns logits.

Each builder takes the image geometry and its config section and returns an `nn.Module`. The
published systems fix one image size; the builders here keep each system's layer recipe and adapt
the number of upsampling (downsampling) stages to `dataset.image_size`, so every architecture makes
28, 32, 64 and 128 pixel images. `width` scales every hidden layer's channel count (1.0 = as published).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import nn

from dcgan import distributed
from dcgan.errors import UserError, at_least, finite, one_of, unused


@dataclass
class GeneratorConfig:
    arch: str = "dcgan"  # a name in models.GENERATORS
    z_dim: int = 100  # length of the latent vector
    z_distribution: str = "normal"  # normal (N(0,1)) | uniform (U(-1,1))
    width: float = 1.0  # multiplies every hidden layer's channel count (1.0 = the published model)
    dropout: float = 0.0  # used by architectures that have dropout layers
    init: str = "dcgan"  # dcgan: N(0, 0.02) weights, BN N(1, 0.02) | default: PyTorch's own
    # With conditional=true, how the class enters G. embed: a learned label embedding joined to z (Mirza & Osindero
    # 2014); batchnorm: every BatchNorm scales and shifts by the class (conditional BatchNorm, Miyato & Koyama 2018).
    # embed is the default because it learned the classes far sooner in the Fashion-MNIST study (docs/RESULTS.md).
    condition: str = "embed"


@dataclass
class DiscriminatorConfig:
    arch: str = "dcgan"  # a name in models.DISCRIMINATORS
    width: float = 1.0
    dropout: float = 0.0
    norm: str = "batch"  # batch | none: normalization of the hidden conv layers
    init: str = "dcgan"
    spectral_norm: bool = False  # divide every conv/linear weight by its largest singular value (Miyato et al. 2018)
    # With conditional=true, how D reads the class. projection: logit + <embedding of the class, D's last
    # features> (Miyato & Koyama 2018); embed: a learned label plane joined to the image as one more channel.
    condition: str = "projection"


GENERATOR_CONDITIONS = ("embed", "batchnorm")
DISCRIMINATOR_CONDITIONS = ("projection", "embed")
LABEL_FEATURES = 50  # length of the label embedding joined to z (generator.condition=embed)


GeneratorBuilder = Callable[[int, int, GeneratorConfig], nn.Module]
DiscriminatorBuilder = Callable[[int, int, DiscriminatorConfig], nn.Module]
GENERATORS: Dict[str, GeneratorBuilder] = {}
DISCRIMINATORS: Dict[str, DiscriminatorBuilder] = {}


def generator(name: str):
    def register(builder: GeneratorBuilder) -> GeneratorBuilder:
        GENERATORS[name] = builder
        return builder

    return register


def discriminator(name: str):
    def register(builder: DiscriminatorBuilder) -> DiscriminatorBuilder:
        DISCRIMINATORS[name] = builder
        return builder

    return register


# ---------------------------------------------------------------- shared pieces


def random_latents(shape: Tuple[int, ...], distribution: str, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """Latent vectors from `generator.z_distribution`: N(0, 1) ("normal") or U(-1, 1) ("uniform")."""
    if distribution == "uniform":
        return torch.rand(shape, generator=generator, device=device).mul_(2).sub_(1)
    return torch.randn(shape, generator=generator, device=device)


def spatial_plan(image_size: int) -> Tuple[int, int]:
    """(start side, number of x2 stages) with start * 2**stages == image_size and start in 4..7.

    28 -> (7, 2), 32 -> (4, 3), 64 -> (4, 4), 128 -> (4, 5), 96 -> (6, 4).
    """
    start, stages = image_size, 0
    while start % 2 == 0 and start // 2 >= 4:
        start, stages = start // 2, stages + 1
    if start > 7 or stages < 2:
        raise UserError(
            f"dataset.image_size={image_size} can't be made by x2 upsampling from a 4..7 pixel start; "
            "use a size such as 28, 32, 48, 64, 96 or 128"
        )
    return start, stages


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU(True), "leaky_relu": nn.LeakyReLU(0.2, True), "selu": nn.SELU(True)}[name]


class Reshape(nn.Module):
    def __init__(self, *shape: int):
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


class Upsample(nn.Sequential):
    """Keras' UpSampling2D (nearest, x2) followed by a 'same'-padded convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5):
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        )


def deconv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = False) -> nn.ConvTranspose2d:
    """A x2 transposed conv ('same' in Keras terms) for kernel 4 or 5."""
    if kernel_size == 4:
        return nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1, bias=bias)
    # Kernel 5: padding 2 and output_padding 1 give exactly 2x, as TF's padding="same".
    return nn.ConvTranspose2d(in_channels, out_channels, 5, 2, 2, output_padding=1, bias=bias)


def dense_to_start(z_dim: int, channels: int, start: int, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Linear(z_dim, channels * start * start, bias=bias), Reshape(channels, start, start))


def downsample_layers(
    in_channels: int, widths: list, kernel_size: int, norm: str, dropout: float, strides: list | None = None
) -> nn.Sequential:
    """Strided convs with LeakyReLU 0.2; BN on every layer but the first, as in the DCGAN paper."""
    layers: list = []
    strides = strides or [2] * len(widths)
    for i, (out_channels, stride) in enumerate(zip(widths, strides, strict=False)):
        use_norm = norm == "batch" and i > 0
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=not use_norm))
        if use_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.LeakyReLU(0.2, True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_channels = out_channels
    return nn.Sequential(*layers)


def conv_output_side(image_size: int, kernel_size: int, strides: list) -> int:
    side = image_size
    for stride in strides:
        side = (side + 2 * (kernel_size // 2) - kernel_size) // stride + 1
    return side


class Logits(nn.Sequential):
    """Features -> one logit per image, shape [N]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).reshape(x.shape[0])


# ---------------------------------------------------------------- generators


@generator("dcgan")
def dcgan_generator(image_size: int, channels: int, cfg: GeneratorConfig) -> nn.Module:
    """Radford et al.: z as a 1x1 map, 4x4 transposed convs halving channels (512-256-128-64 at 64 px), BN+ReLU,
    tanh."""
    start, stages = spatial_plan(image_size)
    widths = [scaled(64 * 2 ** (stages - 1 - i), cfg.width) for i in range(stages)]
    layers: list = [
        Reshape(cfg.z_dim, 1, 1),
        nn.ConvTranspose2d(cfg.z_dim, widths[0], start, 1, 0, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(True),
    ]
    for in_channels, out_channels in zip(widths, widths[1:], strict=False):
        layers += [deconv(in_channels, out_channels, 4), nn.BatchNorm2d(out_channels), nn.ReLU(True)]
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
    layers += [deconv(widths[-1], channels, 4), nn.Tanh()]
    return nn.Sequential(*layers)


def dense_deconv_generator(image_size: int, channels: int, cfg: GeneratorConfig, top_channels: int) -> nn.Module:
    """TF-tutorial style: dense z -> 4x4xtop, BN, LeakyReLU (+dropout); a valid transposed conv to the
    start side when it is not 4 (4 -> 7 for 28 px); 4x4 x2 transposed convs halving channels; a 5x5 x2
    transposed conv to the image, tanh."""
    start, stages = spatial_plan(image_size)

    def block(out_channels: int) -> list:
        layers = [nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.2, True)]
        return layers + ([nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else [])

    width = scaled(top_channels, cfg.width)
    layers: list = [dense_to_start(cfg.z_dim, width, 4), *block(width)]
    if start != 4:
        narrower = max(1, width // 2)
        layers += [nn.ConvTranspose2d(width, narrower, start - 3, 1, 0, bias=False), *block(narrower)]
        width = narrower
    for _ in range(stages - 1):
        narrower = max(1, width // 2)
        layers += [deconv(width, narrower, 4), *block(narrower)]
        width = narrower
    layers += [deconv(width, channels, 5, bias=True), nn.Tanh()]
    return nn.Sequential(*layers)


@generator("tf_dcgan28")
def tf_dcgan28_generator(image_size: int, channels: int, cfg: GeneratorConfig) -> nn.Module:
    """Dense to 4x4x512; 256 (k4 valid -> 7x7), 128 (k4 s2 -> 14x14), out (k5 s2 -> 28x28) at 28 px."""
    return dense_deconv_generator(image_size, channels, cfg, top_channels=512)


@generator("tf_celeba28")
def tf_celeba28_generator(image_size: int, channels: int, cfg: GeneratorConfig) -> nn.Module:
    """Transposed convs from 1024 channels down: 1024 (4x4) - 512 (7x7) - 256 (14x14) - out (28x28)."""
    return dense_deconv_generator(image_size, channels, cfg, top_channels=1024)


@generator("keras_mnist")
def keras_mnist_generator(image_size: int, channels: int, cfg: GeneratorConfig) -> nn.Module:
    """Dense 128 x s/4 x s/4 with LeakyReLU 0.2, then (upsample x2 + 5x5 conv) twice: 64 then out, tanh."""
    if image_size % 4:
        raise UserError(f"generator keras_mnist needs dataset.image_size divisible by 4, got {image_size}")
    start, hidden, out = image_size // 4, scaled(128, cfg.width), scaled(64, cfg.width)
    layers: list = [dense_to_start(cfg.z_dim, hidden, start, bias=True), nn.LeakyReLU(0.2, True)]
    layers += [Upsample(hidden, out), nn.LeakyReLU(0.2, True)]
    if cfg.dropout > 0:
        layers.append(nn.Dropout(cfg.dropout))
    layers += [Upsample(out, channels), nn.Tanh()]
    return nn.Sequential(*layers)


@generator("keras_fashion")
def keras_fashion_generator(image_size: int, channels: int, cfg: GeneratorConfig) -> nn.Module:
    """Dense 128 x s/4 x s/4, BN; 5x5 x2 transposed conv 64 with SELU, BN; 5x5 x2 transposed conv out, tanh."""
    if image_size % 4:
        raise UserError(f"generator keras_fashion needs dataset.image_size divisible by 4, got {image_size}")
    start, hidden, out = image_size // 4, scaled(128, cfg.width), scaled(64, cfg.width)
    return nn.Sequential(
        dense_to_start(cfg.z_dim, hidden, start, bias=True),
        nn.BatchNorm2d(hidden),
        deconv(hidden, out, 5, bias=True),
        nn.SELU(True),
        nn.BatchNorm2d(out),
        deconv(out, channels, 5, bias=True),
        nn.Tanh(),
    )


@generator("keras_celeba64")
def keras_celeba64_generator(image_size: int, channels: int, cfg: GeneratorConfig) -> nn.Module:
    """Dense 4096 + LeakyReLU + BN, reshape to 16 channels at s/4 (16x16x16 at 64 px),
    upsample + 5x5 conv 128 + LeakyReLU + BN, upsample + 5x5 conv out, tanh."""
    if image_size % 4:
        raise UserError(f"generator keras_celeba64 needs dataset.image_size divisible by 4, got {image_size}")
    start = image_size // 4
    features = 16 * start * start  # 4096 at 64 px, as published
    hidden = scaled(128, cfg.width)
    return nn.Sequential(
        nn.Linear(cfg.z_dim, features),
        nn.LeakyReLU(0.2, True),
        nn.BatchNorm1d(features),
        Reshape(16, start, start),
        Upsample(16, hidden),
        nn.LeakyReLU(0.2, True),
        nn.BatchNorm2d(hidden),
        Upsample(hidden, channels),
        nn.Tanh(),
    )


# ---------------------------------------------------------------- discriminators


@discriminator("dcgan")
def dcgan_discriminator(image_size: int, channels: int, cfg: DiscriminatorConfig) -> nn.Module:
    """Radford et al.: 4x4 stride-2 convs 64-128-256-512 (at 64 px), BN but on the first, LeakyReLU 0.2,
    then a conv over the whole remaining map to one logit."""
    start, stages = spatial_plan(image_size)
    widths = [scaled(64 * 2**i, cfg.width) for i in range(stages)]
    layers: list = []
    in_channels = channels
    for i, out_channels in enumerate(widths):
        use_norm = cfg.norm == "batch" and i > 0
        layers.append(nn.Conv2d(in_channels, out_channels, 4, 2, 1, bias=not use_norm))
        if use_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.LeakyReLU(0.2, True))
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        in_channels = out_channels
    return Logits(*layers, nn.Conv2d(in_channels, 1, start, 1, 0))


def conv_then_dense(image_size: int, channels: int, cfg: DiscriminatorConfig, widths: list, strides: list) -> nn.Module:
    widths = [scaled(w, cfg.width) for w in widths]
    side = conv_output_side(image_size, 5, strides)
    features = downsample_layers(channels, widths, 5, cfg.norm, cfg.dropout, strides)
    return Logits(features, nn.Flatten(), nn.Linear(widths[-1] * side * side, 1))


@discriminator("tf_dcgan28")
def tf_dcgan28_discriminator(image_size: int, channels: int, cfg: DiscriminatorConfig) -> nn.Module:
    """Convs 64/128/256, 5x5 stride 2, BN on all but the first, LeakyReLU 0.2, dense to one logit."""
    return conv_then_dense(image_size, channels, cfg, [64, 128, 256], [2, 2, 2])


@discriminator("keras_mnist")
def keras_mnist_discriminator(image_size: int, channels: int, cfg: DiscriminatorConfig) -> nn.Module:
    """Convs 64 and 128, 5x5 stride 2, LeakyReLU 0.2, dropout (0.3 in the presets), dense to one logit."""
    return conv_then_dense(image_size, channels, cfg, [64, 128], [2, 2])


@discriminator("tf_celeba28")
def tf_celeba28_discriminator(image_size: int, channels: int, cfg: DiscriminatorConfig) -> nn.Module:
    """Four 5x5 convs 64-128-256-512 (strides 2, 2, 2, 1), BN but on the input layer, LeakyReLU, dense."""
    return conv_then_dense(image_size, channels, cfg, [64, 128, 256, 512], [2, 2, 2, 1])


@discriminator("mlp")
def mlp_discriminator(image_size: int, channels: int, cfg: DiscriminatorConfig) -> nn.Module:
    """The Keras CelebA MLP: flatten (12288 at 64x64x3) - 512 - 256 - 1, LeakyReLU 0.2."""
    hidden = [scaled(512, cfg.width), scaled(256, cfg.width)]
    layers: list = [nn.Flatten()]
    in_features = channels * image_size * image_size
    for out_features in hidden:
        layers += [nn.Linear(in_features, out_features), nn.LeakyReLU(0.2, True)]
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        in_features = out_features
    return Logits(*layers, nn.Linear(in_features, 1))


# ---------------------------------------------------------------- class-conditional networks (conditional=true)


def every_class(count: int, classes: int, device: torch.device | str) -> torch.Tensor:
    """Labels 0, 1, ..., classes-1, 0, 1, ...: what a conditional network uses when given no labels (grids,
    BatchNorm calibration, evaluation), so every class is drawn equally often."""
    return torch.arange(count, device=device) % classes


def class_rows(labels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Row `label` of `table` [classes, features] for each label: a gather on the device (no host read).

    Labels may also be weights over the classes, float [N, classes]: the rows mixed by them (gan-sample's walk
    from one class to another at a fixed latent)."""
    if labels.is_floating_point():
        return labels.to(table.dtype) @ table
    return table.index_select(0, labels)


class ConditionalBatchNorm(nn.Module):
    """BatchNorm whose gain and bias belong to the class: the statistics are shared by all classes, the scale
    and shift are each class's own (de Vries et al. 2017; the generator of Miyato & Koyama 2018)."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, classes: int):
        super().__init__()
        features = norm.num_features
        self.norm = type(norm)(features, eps=norm.eps, momentum=norm.momentum, affine=False)
        self.gain = nn.Parameter(torch.ones(classes, features))
        self.bias = nn.Parameter(torch.zeros(classes, features))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], -1) + (1,) * (x.dim() - 2)  # [N, C] or [N, C, 1, 1]
        gain, bias = class_rows(labels, self.gain).view(shape), class_rows(labels, self.bias).view(shape)
        return self.norm(x) * gain.to(x.dtype) + bias.to(x.dtype)


class ConditionalGenerator(nn.Module):
    """G(z, labels): one of the registered generators, with its BatchNorms made conditional or a label
    embedding joined to z (generator.condition). Labels are class indices, int64 [N] (or weights over the
    classes, float [N, classes]: see class_rows)."""

    def __init__(self, net: nn.Sequential, classes: int, embed: bool):
        super().__init__()
        self.classes = classes
        self.embed = nn.Embedding(classes, LABEL_FEATURES) if embed else None
        self.net = net

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        labels = every_class(len(z), self.classes, z.device) if labels is None else labels
        x = z if self.embed is None else torch.cat([z, class_rows(labels, self.embed.weight).to(z.dtype)], dim=1)
        for layer in self.net:  # the architecture's own layers, in order; conditional BatchNorm also reads labels
            x = layer(x, labels) if isinstance(layer, ConditionalBatchNorm) else layer(x)
        return x


def conditional_generator(builder, image_size: int, channels: int, cfg: GeneratorConfig, classes: int) -> nn.Module:
    if cfg.condition == "embed":  # the architecture as published, reading z and the label's embedding as one vector
        net = builder(image_size, channels, with_z_dim(cfg, cfg.z_dim + LABEL_FEATURES))
        return ConditionalGenerator(net, classes, embed=True)
    net = builder(image_size, channels, cfg)
    norms = [i for i, layer in enumerate(net) if isinstance(layer, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise UserError(
            f"generator.arch={cfg.arch} has no BatchNorm for generator.condition=batchnorm to make conditional; "
            "use generator.condition=embed"
        )
    for i in norms:
        net[i] = ConditionalBatchNorm(net[i], classes)
    return ConditionalGenerator(net, classes, embed=False)


def with_z_dim(cfg: GeneratorConfig | DictConfig, z_dim: int) -> GeneratorConfig | DictConfig:
    if isinstance(cfg, DictConfig):
        widened = cfg.copy()
        widened.z_dim = z_dim
        return widened
    return dataclasses.replace(cfg, z_dim=z_dim)


class ConditionalDiscriminator(nn.Module):
    """D(x, labels) -> logits [N], from one of the registered discriminators.

    projection (Miyato & Koyama 2018): D's last features h = phi(x) feed both its own output layer and an inner
    product with the class's embedding: logit = head(h) + <embed(y), h>. embed: the class's learned plane is
    joined to the image as one more input channel (the DCGAN-era cGAN)."""

    def __init__(self, net: nn.Sequential, classes: int, condition: str, image_size: int):
        super().__init__()
        self.classes, self.condition, self.image_size = classes, condition, image_size
        if condition == "projection":
            self.features, self.head = nn.Sequential(*list(net)[:-1]), net[-1]
            width = head_inputs(self.head)
        else:
            self.features, self.head = net, None
            width = image_size * image_size
        # A linear map used as a table, so spectral norm (discriminator.spectral_norm) bounds it as it bounds D.
        self.embed = nn.Linear(classes, width, bias=False)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        labels = every_class(len(x), self.classes, x.device) if labels is None else labels
        embedded = class_rows(labels, self.embed.weight.t()).to(x.dtype)  # [N, width]
        if self.head is None:
            plane = embedded.view(len(x), 1, self.image_size, self.image_size)
            return self.features(torch.cat([x, plane], dim=1)).reshape(len(x))
        h = self.features(x)
        return self.head(h).reshape(len(x)) + (embedded * h.reshape(len(x), -1)).sum(dim=1)


def head_inputs(head: nn.Module) -> int:
    """The number of features D's output layer reads: a linear layer's inputs, or a conv over the whole last map."""
    if isinstance(head, nn.Linear):
        return head.in_features
    if isinstance(head, nn.Conv2d):
        return head.in_channels * head.kernel_size[0] * head.kernel_size[1]
    raise UserError(f"a {type(head).__name__} output layer can't be projected; use discriminator.condition=embed")


def conditional_discriminator(
    builder, image_size: int, channels: int, cfg: DiscriminatorConfig, classes: int
) -> nn.Module:
    net = builder(image_size, channels + (cfg.condition == "embed"), cfg)
    if cfg.condition == "projection" and not isinstance(net, nn.Sequential):
        raise UserError(f"discriminator.arch={cfg.arch} is not a layer sequence; use discriminator.condition=embed")
    return ConditionalDiscriminator(net, classes, cfg.condition, image_size)


# ---------------------------------------------------------------- building


def init_dcgan(module: nn.Module) -> None:
    """DCGAN init: conv/linear weights N(0, 0.02), BN scale N(1, 0.02), biases zero."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, ConditionalBatchNorm):  # each class's gain and bias, as BatchNorm's
            nn.init.normal_(m.gain, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def build_generator(cfg, device: torch.device | str = "cpu", classes: int = 0) -> nn.Module:
    """The generator for a full training config (uses dataset geometry and the generator section).

    `classes` > 0 (conditional=true) makes it a ConditionalGenerator: G(z, labels)."""
    return _build(GENERATORS, "generator", cfg, device, classes)


def build_discriminator(cfg, device: torch.device | str = "cpu", classes: int = 0) -> nn.Module:
    model = _build(DISCRIMINATORS, "discriminator", cfg, device, classes)
    if cfg.discriminator.spectral_norm:
        apply_spectral_norm(model)  # after init: it reparametrizes the initialized weights
    return model


def _build(registry: dict, part: str, cfg, device: torch.device | str, classes: int = 0) -> nn.Module:
    section = cfg[part]
    builder = _lookup(registry, f"{part}.arch", section.arch)
    size, channels = cfg.dataset.image_size, cfg.dataset.channels
    with torch.device(device):
        if classes and part == "generator":
            model = conditional_generator(builder, size, channels, section, classes)
        elif classes:
            model = conditional_discriminator(builder, size, channels, section, classes)
        else:
            model = builder(size, channels, section)
    if section.init == "dcgan" and str(device) != "meta":
        init_dcgan(model)
    return model


def apply_spectral_norm(model: nn.Module) -> None:
    """Spectral normalization (Miyato et al. 2018) on every conv and linear layer: W / sigma(W), with sigma
    tracked by one power iteration per training forward pass. It bounds D's Lipschitz constant layer by
    layer; the raw weight becomes `parametrizations.weight.original`."""
    for module in list(model.modules()):
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.utils.parametrizations.spectral_norm(module)


def _lookup(registry: dict, key: str, name: str):
    if name not in registry:
        raise UserError(f"{key}={name!r} is not an architecture; choose one of {', '.join(sorted(registry))}")
    return registry[name]


def check_shapes(cfg) -> None:
    """Build both networks on the meta device and prove G makes [N, C, S, S] and D returns [N] logits."""
    size, channels = cfg.dataset.image_size, cfg.dataset.channels
    G, D = build_generator(cfg, "meta", checked_classes(cfg)), build_discriminator(cfg, "meta", checked_classes(cfg))
    check_dropout_used(cfg, G, D)
    z = torch.empty(2, cfg.generator.z_dim, device="meta")
    try:
        images = G(z)
    except RuntimeError as error:
        raise UserError(f"generator {cfg.generator.arch} can't make {size}x{size} images: {error}") from None
    if tuple(images.shape) != (2, channels, size, size):
        raise UserError(
            f"generator {cfg.generator.arch} makes images of shape {tuple(images.shape[1:])}, but the data set is "
            f"{(channels, size, size)}; pick another dataset.image_size or generator.arch"
        )
    try:
        logits = D(images)
    except RuntimeError as error:
        raise UserError(f"discriminator {cfg.discriminator.arch} can't read {size}x{size} images: {error}") from None
    if tuple(logits.shape) != (2,):
        raise UserError(
            f"discriminator {cfg.discriminator.arch} returned shape {tuple(logits.shape)}, not one logit per image"
        )


def checked_classes(cfg) -> int:
    """The classes the checks before training build with: the data's are not read yet, and any number >= 2 shows
    whether a conditional architecture works (label tables are small next to the networks)."""
    return 2 if getattr(cfg, "conditional", False) else 0


def check_dropout_used(cfg, G: nn.Module, D: nn.Module) -> None:
    """A dropout rate for an architecture that has no dropout layer would do nothing: refused, naming those that do."""
    for part, model in (("generator", G), ("discriminator", D)):
        section = cfg[part]
        if section.dropout > 0 and not any(isinstance(m, nn.Dropout) for m in model.modules()):
            unused(
                f"{part}.dropout",
                section.dropout,
                f"{part}.arch={section.arch} has no dropout layer",
                f"remove it, or pick an architecture with dropout (e.g. {part}.arch=dcgan)",
            )


def training_bytes_lower_bound(cfg, batch_size: int) -> int:
    """Bytes one training step needs at the least: float32 weights and gradients of G and D, and the
    outputs of their conv and linear layers for `batch_size` images, which backward keeps.

    Measured on the meta device (no memory), so it is safe to ask of any config, however large.
    """
    G, D = build_generator(cfg, "meta", checked_classes(cfg)), build_discriminator(cfg, "meta", checked_classes(cfg))
    parameters = sum(p.numel() for model in (G, D) for p in model.parameters())
    kept_per_pair = []  # outputs for a batch of 2: BatchNorm in training mode needs more than one image
    layers = [
        m for model in (G, D) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
    ]
    hooks = [
        layer.register_forward_hook(lambda module, inputs, output: kept_per_pair.append(output.numel()))
        for layer in layers
    ]
    try:
        D(G(torch.empty(2, cfg.generator.z_dim, device="meta")))
    finally:
        for hook in hooks:
            hook.remove()
    return 4 * (2 * parameters + batch_size * sum(kept_per_pair) // 2)


# ---------------------------------------------------------------- checks before training


def validate_networks(cfg) -> None:
    """generator.* and discriminator.* (check_shapes and check_memory then try the architectures at the data's size)."""
    at_least("generator.z_dim", cfg.generator.z_dim, 1)
    one_of("generator.z_distribution", cfg.generator.z_distribution, ("normal", "uniform"))
    for part in ("generator", "discriminator"):
        section = cfg[part]
        finite(f"{part}.width", section.width)  # a huge finite width is bounded by check_memory, in GiB
        if not section.width > 0:
            raise UserError(f"{part}.width must be > 0, got {section.width}")
        if not 0.0 <= section.dropout < 1.0:
            raise UserError(f"{part}.dropout must be in [0, 1), got {section.dropout}")
        one_of(f"{part}.init", section.init, ("dcgan", "default"))
    one_of("discriminator.norm", cfg.discriminator.norm, ("batch", "none"))


def check_memory(cfg) -> None:
    """Refuse a config whose networks clearly cannot fit, before a byte is allocated.

    The estimate is a lower bound (float32 weights, their gradients, and the conv outputs one batch
    keeps for the backward pass; no optimizer state, no data set), compared with all of the device's
    memory, so it only trips on configs that would certainly fail, such as a huge dataset.image_size.
    """
    batch_per_rank = max(1, cfg.trainer.batch_size // distributed.world().size)
    needed = training_bytes_lower_bound(cfg, batch_per_rank)
    where, available = device_memory(cfg.trainer.device)
    if available and needed > available:
        raise UserError(
            f"this config needs at least {needed / 2**30:,.0f} GiB to train "
            f"(dataset.image_size={cfg.dataset.image_size}, "
            f"a batch of {batch_per_rank}), more than the {available / 2**30:,.0f} GiB of {where}; use a smaller "
            "dataset.image_size (64 or 128 are typical), or lower trainer.batch_size, generator.width or "
            "discriminator.width"
        )


def device_memory(device: str) -> tuple:
    """(what, bytes) of memory on the device trainer.device names; (None, 0) when it cannot be known here."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "this machine's RAM", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if not torch.cuda.is_available():
        return None, 0  # resolve_device reports cuda without CUDA
    index = int(device[5:]) if device.startswith("cuda:") else distributed.world().local_rank
    if index >= torch.cuda.device_count():
        return None, 0
    return f"GPU cuda:{index}", torch.cuda.get_device_properties(index).total_memory
