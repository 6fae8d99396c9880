"""Self-Blended Images (Shiohara & Yamasaki, CVPR 2022) and quality degradations, on whole batches.

A self-blend pastes a face onto itself through a soft, jittered mask after a slight change of colour
and sharpness. It keeps the identity but leaves what every face swap leaves: a blending boundary and a
mismatch of colour and sharpness statistics inside it. A detector trained to find it generalises to
swaps it never saw. The recipe follows mapooon/SelfBlendedImages (src/utils/sbi.py, blend.py, funcs.py);
its pixel constants are at 256 px and are scaled by S/256 here. Two departures, measured (BENCHMARKS.md):
SBI's blurs and shift are sizes in its own working crop, 2 times the landmarks' width by 2.4 times their
height, larger than ours (a square 1.3 times the face box), so relative to the face ours are 0.6-0.75 of
SBI's; and one mask kind in four is the inner face without the jaw line, which SBI never draws. Matching
SBI on both scored lower on the synthetic swaps (video AUC 0.69 against 0.74), and on the mask kinds alone
too (0.68); half of those swaps paste an inner-face mask, so that set favours the inner kind.

The random numbers are drawn first, all at once, from a `torch.Generator` on the images' device
(`blend_draws`, `degrade_draws`); `blend_with` and `degrade_with` are then pure functions of tensors, which
torch.compile fuses whole (it cannot take a generator). Per-sample choices are masks and `torch.where`,
never Python branches on tensor values, so a GPU step never waits for the host. For that reason the
Gaussian blur and the JPEG codec are written here: kornia's (`gaussian_blur2d`, `jpeg_codec_differentiable`)
check their per-image sigma and quality by reading them on the host, a GPU sync per call (kornia 0.9, on an
H200); tests hold them to kornia's blur and OpenCV's JPEG. The blur is a product with a banded matrix per
axis (`_blur`), which a GPU does far faster than a filter per plane, so the elastic warp's smoothing uses it
too (`_elastic`, held to kornia's elastic_transform2d).

Write the README's grid (real | mask | blend, one face per row):
    python -m pipeline.sbi docs/sbi-grid.png
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from kornia.color import hsv_to_rgb, rgb_to_hsv

from pipeline.fastpaths import float32_products

REF_SIZE_PX = 256  # the size the reference's pixel constants hold at
BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)  # SBI's blend_list: full blends are drawn half the time
LANDMARK_MARGIN = 0.02  # landmarks may leave the crop by this fraction and still count as usable
MIN_HULL_AREA = 0.02  # fraction of the crop; a detected face's hull covers about 0.3
FOREHEAD_LIFT = (0.1, 0.4)  # brows move up by this fraction of the chin-to-brow distance
AFFINE_SHIFT = (0.03, 0.015)  # (x, y) fraction of S, as SBI's randaffine
AFFINE_SCALE_MIN = 0.95  # scale in [0.95, 1 / 0.95]
ELASTIC_ALPHA_PX, ELASTIC_SIGMA_PX = 50.0, 7.0  # albumentations' ElasticTransform as SBI calls it
BLUR_KERNEL_PX = (5, 25)  # odd kernel sizes of get_blend_mask's two blurs
SECOND_BLUR_SIGMA_PX = (5, 45)  # the second blur's sigma, truncated by its kernel
MASK_BLUR_SIZE_PX = (192, 256)  # get_blend_mask blurs after resizing the mask to this size per axis
RGB_SHIFT = 20 / 255
HUE_SHIFT_RAD = 0.05
SAT_VAL_SCALE = 0.1  # saturation and value are multiplied by 1 +- this
JPEG_QUALITY = (40, 100)


@dataclass
class SelfBlends:
    real: torch.Tensor  # [B, 3, S, S] in [-1, 1]: the pair's real image (the target, after the shared augmentation)
    fake: torch.Tensor  # [B, 3, S, S] in [-1, 1]: the self-blend (after the same shared augmentation)
    mask: torch.Tensor  # [B, 1, S, S] in [0, 1]: the final blend mask (blurred, deformed, times the ratio)
    ratio: torch.Tensor  # [B]: the blend ratio drawn from BLEND_RATIOS
    valid: torch.Tensor  # [B] bool: landmarks usable; where False, fake == real and the sample is a real only


def _rand(generator: torch.Generator, like: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=generator, device=like.device)


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u


def _directions(count: int, device: torch.device) -> torch.Tensor:
    # Half-step offsets keep every direction off the axes, so no x component is exactly zero.
    angle = (torch.arange(count, device=device, dtype=torch.float32) + 0.5) * (2 * math.pi / count)
    return torch.stack([angle.cos(), angle.sin()], 1)  # [K, 2]


def hull_mask(points: torch.Tensor, size: int, directions: int = 64) -> torch.Tensor:
    """Rasterize the convex hull of [B, N, 2] pixel points (pixel centres at integers) to [B, 1, size, size].

    No hull is built: a pixel is inside where u.p <= max_k u.P_k for every direction u, an outer
    approximation that is within a fraction of a pixel for 64 directions. Each constraint bounds x on a
    row from one side, so a row's inside is an interval and the work is [B, K, size], not [B, K, size^2].
    """
    u = _directions(directions, points.device)  # [K, 2]
    support = (points.float() @ u.T).amax(1)  # [B, K]
    pos = torch.arange(size, device=points.device, dtype=torch.float32)  # pixel centres
    bound = (support[:, :, None] - u[None, :, 1, None] * pos) / u[None, :, 0, None]  # [B, K, S]: x bound per row
    upper = (u[:, 0] > 0)[None, :, None]
    x_max = torch.where(upper, bound, torch.inf).amin(1)  # [B, S]
    x_min = torch.where(upper, -torch.inf, bound).amax(1)
    tol_px = 1e-3  # keeps pixels exactly on an edge inside, as cv2.fillConvexPoly does
    inside = (pos >= x_min[:, :, None] - tol_px) & (pos <= x_max[:, :, None] + tol_px)  # [B, S(y), S(x)]
    return inside[:, None].float()


def _hull_area(points: torch.Tensor, directions: int = 64) -> torch.Tensor:
    """[B, N, 2] -> [B]: the area of the polygon of extreme points, taken in angular order of the directions."""
    u = _directions(directions, points.device)
    idx = (points @ u.T).argmax(1)  # [B, K]: the extreme points walk the hull in order
    v = torch.gather(points, 1, idx[..., None].expand(-1, -1, 2))  # [B, K, 2]
    w = v.roll(-1, 1)
    return 0.5 * (v[..., 0] * w[..., 1] - w[..., 0] * v[..., 1]).sum(1).abs()


def landmarks_valid(landmarks: torch.Tensor) -> torch.Tensor:
    """[B, 68, 2] normalized landmarks -> [B] bool: finite, 3+ distinct points, inside the crop, a real area."""
    finite = torch.isfinite(landmarks).all(2).all(1)
    points = torch.nan_to_num(landmarks.float(), nan=0.0, posinf=0.0, neginf=0.0)
    inside = ((points >= -LANDMARK_MARGIN) & (points <= 1 + LANDMARK_MARGIN)).all(2).all(1)
    cells = torch.round(points * REF_SIZE_PX)  # distinct means distinct at 1/256 of the crop
    same = (cells[:, :, None] == cells[:, None]).all(-1)  # [B, N, N]
    n = points.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=points.device).tril(-1)
    distinct = (~(same & earlier).any(-1)).sum(1) >= 3
    return finite & inside & distinct & (_hull_area(points) > MIN_HULL_AREA)


def _dummy_landmarks(like: torch.Tensor) -> torch.Tensor:
    """[B, 68, 2]: points on a circle, a harmless stand-in for unusable landmarks."""
    angle = torch.arange(like.shape[1], device=like.device, dtype=torch.float32) * (2 * math.pi / like.shape[1])
    circle = 0.5 + 0.25 * torch.stack([angle.cos(), angle.sin()], 1)  # [68, 2]
    return circle.expand(like.shape[0], -1, -1)


def _region_points(points: torch.Tensor, kind: torch.Tensor, lift: torch.Tensor) -> torch.Tensor:
    """The points whose hull is the mask; kind 0 all, 1 inner, 2 outline + forehead, 3 outline.

    Kinds 0 and 3 give the face hull (SBI's dfl_full, components and facehull of Face X-ray's
    random_get_hull), kind 2 that hull with the brows lifted (its `extended` and 81-point facehull, which
    reach up the forehead). Kind 1, the brows, eyes, nose and mouth without the jaw line, is not SBI's: the
    inner-face masks that some swap tools paste. Points a kind leaves out are replaced by one it keeps, which
    leaves the hull unchanged.
    """
    chin, brows = points[:, 8], points[:, 17:27]  # [B, 2], [B, 10, 2]
    up = brows.mean(1) - chin  # [B, 2]: the face's vertical axis, chin to brows, in any head pose
    lifted = torch.cat([points[:, :17], brows + lift[:, None, None] * up[:, None], points[:, 27:]], 1)
    points = torch.where((kind == 2)[:, None, None], lifted, points)
    idx = torch.arange(points.shape[1], device=points.device)
    no_jaw = ((kind == 1)[:, None] & (idx < 17))[..., None]  # [B, 68, 1]
    outline = ((kind >= 2)[:, None] & (idx >= 27))[..., None]
    points = torch.where(no_jaw, points[:, 30:31], points)  # the nose tip is inside the inner face
    return torch.where(outline, points[:, 8:9], points)  # the chin is on the outline


def _gaussian_kernel_px(max_sigma_px: float) -> int:
    return 2 * math.ceil(3 * max_sigma_px) + 1


def _blur_matrices(n: int, kernel_px: int, sigma: torch.Tensor, reflect: bool = True) -> torch.Tensor:
    """[*sigma.shape, n, n]: for each sigma (in pixels), the banded matrix whose product with a line of n pixels
    is that line blurred by a Gaussian of `kernel_px` taps (odd), reflected at the ends (or zero beyond them).

    Built by adding each tap's weight where it reads (a scatter of [..., n, K] values: on 2 CPU cores 10 times
    cheaper than filling the [..., n, n] matrix entry by entry). Near the ends two taps of a row can read one
    pixel (three only with a kernel of 2n - 1 taps); two addends sum to the same bits in either order,
    so CUDA's atomic adds make the same matrix every run."""
    r = kernel_px // 2
    if r >= n:
        raise ValueError(f"a blur of {kernel_px} taps cannot reflect at the ends of {n} pixels")
    t = torch.arange(-r, r + 1, device=sigma.device)
    k = torch.exp(-t.float().square() / (2 * sigma.float()[..., None].square()))
    k = k / k.sum(-1, keepdim=True)  # [..., K]
    source = torch.arange(n, device=sigma.device)[:, None] + t  # [n, K]: the pixel each tap of each output reads
    if reflect:
        source = source.abs()
        source = torch.where(source > n - 1, 2 * (n - 1) - source, source)
    k = k[..., None, :] * ((source >= 0) & (source < n))  # [..., n, K]; reflected taps are always inside
    index = source.clamp(0, n - 1).expand(k.shape)
    return torch.zeros(*k.shape[:-1], n, device=k.device, dtype=k.dtype).scatter_add_(-1, index, k)


