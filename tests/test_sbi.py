import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import sbi
from pipeline.sbi import BLEND_RATIOS, degrade, demo_batch, demo_face, grid_png, hull_mask, landmarks_valid, self_blend, template_batch


@pytest.fixture(scope="module")
def face():
    """Grace Hopper's 256 px crop and her 68 dlib landmarks in [0, 1], detected once."""
    return demo_face()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def blended(face):
    """{size: (landmarks, blends)} of one batch per size, shared by the tests that only read them (the CPU is slow)."""
    out = {}
    for size, batch in ((64, 16), (128, 12)):
        images, landmarks = demo_batch(*face, size=size, batch=batch)
        out[size] = landmarks, self_blend(images, landmarks, _gen(size))
    return out


def _cv2_hull(points_px: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, size), np.uint8)
    hull = cv2.convexHull(np.round(points_px * 16).astype(np.int32))  # 4 fractional bits
    cv2.fillConvexPoly(out, hull, 1, lineType=cv2.LINE_8, shift=4)
    return out.astype(bool)


def _forehead_hull(landmarks: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 1, S, S]: the largest region any mask kind starts from: all 68 points plus brows at the highest lift."""
    chin, brows = landmarks[:, 8], landmarks[:, 17:27]
    lifted = brows + sbi.FOREHEAD_LIFT[1] * (brows.mean(1) - chin)[:, None]
    return hull_mask(torch.cat([landmarks, lifted], 1) * size, size)


def _dilate(mask: torch.Tensor, radius_px: int) -> torch.Tensor:
    return F.max_pool2d(mask, 2 * radius_px + 1, stride=1, padding=radius_px)


def test_hull_mask_matches_opencv_fill_of_the_convex_hull(face):
    _, landmarks = face
    size = 128
    points = torch.from_numpy(landmarks).float() * size  # [68, 2]
    mirrored = torch.stack([size - 1 - points[:, 0], points[:, 1]], 1)
    # All points, the inner face, the outline, and a mirrored face: different shapes and orientations.
    sets = [points, points[17:], points[:27], mirrored]
    for pts in sets:
        ours = hull_mask(pts[None], size)[0, 0].bool().numpy()
        ref = _cv2_hull(pts.numpy(), size)
        iou = (ours & ref).sum() / (ours | ref).sum()
        assert iou > 0.97, iou
    # Shorter sets are padded with copies of a point they hold, which leaves their hulls unchanged.
    padded = torch.stack([torch.cat([p, p[:1].expand(68 - len(p), -1)]) for p in sets])
    batched = hull_mask(padded, size)[:, 0].bool().numpy()
    assert all((batched[i] == hull_mask(p[None], size)[0, 0].bool().numpy()).all() for i, p in enumerate(sets))


@pytest.mark.parametrize("size", [64, 128])
def test_blend_mask_stays_inside_the_dilated_hull(blended, size):
    landmarks, blends = blended[size]
    assert blends.valid.all()
    # Margins from the recipe's constants, as fractions of S: the affine's shift and its scale about the centre
    # (face points lie within 0.75 S of it), 4 std of the elastic displacement, and the second blur's reach
    # to 1% (2.33 sigma for a straight edge) for its widest sigma, a box of 25 px at a 192 px mask.
    affine = sbi.AFFINE_SHIFT[0] + 0.75 * (1 / sbi.AFFINE_SCALE_MIN - 1)
    elastic = 4 * sbi.ELASTIC_ALPHA_PX * (1 / math.sqrt(3)) / (2 * math.sqrt(math.pi) * sbi.ELASTIC_SIGMA_PX) / 256
    blur = 2.33 * sbi.BLUR_KERNEL_PX[1] / math.sqrt(12) / sbi.MASK_BLUR_SIZE_PX[0]
    margin_px = math.ceil((affine + elastic + blur) * size)
    allowed = _dilate(_forehead_hull(landmarks, size), margin_px)
    outside = (blends.mask > 0.01) & (allowed < 0.5)
    assert not outside.any(), outside.sum((1, 2, 3))
    core_area = (blends.mask >= 0.5 * blends.ratio[:, None, None, None]).float().mean((1, 2, 3))  # of S^2
    assert (core_area > 0.08).all(), core_area
    # Every kind is about symmetric, so the mask sits on the face's midline up to the affine's shift:
    # this is what catches x and y swapped, which the wide margin above would forgive.
    column = blends.mask.sum(2)[:, 0]  # [B, S]
    centre_x = (column * torch.arange(size)).sum(1) / column.sum(1) / size
    midline_x = landmarks[:, :27, 0].mean(1)
    assert ((centre_x - midline_x).abs() < sbi.AFFINE_SHIFT[0] + 0.02).all(), centre_x - midline_x


def test_blend_ratio_is_one_of_the_recipe_values(blended):
    ratios = torch.cat([blends.ratio for _, blends in blended.values()])
    assert set(ratios.tolist()) == set(BLEND_RATIOS)
    for _, blends in blended.values():
        assert torch.allclose(blends.mask.amax((1, 2, 3)), blends.ratio, atol=1e-4)
        assert blends.mask.min() >= 0


def test_fake_differs_from_real_only_where_the_mask_is_nonzero(blended):
    _, blends = blended[128]
    diff = (blends.fake - blends.real).abs().amax(1, keepdim=True)  # [B, 1, S, S]
    # JPEG's 16 px chroma blocks spread a difference to the blocks the mask touches; the colour jitter
    # is per pixel and shared, so beyond them real and fake are the same.
    far = _dilate((blends.mask > 1e-3).float(), 16) < 0.5
    assert far.float().mean() > 0.05
    assert (diff[far] < 3e-3).all(), diff[far].max()
    inside = blends.mask > 0.5
    inside_mean = (diff * inside).sum((1, 2, 3)) / inside.sum((1, 2, 3)).clamp_min(1)
    assert (inside_mean > 0.01).float().mean() >= 0.5, inside_mean


def test_same_seed_gives_identical_blends_and_another_seed_does_not(face):
    images, landmarks = demo_batch(*face, size=64, batch=4)
    a, b, c = (self_blend(images, landmarks, _gen(seed)) for seed in (4, 4, 5))
    for name in ("real", "fake", "mask", "ratio"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.fake, c.fake) and not torch.equal(a.mask, c.mask)


def test_a_blend_without_the_pairs_augmentation_is_the_one_whose_draws_leave_it_out(face):
    # Validation's blends (as SBI's): the same draws, no colour jitter nor JPEG on the pair.
    images, landmarks = demo_batch(*face, size=64, batch=8)
    draws = sbi.blend_draws(images, _gen(6))
    plain = sbi.blend_with(images, landmarks, draws, augment=False)
    left_out = sbi.blend_with(images, landmarks, draws._replace(shared=torch.ones_like(draws.shared)))  # u = 1: never
    augmented = sbi.blend_with(images, landmarks, draws)
    for name in ("real", "fake", "mask", "ratio"):
        assert torch.equal(getattr(plain, name), getattr(left_out, name)), name
    assert not torch.equal(plain.fake, augmented.fake) and torch.equal(plain.mask, augmented.mask)


def test_half_precision_channels_last_images_give_float32_blends(face):
    images, landmarks = demo_batch(*face, size=64, batch=4)
    half = images.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    blends = self_blend(half, landmarks, _gen(6))
    assert all(t.dtype == torch.float32 for t in (blends.real, blends.fake, blends.mask))
    assert blends.fake.shape == (4, 3, 64, 64) and blends.mask.shape == (4, 1, 64, 64)
    assert blends.fake.min() >= -1 and blends.fake.max() <= 1


def test_sizes_that_are_not_multiples_of_16_work(face):
    images, landmarks = demo_batch(*face, size=72, batch=4)
    blends = self_blend(images, landmarks, _gen(7))
    assert blends.fake.shape == (4, 3, 72, 72) and torch.isfinite(blends.fake).all()
    assert degrade(images, _gen(7), p=1.0).shape == (4, 3, 72, 72)


def test_degenerate_landmarks_are_flagged_and_left_real(face):
    images, landmarks = demo_batch(*face, size=64, batch=8)
    landmarks = landmarks.clone()
    landmarks[0] = float("nan")
    landmarks[1, 30] = float("nan")  # one lost point is enough to distrust the row
    landmarks[2] = 0.5  # all points equal
    landmarks[3, :34], landmarks[3, 34:] = 0.3, 0.6  # two distinct points
    landmarks[4] += 0.5  # mostly outside the crop
    landmarks[5, :, 1] = 0.5  # collinear: no area
    expected = torch.tensor([False] * 6 + [True] * 2)
    assert torch.equal(landmarks_valid(landmarks), expected)
    blends = self_blend(images, landmarks, _gen(8))
    assert torch.equal(blends.valid, expected)
    for t in (blends.real, blends.fake, blends.mask, blends.ratio):
        assert torch.isfinite(t).all()
    assert torch.equal(blends.fake[:6], blends.real[:6])
    assert (blends.mask[:6] == 0).all() and (blends.mask[6:].amax((1, 2, 3)) > 0.2).all()


def test_degrade_is_per_image_deterministic_and_in_range(face):
    images, _ = demo_batch(*face, size=64, batch=8)
    images = torch.cat([images[:1]] * 8)  # one image, so that any difference comes from its own draws
    a, b = degrade(images, _gen(9)), degrade(images, _gen(9))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, degrade(images, _gen(10)))
    assert torch.allclose(degrade(images, _gen(9), p=0.0), images, atol=1e-6)
    every = degrade(images.to(torch.bfloat16), _gen(9), p=1.0)
    assert every.dtype == torch.float32
    changed = (every - images).abs().mean((1, 2, 3))  # [B]
    assert (changed > 0.005).all(), changed
    distinct = {tuple(x.flatten()[:64].tolist()) for x in every}
    assert len(distinct) == 8  # each image draws its own parameters


def test_grid_png_is_written(face, tmp_path):
    images, landmarks = demo_batch(*face, size=64, batch=4)
    path = tmp_path / "docs" / "grid.png"
    grid_png(path, images, landmarks, _gen(11), rows=4)
    image = cv2.imread(str(path))
    assert image.shape == (4 * 66 + 2, 3 * 66 + 2, 3)
    assert image.std() > 10


@pytest.mark.gpu
def test_no_host_sync():
    g = torch.Generator(device="cuda").manual_seed(0)
    images, landmarks = template_batch(128, 8, g)  # no photo or dlib needed on the GPU machine
    self_blend(images, landmarks, g)  # warm-up: kernels and caches may sync the first time
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        self_blend(images, landmarks, g)
        degrade(images, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_template_face_blends_like_a_detected_one(face):
    """bench/step.py and the GPU checks blend the template where no photo or dlib exists: its hull must be a face's."""
    template = sbi.template_landmarks()
    assert template.shape == (68, 2) and landmarks_valid(template[None]).item()
    size = 64
    template_hull, face_hull = (hull_mask(torch.as_tensor(p, dtype=torch.float32)[None] * size, size) for p in (template, face[1]))
    overlap = (template_hull * face_hull).sum() / torch.maximum(template_hull, face_hull).sum()
    assert overlap > 0.6  # the template's face covers about where a detected face does
    images, landmarks = template_batch(size, 4, _gen(3))
    assert images.abs().max() <= 1 and images.std() > 0.1
    blends = self_blend(images, landmarks, _gen(4))
    assert blends.valid.all() and (blends.fake - blends.real).abs().amax(dim=(1, 2, 3)).min() > 0


