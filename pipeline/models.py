"""DCGAN generator and discriminator, as in the DCGAN paper and pytorch/examples, at 64, 128 or 256 px.

D returns logits (no Sigmoid): losses use softplus, which autocast accepts and which is the
numerically stable form of binary cross-entropy.

D normalizes with GroupNorm by default, not the paper's BatchNorm: D is also the detector, and a face's
score must not depend on the other faces in its batch, nor change between train and eval mode (with
BatchNorm, eval mode uses running statistics gathered mostly from fake batches). `d_norm="batch"` keeps
the paper's D, and loads checkpoints written before GroupNorm.

Each size beyond 64 px adds one block to each network, and each block doubles the channels, as the
DCGAN's own rule: at 256 px and width 64, G starts from 2,048 channels and D ends at 2,048. 256 px is
the shards' own crop size, and the detector gained most from resolution (BENCHMARKS.md); a narrower
model.ndf keeps a 256 px D affordable.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

SIZES = (64, 128, 256)


def _check_size(image_size: int) -> int:
    if image_size not in SIZES:
        raise ValueError(f"image_size {image_size} is not one of {SIZES}")
    return SIZES.index(image_size)  # extra up/down-sampling blocks beyond the 64 px network


class NoiseProjection(nn.ConvTranspose2d):
    """G's first layer, ConvTranspose2d(nz, C, 4) on a [N, nz, 1, 1] noise, computed as the matrix product it is.

    Same parameter, same state dict and the same function as the transposed convolution. At 1x1 the
    channels-last and contiguous layouts are the same tensor, and under torch.compile (torch 2.11, CUDA,
    channels-last weights) the compiled backward expected cuDNN's weight gradient channels-last and got it
    contiguous: an assert_size_stride failure. A matrix product has no layout to disagree about.
    """

    def __init__(self, nz: int, channels: int, side: int = 4):
        super().__init__(nz, channels, side, 1, 0, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        side = self.kernel_size
        return (z.flatten(1) @ self.weight.flatten(1)).view(z.shape[0], self.out_channels, *side)


class Generator(nn.Module):
    def __init__(self, nz: int = 100, ngf: int = 64, image_size: int = 64):
        super().__init__()
        extra = _check_size(image_size)
        top = ngf * 8 * 2**extra
        layers: list[nn.Module] = [  # z: [N, nz, 1, 1]
            NoiseProjection(nz, top), nn.BatchNorm2d(top), nn.ReLU(True),  # [N, top, 4, 4]
        ]
        ch = top
        while ch > ngf:  # each block doubles the side and halves the channels: 8, 16, 32 (, 64, 128)
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False), nn.Tanh()]  # [N, 3, S, S] in [-1, 1]
        self.main = nn.Sequential(*layers)
        self.nz = nz

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


D_NORMS = ("group", "batch")
D_GAN_HEADS = ("own", "shared")  # model.d_gan_head: see Discriminator


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # 32 groups (or fewer, of at least 4 channels each, at small ndf), and a count that divides the channels:
        # ndf 72 has 144 channels after its first downsampling, which 32 groups would not divide.
        return nn.GroupNorm(max(g for g in range(1, min(32, max(1, channels // 4)) + 1) if channels % g == 0), channels)
    raise ValueError(f"d_norm {kind!r} is not one of {D_NORMS}")


class Residual(nn.Module):
    """x + gain * LeakyReLU(norm(conv3x3(x))): a block of `model.d_blocks`, depth for D at one resolution.
    The gain starts at 0 (ReZero, Bachlechner et al. 2020), so a deeper D starts as the DCGAN's D (as a
    function: with one seed its other layers draw other initial weights) and its blocks grow in as they help;
    without it the GroupNorm would undo the small initialization, and each block would start by adding
    unit-scale noise to the features."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False), _norm(norm, channels),
                                  nn.LeakyReLU(0.2))
        self.gain = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gain * self.body(x)