def _blur(x: torch.Tensor, kernel_px: int, sigma: torch.Tensor, reflect: bool = True) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with a sigma per image and axis ([B, 2]: y, x, in pixels),
    `kernel_px` taps (odd), reflected at the edges (or zero beyond them): kornia's gaussian_blur2d (filter2d's
    border_type "reflect" or "constant"), without its host check.

    Each axis is one batched matrix product with a banded matrix per image, rather than a convolution with a
    filter per plane: on an H200 such grouped convolutions took the most time of the self-blends (1.5 of 10.9 ms
    a batch at 128 px, 8.0 of 42.9 at 256), and a product of [S, S] matrices is little work for a GPU. The
    self-blends are made with TF32 off (`pipeline.fastpaths.float32_products`): rounded to TF32 they depended
    on which kernels made them, eager or compiled (BENCHMARKS.md)."""
    b, c, h, w = x.shape
    down = _blur_matrices(h, kernel_px, sigma[:, 0], reflect).to(x.dtype)  # [B, H, H]
    across = _blur_matrices(w, kernel_px, sigma[:, 1], reflect).to(x.dtype)  # [B, W, W]
    return down[:, None] @ x @ across[:, None].transpose(-1, -2)


def _elastic(mask: torch.Tensor, noise: torch.Tensor, kernel_px: int, sigma_px: float, alpha: float) -> torch.Tensor:
    """kornia's elastic_transform2d (bilinear, zero padding, align_corners False), with the smoothing of its
    displacement field done by _blur: the noise [B, 2, S, S] (x, then y) is blurred with zeros beyond the
    edges, scaled by alpha (grid units) and added to the identity grid."""
    b, _, h, w = mask.shape
    sigma = torch.full((b, 2), sigma_px, device=mask.device)
    displacement = _blur(noise, kernel_px, sigma, reflect=False) * alpha  # [B, 2, H, W]
    identity = F.affine_grid(torch.eye(2, 3, device=mask.device)[None], [1, 1, h, w], align_corners=False)
    return F.grid_sample(mask, identity + displacement.permute(0, 2, 3, 1), padding_mode="zeros",
                         align_corners=False)


def _warp(source: torch.Tensor, mask: torch.Tensor, u: torch.Tensor, elastic: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """SBI's randaffine: one random affine for the source and the mask, then an elastic warp of the mask.

    u: [B, 3] uniforms; elastic: [B, 2, S, S] uniforms, the warp's noise field."""
    b, _, s, _ = source.shape
    shift = torch.stack([_uniform(u[:, 0], -1, 1) * AFFINE_SHIFT[0], _uniform(u[:, 1], -1, 1) * AFFINE_SHIFT[1]], 1)
    inv_scale = 1 / _uniform(u[:, 2], AFFINE_SCALE_MIN, 1 / AFFINE_SCALE_MIN)  # [B]
    # affine_grid maps output to input coordinates, in units of half the image: the inverse of scale-then-shift.
    eye = torch.eye(2, device=source.device)[None] * inv_scale[:, None, None]  # [B, 2, 2]
    theta = torch.cat([eye, (-2 * shift * inv_scale[:, None])[..., None]], 2)  # [B, 2, 3]
    grid = F.affine_grid(theta, [b, 1, s, s], align_corners=False)
    source = F.grid_sample(source, grid, padding_mode="border", align_corners=False)
    mask = F.grid_sample(mask, grid, padding_mode="zeros", align_corners=False)
    # Smoothed uniform noise of unit pixel variance shrinks as 1/sigma: alpha scales as (S/256)^2 for a
    # displacement that scales as S/256; kornia wants it in grid units (2/S per pixel).
    sigma_px = ELASTIC_SIGMA_PX * s / REF_SIZE_PX
    alpha = ELASTIC_ALPHA_PX * (s / REF_SIZE_PX) ** 2 * 2 / s
    k = _gaussian_kernel_px(sigma_px)
    mask = _elastic(mask, elastic * 2 - 1, k, sigma_px, alpha)
    return source, mask