def test_self_blends_and_degradations_never_read_a_device_value_on_the_host():
    """The CPU twin of test_no_host_sync: kornia's blur and JPEG read their sigma and quality (a GPU sync each)."""
    from host_reads import HostReads

    images, landmarks = template_batch(64, 8, _gen(0))
    with HostReads() as reads:
        self_blend(images, landmarks, _gen(1))
        degrade(images, _gen(2), p=1.0)
    assert reads.reads == []


@pytest.mark.parametrize("make, pure", [("self_blend", "blend_with"), ("degrade", "degrade_with")])
def test_the_eager_self_blends_and_degradations_are_made_with_float32_products(monkeypatch, tf32_on, make, pure):
    # Validation calibrates on `self_blend`'s blends: with TF32 they would be rounded apart from the step's
    # (GANStep.make_inputs turns it off for its own; tests/test_step.py).
    seen = []
    inner = getattr(sbi, pure)

    def spy(*args):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return inner(*args)

    monkeypatch.setattr(sbi, pure, spy)
    images, landmarks = template_batch(32, 2, _gen(0))
    args = (images, landmarks, _gen(1)) if make == "self_blend" else (images, _gen(1))
    getattr(sbi, make)(*args)
    assert seen == [False] and torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("reflect, border", [(True, "reflect"), (False, "constant")])