class Discriminator(nn.Module):
    """D: its logit says real (> 0) or fake, and it is the deepfake detector.

    With `gan_head`, D has a second logit for the GAN alone: its own 4 x 4 convolution on the same last
    features, which learns real against G's samples. In D's update it sees those features detached, so the
    GAN's loss trains that head and never the layers below, which learn from reals and self-blends alone: the
    detector. G trains against the GAN's logit through every layer of D, as before. With one logit for both,
    the layers also learn "G's early samples are fake", which is no help against a face swap: on the CPU's
    synthetic benchmark (64 px, three seeds, 850 steps) the detector scored 0.07 video AUC lower with one logit
    (BENCHMARKS.md). With d_norm batch, G's samples still move BatchNorm's running statistics, which scoring
    uses; the default GroupNorm has none.

    With `blocks` (model.d_blocks), each resolution after a downsampling also gets that many Residual blocks.
    """

    def __init__(self, ndf: int = 64, image_size: int = 64, norm: str = "group", gan_head: bool = False,
                 blocks: int = 0):
        super().__init__()
        extra = _check_size(image_size)
        layers: list[nn.Module] = []
        ch = 3
        for i in range(4 + extra):  # halving the size down to 4 x 4: [N, ndf, S/2, S/2], then twice the channels each
            out = ndf * 2**i
            layers += [nn.Conv2d(ch, out, 4, 2, 1, bias=False)]
            layers += [_norm(norm, out)] if i else []  # as the DCGAN's: nothing normalizes the first layer
            layers += [nn.LeakyReLU(0.2, True)] + [Residual(out, norm) for _ in range(blocks)]
            ch = out
        layers += [nn.Conv2d(ch, 1, 4, 1, 0, bias=False)]  # [N, 1, 1, 1]
        self.main = nn.Sequential(*layers)
        self.gan_head = nn.Conv2d(ch, 1, 4, 1, 0, bias=False) if gan_head else None

    def forward(self, x: torch.Tensor, gan: bool = False) -> torch.Tensor:
        """[N] logits, > 0 meaning real: the detector's. With `gan`, [N, 2]: the detector's and the GAN's (the
        same logit twice where D has no GAN head)."""
        if not gan:
            return self.main(x).flatten()
        features = x
        for layer in itertools.islice(self.main, len(self.main) - 1):  # (a slice would build a Sequential each call)
            features = layer(features)
        detector = self.main[-1](features).flatten()
        if self.gan_head is None:
            return torch.stack([detector, detector], 1)
        # D's update (its weights want gradients): the GAN's loss reaches its head only. G's update (D frozen):
        # the gradient flows through every layer, back to G's samples.
        own = features.detach() if self.gan_head.weight.requires_grad else features
        return torch.stack([detector, self.gan_head(own).flatten()], 1)


def has_gan_head(state_dict: dict) -> bool:
    """Whether D's saved weights hold its own GAN logit (model.d_gan_head own, with G and self-blends both)."""
    return any(k.startswith("gan_head.") for k in state_dict)


def fake_score(logits: torch.Tensor) -> torch.Tensor:
    """P(fake) = sigmoid(-logit) of D's logits, in float64.

    In float32 the sigmoid is exactly 1 below a logit of about -16.6, so every confidently fake face would
    tie, and AUC counts ties as half; float64 keeps them apart down to about -36.7.
    """
    return torch.sigmoid(-logits.double())


def weights_init(m: nn.Module) -> None:
    """The DCGAN paper's initialization: conv weights N(0, 0.02), norm scale N(1, 0.02), shift 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def build_models(nz: int, ngf: int, ndf: int, image_size: int, generator: torch.Generator | None = None,
                 d_norm: str = "group", gan_head: bool = False, d_blocks: int = 0):
    """G and D, initialized; `generator` makes the initialization reproducible."""
    G, D = Generator(nz, ngf, image_size), Discriminator(ndf, image_size, d_norm, gan_head, d_blocks)
    with torch.random.fork_rng(devices=[]):
        if generator is not None:
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        G.apply(weights_init)
        D.apply(weights_init)
    return G, D