def _cv2_sigma(kernel_px: torch.Tensor | float) -> torch.Tensor | float:
    return 0.3 * ((kernel_px - 1) * 0.5 - 1) + 0.8  # what cv2.GaussianBlur picks for sigma 0


def _normalize_max(mask: torch.Tensor) -> torch.Tensor:
    return mask / mask.amax((1, 2, 3), keepdim=True).clamp_min(1e-6)


def _blend_mask(mask: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SBI's get_blend_mask: blur, keep only where the blur is 1 (an erosion), blur again, max to 1. u: [B, 5]."""
    s = mask.shape[-1]
    low, high = BLUR_KERNEL_PX
    k1 = low + 2 * torch.floor(u[:, 0] * ((high - low) // 2 + 1))  # [B] odd sizes, as randrange(5, 26, 2)
    k2 = low + 2 * torch.floor(u[:, 1] * ((high - low) // 2 + 1))
    # SBI blurs a copy resized to 192-256 px per axis: one of its pixels is S / size of ours.
    size_px = MASK_BLUR_SIZE_PX[0] + torch.floor(u[:, 2:4] * (MASK_BLUR_SIZE_PX[1] - MASK_BLUR_SIZE_PX[0] + 1))
    px = s / size_px  # [B, 2] (y, x)
    sigma1 = _cv2_sigma(k1)
    # A Gaussian of sigma 5-45 cut to k2 taps is between a Gaussian and a box of width k2.
    sigma2_px = _uniform(u[:, 4], *SECOND_BLUR_SIGMA_PX)
    sigma2 = (sigma2_px.pow(-2) + 12 / k2.pow(2)).rsqrt()
    kernel = _gaussian_kernel_px(max(_cv2_sigma(high), high / math.sqrt(12)) * s / MASK_BLUR_SIZE_PX[0])
    blurred = _normalize_max(_blur(mask, kernel, sigma1[:, None] * px))
    # The blur reaches 1 only a kernel radius inside a straight edge: there it is Phi(radius / sigma).
    threshold = torch.special.ndtr((k1 - 1) / 2 / sigma1) - 1e-4
    eroded = (blurred >= threshold[:, None, None, None]).float()
    return _normalize_max(_blur(eroded, kernel, sigma2[:, None] * px))


def _color_jitter(x: torch.Tensor, u: torch.Tensor, p: tuple[float, float, float], bc_limit: float) -> torch.Tensor:
    """albumentations' RGBShift, HueSaturationValue, RandomBrightnessContrast with probabilities p, on [0, 1].

    u: [B, 11] uniforms, passed in so that a real and its fake can share them. The reference's HSV
    limits of 0.3 are in uint8 units there (a no-op); here they are a small hue turn and a +-10% scale.
    """
    on = [(u[:, i] < p_i)[:, None, None, None] for i, p_i in zip((0, 4, 8), p)]
    shift = _uniform(u[:, 1:4], -RGB_SHIFT, RGB_SHIFT)[..., None, None]  # [B, 3, 1, 1]
    x = torch.where(on[0], (x + shift).clamp(0, 1), x)
    hsv = rgb_to_hsv(x)
    hue = (hsv[:, :1] + _uniform(u[:, 5], -HUE_SHIFT_RAD, HUE_SHIFT_RAD)[:, None, None, None]).remainder(2 * math.pi)
    sat_val = hsv[:, 1:] * (1 + _uniform(u[:, 6:8], -SAT_VAL_SCALE, SAT_VAL_SCALE))[..., None, None]
    x = torch.where(on[1], hsv_to_rgb(torch.cat([hue, sat_val.clamp(0, 1)], 1)).clamp(0, 1), x)
    # brightness_by_max: contrast scales about 0 and brightness adds a fraction of white, as for uint8 there.
    contrast = 1 + _uniform(u[:, 9], -bc_limit, bc_limit)[:, None, None, None]
    brightness = _uniform(u[:, 10], -bc_limit, bc_limit)[:, None, None, None]
    return torch.where(on[2], (x * contrast + brightness).clamp(0, 1), x)


def _down_up(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Resample [B, C, S, S] onto a grid `factor` ([B] in (0, 1]) times as dense and back up, bilinearly.

    Per-sample sizes cannot share one F.interpolate call, so the coarse grid is implicit: each output
    pixel blends its two nearest coarse samples per axis, and each coarse sample is read from the image.
    """
    s = x.shape[-1]
    pos = torch.arange(s, device=x.device, dtype=torch.float32)
    f = factor[:, None]  # [B, 1]
    coarse = (pos + 0.5) * f - 0.5  # [B, S]: output pixel centres in coarse pixels
    last = (s * f).floor().clamp_min(1) - 1
    i0 = coarse.floor().clamp_min(0).minimum(last)
    w1 = (coarse - i0).clamp(0, 1)
    i1 = (i0 + 1).minimum(last)
    taps = [((2 * ((i + 0.5) / f - 0.5) + 1) / s - 1, w) for i, w in ((i0, 1 - w1), (i1, w1))]  # grid units
    out = torch.zeros_like(x)
    for gy, wy in taps:
        for gx, wx in taps:
            grid = torch.stack([gx[:, None, :].expand(-1, s, -1), gy[:, :, None].expand(-1, -1, s)], -1)
            sample = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
            out = out + (wy[:, :, None] * wx[:, None, :])[:, None] * sample
    return out


def _sharpen(x: torch.Tensor, alpha: torch.Tensor, lightness: torch.Tensor) -> torch.Tensor:
    """albumentations' Sharpen: (1 - a) I + a K, K = -1 around a centre of 8 + lightness."""
    box9 = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1) * 9
    a, light = alpha[:, None, None, None], lightness[:, None, None, None]
    return ((1 - a) * x + a * ((9 + light) * x - box9)).clamp(0, 1)


def _source_transform(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SBI's source_transforms on [0, 1]: colour jitter, then a downscale or a sharpen. u: [B, 15]."""
    x = _color_jitter(x, u[:, :11], p=(0.3, 1.0, 1.0), bc_limit=0.1)
    down = _down_up(x, _uniform(u[:, 11], 0.25, 0.5))
    sharp = _sharpen(x, _uniform(u[:, 12], 0.2, 0.5), _uniform(u[:, 13], 0.5, 1.0))
    return torch.where((u[:, 14] < 0.5)[:, None, None, None], down, sharp)


# The JPEG standard's example quantization tables (ITU-T T.81, Annex K), which libjpeg scales by quality.
JPEG_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55), (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62), (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99),
)
JPEG_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99), (18, 21, 26, 66, 99, 99, 99, 99), (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99), *((99,) * 8,) * 4,
)
_JPEG_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def jpeg_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8x8 DCT-II matrix and the two tables ([2, 8, 8]), made once per device: a copy from the host
    inside the step would wait for the GPU. Call it before torch.compile traces `blend_with` or `degrade_with`:
    a trace that found the cache empty would guard on that and compile again at the next call."""
    if device not in _JPEG_CONSTANTS:
        k = torch.arange(8, dtype=torch.float64)
        dct = torch.cos((2 * k[None] + 1) * k[:, None] * math.pi / 16) * 0.5  # [frequency, position]
        dct[0] /= math.sqrt(2)
        tables = torch.tensor([JPEG_LUMA_TABLE, JPEG_CHROMA_TABLE], dtype=torch.float32)
        _JPEG_CONSTANTS[device] = (dct.float().to(device), tables.to(device))
    return _JPEG_CONSTANTS[device]


def _jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Baseline JPEG at a quality per image ([B] in 1..100), on [B, 3, H, W] in [0, 1]: YCbCr with 4:2:0
    chroma, 8x8 DCT, libjpeg's scaled tables, rounding, and back. Any H, W: edges are replicated to 16 px."""
    dct, tables = jpeg_constants(x.device)
    b, _, h, w = x.shape
    x = F.pad(x.float(), (0, -w % 16, 0, -h % 16), mode="replicate") * 255
    r, g, bl = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb = -0.168736 * r - 0.331264 * g + 0.5 * bl + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * bl + 128
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)  # [B, 2, H/2, W/2]
    q = quality.float().clamp(1, 100)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)[:, None, None, None]  # libjpeg's jpeg_quality_scaling
    table = ((tables[None] * scale + 50) / 100).floor().clamp(1, 255)  # [B, 2, 8, 8]

    def code(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:  # [B, C, H, W], table [B, 1, 8, 8]
        bb, c, hh, ww = plane.shape
        blocks = (plane - 128).reshape(bb, c, hh // 8, 8, ww // 8, 8).transpose(3, 4)  # [B, C, h, w, 8, 8]
        coeff = dct @ blocks @ dct.T
        t = table[:, :, None, None]
        blocks = dct.T @ ((coeff / t).round() * t) @ dct
        return blocks.transpose(3, 4).reshape(bb, c, hh, ww) + 128

    y = code(y[:, None], table[:, :1])[:, 0]
    cb, cr = F.interpolate(code(chroma, table[:, 1:]), scale_factor=2, mode="bilinear", align_corners=False).unbind(1)
    rgb = torch.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)], 1)
    return (rgb[..., :h, :w] / 255).clamp(0, 1)


