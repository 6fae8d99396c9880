"""Face swaps made the way the common swap tools make them (DeepFaceLab, faceswap-GAN, FaceSwap).

Those tools align the donor's face to the target's landmarks, render it with a model whose output is
64-256 px, correct its colour towards the target's skin, and blend it in under a mask built from the
target's landmarks. Each step leaves a trace detectors learn: the warp's geometry, the upscaling blur,
a residual colour shift, and the blending boundary. Every choice is drawn from `rng`, per swap.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.spatial import Delaunay

INNER = slice(17, 68)  # brows, eyes, nose, mouth: a mask without the jaw line, as FaceSwap's "components"
MODEL_SIDES_PX = (64, 256)  # the face resolutions swap models render at
BORDER_PX = 2  # seamlessClone rejects a mask whose bounding box touches the image's edge


def warp_face(donor: np.ndarray, donor_landmarks: np.ndarray, target_landmarks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The donor's face moved onto the target's 68 points, one affine map per Delaunay triangle.

    `size` is the target's (height, width). Each target pixel inside the landmarks' hull takes the
    affine map of its triangle back into the donor (pixels outside are left black); one remap over the
    whole face leaves no seams between triangles.
    """
    h, w = size
    triangles = Delaunay(target_landmarks).simplices  # [T, 3], the same indices on both faces
    labels = np.full((h, w), -1, np.int32)
    maps = np.zeros((len(triangles), 2, 3), np.float32)
    for t, tri in enumerate(triangles):
        dst, src = target_landmarks[tri].astype(np.float32), donor_landmarks[tri].astype(np.float32)
        if abs(np.cross(dst[1] - dst[0], dst[2] - dst[0])) < 0.5:  # degenerate: it covers no pixel
            continue
        maps[t] = cv2.getAffineTransform(dst, src)  # target -> donor, so only the target's triangle must be proper
        cv2.fillConvexPoly(labels, np.round(dst).astype(np.int32), t)
    inside = labels >= 0
    ys, xs = np.nonzero(inside)
    M = maps[labels[inside]]  # [P, 2, 3]
    map_x = np.full((h, w), -1, np.float32)
    map_y = np.full((h, w), -1, np.float32)
    map_x[inside] = M[:, 0, 0] * xs + M[:, 0, 1] * ys + M[:, 0, 2]
    map_y[inside] = M[:, 1, 0] * xs + M[:, 1, 1] * ys + M[:, 1, 2]
    return cv2.remap(donor, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _render_small(face: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator) -> np.ndarray:
    """The face region through a model's resolution and back: down to 64-256 px (or at least by 0.5-0.9), then up."""
    x, y, bw, bh = box
    side = max(bw, bh)
    factor = min(rng.uniform(*MODEL_SIDES_PX) / side, rng.uniform(0.5, 0.9))
    patch = face[y : y + bh, x : x + bw]
    small = cv2.resize(patch, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    out = face.copy()
    out[y : y + bh, x : x + bw] = cv2.resize(small, (bw, bh), interpolation=int(rng.choice([cv2.INTER_LINEAR, cv2.INTER_CUBIC])))
    return out


def reinhard_transfer(source: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`source` recoloured so that its LAB mean and spread inside `mask` match `target`'s (Reinhard et al.)."""
    src = cv2.cvtColor(source.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    dst = cv2.cvtColor(target.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    inside = mask > 0
    mu_s, sd_s = src[inside].mean(0), src[inside].std(0) + 1e-3
    mu_t, sd_t = dst[inside].mean(0), dst[inside].std(0) + 1e-3
    lab = (src - mu_s) / sd_s * sd_t + mu_t
    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)


def hull_mask(landmarks: np.ndarray, size: tuple[int, int], points: slice = slice(0, 68)) -> np.ndarray:
    """[H, W] uint8, 255 inside the convex hull of `landmarks[points]`."""
    mask = np.zeros(size, np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(landmarks[points]).astype(np.int32)), 255)
    return mask


def _blend(face: np.ndarray, target: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson (seamlessClone) or a feathered alpha, the two blends the tools offer."""
    x, y, bw, bh = cv2.boundingRect(mask)
    side = max(bw, bh)
    if rng.random() < 0.5:
        centre = (x + bw // 2, y + bh // 2)  # so that the clone lands where the mask is
        # A copy: OpenCV 5's seamlessClone overwrites its mask argument.
        cloned = cv2.seamlessClone(face, target, mask.copy(), centre, cv2.NORMAL_CLONE)
        # OpenCV's solver also shifts pixels just outside the mask; a swap tool pastes only inside it.
        inside = cv2.GaussianBlur(mask, (3, 3), 0).astype(np.float32)[..., None] / 255
        return np.clip(cloned * inside + target * (1 - inside) + 0.5, 0, 255).astype(np.uint8)
    # Erode first and blur by at most the erosion, so the feather stays inside the hull.
    erode_px = max(1, int(side * rng.uniform(0.03, 0.1)))
    sigma = max(0.5, erode_px * rng.uniform(0.2, 0.33))
    alpha = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * erode_px + 1, 2 * erode_px + 1)))
    alpha = cv2.GaussianBlur(alpha, (0, 0), sigma).astype(np.float32)[..., None] / 255
    return np.clip(face * alpha + target * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)


def swap_face(
    target: np.ndarray, target_landmarks: np.ndarray, donor: np.ndarray, donor_landmarks: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The target photo (RGB uint8) with the donor's face swapped in; the same size as `target`."""
    h, w = target.shape[:2]
    target_landmarks = np.asarray(target_landmarks, np.float32)
    face = warp_face(donor, np.asarray(donor_landmarks, np.float32), target_landmarks, (h, w))
    mask = hull_mask(target_landmarks, (h, w), INNER if rng.random() < 0.5 else slice(0, 68))
    mask = cv2.erode(mask, np.ones((3, 3), np.uint8))  # off the hull's edge pixels, which the warp may not cover
    mask[:BORDER_PX], mask[-BORDER_PX:], mask[:, :BORDER_PX], mask[:, -BORDER_PX:] = 0, 0, 0, 0
    if not mask.any():
        return target.copy()
    face = _render_small(face, cv2.boundingRect(mask), rng)
    if rng.random() < 0.8:  # most tools correct colour; the rest leave the donor's tone
        face = reinhard_transfer(face, target, mask)
    return _blend(face, target, mask, rng)