@pytest.mark.parametrize("size", [(48, 64), (9, 12)])  # 9 rows: the taps reach both ends, reflected
def test_the_blur_is_kornias(reflect, border, size):
    from kornia.filters import gaussian_blur2d

    x = torch.rand(4, 3, *size, generator=_gen(5))
    sigma = torch.rand(4, 2, generator=_gen(6)) * 3 + 0.3
    torch.testing.assert_close(sbi._blur(x, 17, sigma, reflect), gaussian_blur2d(x, 17, sigma, border_type=border),
                               atol=1e-6, rtol=0)


def test_a_blur_longer_than_twice_the_image_is_refused():
    with pytest.raises(ValueError, match="a blur of 17 taps cannot reflect at the ends of 8 pixels"):
        sbi._blur(torch.zeros(1, 1, 8, 8), 17, torch.ones(1, 2))


def test_the_elastic_warp_is_kornias():
    from kornia.geometry.transform import elastic_transform2d

    mask = (torch.rand(4, 1, 64, 64, generator=_gen(7)) > 0.5).float()
    noise = torch.rand(4, 2, 64, 64, generator=_gen(8)) * 2 - 1
    sigma_px, alpha = 2.0, 0.4  # alpha large enough that the warp moves pixels by several
    ours = sbi._elastic(mask, noise, 13, sigma_px, alpha)
    torch.testing.assert_close(ours, elastic_transform2d(mask, noise, (13, 13), (sigma_px, sigma_px), (alpha, alpha)),
                               atol=1e-5, rtol=0)
    assert (ours - mask).abs().mean() > 0.1


@pytest.mark.parametrize("quality", [30, 60, 90])
def test_the_jpeg_codec_makes_what_opencv_makes(face, quality):
    """At each quality, OpenCV's (libjpeg's) decoded JPEG is within 2/255 on average of ours, 2.5 to 10 times
    closer than to the image before coding; and the codec is a JPEG at any size (100 px: edge blocks)."""
    for size in (64, 100):
        rgb = cv2.resize(face[0], (size, size), interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        decoded = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        image, reference = (torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255 for a in (rgb, decoded))
        ours = sbi._jpeg(image, torch.tensor([quality]))
        assert ours.shape == image.shape
        error = (ours - reference).abs().mean() * 255
        assert error < 2.0 and error < (image - reference).abs().mean() * 255 / 2.5