def _shared_augment(real: torch.Tensor, fake: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SBI's get_transforms with additional_targets: the same parameters for both images of a pair. u: [B, 13]."""
    u = u.repeat(2, 1)  # [2B, 13]
    pair = _color_jitter(torch.cat([real, fake]), u[:, :11], p=(0.3, 0.3, 0.3), bc_limit=0.3)
    compressed = _jpeg(pair, _uniform(u[:, 11], *JPEG_QUALITY))
    pair = torch.where((u[:, 12] < 0.5)[:, None, None, None], compressed, pair)
    return pair.chunk(2)


def _pick(index: torch.Tensor, values: tuple[float, ...]) -> torch.Tensor:
    """values[index] per sample, without copying a table from the host."""
    return sum((index == i).float() * v for i, v in enumerate(values))


class BlendDraws(NamedTuple):
    """Every random number one batch of self-blends uses: uniforms in [0, 1)."""
    choice: torch.Tensor  # [B, 4]: mask kind, forehead lift, which image changes, blend ratio
    source: torch.Tensor  # [B, 15]: the source transform
    affine: torch.Tensor  # [B, 3]: the warp's shift and scale
    elastic: torch.Tensor  # [B, 2, S, S]: the elastic warp's noise field
    mask: torch.Tensor  # [B, 5]: the blend mask's blurs
    shared: torch.Tensor  # [B, 13]: the pair's shared augmentation


class DegradeDraws(NamedTuple):
    choice: torch.Tensor  # [B, 8] uniforms: which degradations, and how strong
    noise: torch.Tensor  # [B, 3, S, S] standard normal


def blend_draws(images: torch.Tensor, generator: torch.Generator) -> BlendDraws:
    b, _, s, _ = images.shape
    return BlendDraws(*(_rand(generator, images, b, *shape) for shape in ((4,), (15,), (3,), (2, s, s), (5,), (13,))))


def degrade_draws(images: torch.Tensor, generator: torch.Generator) -> DegradeDraws:
    return DegradeDraws(_rand(generator, images, images.shape[0], 8),
                        torch.randn(images.shape, generator=generator, device=images.device))


def self_blend(images: torch.Tensor, landmarks: torch.Tensor, generator: torch.Generator, augment: bool = True) -> SelfBlends:
    """Self-blends of [B, 3, S, S] images in [-1, 1] with their [B, 68, 2] normalized landmarks (in float32, TF32
    off: they are data). `augment`: the pair's shared colour jitter and JPEG, which training needs and validation,
    as SBI's, leaves out (the same numbers are drawn either way)."""
    with float32_products():
        return blend_with(images, landmarks, blend_draws(images, generator), augment)


def blend_with(images: torch.Tensor, landmarks: torch.Tensor, draws: BlendDraws, augment: bool = True) -> SelfBlends:
    """`self_blend` from numbers already drawn: a pure function of tensors, which torch.compile fuses whole."""
    x = images.float() * 0.5 + 0.5  # [B, 3, S, S] in [0, 1]
    b, _, s, _ = x.shape
    valid = landmarks_valid(landmarks)
    keep = valid[:, None, None, None]
    # Unusable rows get stand-in points before any arithmetic, so that no NaN reaches a pixel.
    points = torch.where(valid[:, None, None], torch.nan_to_num(landmarks.float()), _dummy_landmarks(landmarks))
    u = draws.choice
    kind = torch.floor(u[:, 0] * 4)
    mask = hull_mask(_region_points(points * s, kind, _uniform(u[:, 1], *FOREHEAD_LIFT)), s)  # [B, 1, S, S]
    changed = _source_transform(x, draws.source)
    on_source = (u[:, 2] < 0.5)[:, None, None, None]  # else the target changes and the real is the changed one
    source = torch.where(on_source, changed, x)
    target = torch.where(on_source | ~keep, x, changed)
    source, mask = _warp(source, mask, draws.affine, draws.elastic)
    ratio = _pick(torch.floor(u[:, 3] * len(BLEND_RATIOS)), BLEND_RATIOS)  # [B]
    mask = torch.where(keep, _blend_mask(mask, draws.mask) * ratio[:, None, None, None], 0.0)
    fake = mask * source + (1 - mask) * target
    real, fake = _shared_augment(target, fake, draws.shared) if augment else (target, fake)
    fake = torch.where(keep, fake, real)
    return SelfBlends(real * 2 - 1, fake * 2 - 1, mask, ratio, valid)


def degrade(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Independent random quality losses per image, each with probability p: resize, blur, noise, JPEG (in
    float32, TF32 off)."""
    with float32_products():
        return degrade_with(images, degrade_draws(images, generator), p)


def degrade_with(images: torch.Tensor, draws: DegradeDraws, p: float = 0.5) -> torch.Tensor:
    """`degrade` from numbers already drawn (a pure function, as `blend_with`)."""
    x = images.float() * 0.5 + 0.5  # [B, 3, S, S] in [0, 1]
    s = x.shape[-1]
    u = draws.choice
    on = (u[:, :4] < p)[:, :, None, None, None]  # [B, 4, 1, 1, 1]
    factor = _uniform(u[:, 4], 0.3, 0.8)
    # Anti-aliasing as skimage picks it, so that the downscale is area-like rather than point sampling.
    aa_sigma = ((1 / factor - 1) / 2).clamp_min(0.05)[:, None].repeat(1, 2)
    x = torch.where(on[:, 0], _down_up(_blur(x, _gaussian_kernel_px(1 / 0.3 / 2), aa_sigma), factor), x)
    blur_sigma = (_uniform(u[:, 5], 0.2, 1.5) * s / 64)[:, None].repeat(1, 2)
    x = torch.where(on[:, 1], _blur(x, _gaussian_kernel_px(1.5 * s / 64), blur_sigma), x)
    noise_std = _uniform(u[:, 6], 0.0, 0.03)[:, None, None, None]
    noise = draws.noise * noise_std
    x = torch.where(on[:, 2], (x + noise).clamp(0, 1), x)
    x = torch.where(on[:, 3], _jpeg(x, _uniform(u[:, 7], 30, 95)), x)
    return (x * 2 - 1).clamp(-1, 1)


def grid_png(path, images: torch.Tensor, landmarks: torch.Tensor, generator: torch.Generator, rows: int = 8) -> None:
    """Save `rows` rows of real | mask | blend as a PNG, for the README and for eyes."""
    import cv2
    from torchvision.utils import make_grid

    blends = self_blend(images[:rows], landmarks[:rows], generator)
    mask = blends.mask.expand(-1, 3, -1, -1) * 2 - 1
    cells = torch.stack([blends.real, mask, blends.fake], 1).flatten(0, 1)  # [3R, 3, S, S]
    grid = make_grid(cells * 0.5 + 0.5, nrow=3, padding=2, pad_value=1.0)
    rgb = (grid.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def demo_face():
    """Grace Hopper's 256 px face crop ([256, 256, 3] uint8 RGB) and its landmarks ([68, 2] in [0, 1])."""
    import importlib.util

    import cv2

    from pipeline.faces import FaceDetector, crop_face

    spec = importlib.util.find_spec("matplotlib")
    path = Path(spec.submodule_search_locations[0]) / "mpl-data/sample_data/grace_hopper.jpg"
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    crop = crop_face(rgb, FaceDetector(upsample=1, landmarks=True).largest(rgb), size=256, scale=1.3)
    return crop.image, crop.landmarks / 256


def demo_batch(crop, landmarks, size: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo face resized to `size`, repeated `batch` times, every other copy mirrored."""
    import cv2

    image = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1  # [3, S, S]
    points = torch.from_numpy(landmarks).float()  # [68, 2]
    # Pixel centres sit at x = column / 256, so a mirror maps x to (255 - column) / 256.
    mirrored = torch.stack([1 - 1 / 256 - points[:, 0], points[:, 1]], 1)
    flip = (torch.arange(batch) % 2 == 1)
    images = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return images, torch.where(flip[:, None, None], mirrored, points)


def template_landmarks() -> torch.Tensor:
    """A mean-looking face's 68 points ([68, 2] in [0, 1] of a 1.3x face crop), in dlib's order, drawn from
    ellipses: for timing and GPU checks where neither a face photo nor dlib is at hand."""
    def arc(cx, cy, rx, ry, start, stop, n):
        t = torch.linspace(start, stop, n)
        return torch.stack([cx + rx * torch.cos(t), cy + ry * torch.sin(t)], 1)

    pi = math.pi
    brow = lambda x0: torch.stack([torch.linspace(x0, x0 + 0.19, 5), 0.36 - 0.02 * torch.sin(torch.linspace(0, pi, 5))], 1)  # noqa: E731
    return torch.cat([
        arc(0.5, 0.42, -0.33, 0.44, 0, pi, 17),  # jaw, left ear to right ear through the chin
        brow(0.25), brow(0.56),
        torch.stack([torch.full((4,), 0.5), torch.linspace(0.40, 0.56, 4)], 1),  # nose bridge
        torch.stack([torch.linspace(0.44, 0.56, 5), torch.tensor([0.59, 0.60, 0.61, 0.60, 0.59])], 1),  # nostrils
        arc(0.35, 0.42, 0.06, 0.025, pi, 3 * pi, 7)[:6], arc(0.65, 0.42, 0.06, 0.025, pi, 3 * pi, 7)[:6],  # eyes
        arc(0.5, 0.72, 0.13, 0.05, pi, 3 * pi, 13)[:12], arc(0.5, 0.72, 0.08, 0.02, pi, 3 * pi, 9)[:8],  # lips
    ])


def template_batch(size: int, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random images in [-1, 1] ([B, 3, S, S], never zeros) with `template_landmarks`, on the generator's device."""
    device = generator.device
    coarse = torch.rand(batch, 3, 8, 8, generator=generator, device=device)
    images = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1
    return images, template_landmarks().to(device).expand(batch, 68, 2).contiguous()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pipeline.sbi OUT.png")
    images, landmarks = demo_batch(*demo_face(), size=128, batch=8)
    grid_png(sys.argv[1], images, landmarks, torch.Generator().manual_seed(0), rows=8)
    print(f"wrote {sys.argv[1]}")
