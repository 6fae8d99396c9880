import pytest
import torch
from torch import nn

from pipeline.models import Discriminator, Generator, Residual, build_models


@pytest.mark.parametrize("size", [64, 128, 256])
def test_g_draws_images_of_the_size_and_d_returns_one_logit_each(size):
    G, D = build_models(nz=100, ngf=16, ndf=16, image_size=size, generator=torch.Generator().manual_seed(0))
    images = G(torch.randn(3, 100, 1, 1))
    assert images.shape == (3, 3, size, size) and images.abs().max() <= 1  # Tanh
    assert D(images).shape == (3,)


def test_ds_own_gan_logit_trains_its_head_alone_and_g_still_learns_through_all_of_d():
    G, D = build_models(100, 16, 16, 64, torch.Generator().manual_seed(0), gan_head=True)
    x = G(torch.randn(4, 100, 1, 1)).detach().requires_grad_(True)
    both = D(x, gan=True)
    assert both.shape == (4, 2) and torch.equal(both[:, 0], D(x))  # the detector's logit is D's plain output
    # D's update: the GAN's loss reaches its head, never the layers the detector shares.
    torch.nn.functional.softplus(both[:, 1]).mean().backward()
    assert D.gan_head.weight.grad.abs().sum() > 0
    untouched = [x, *D.main.parameters()]  # (zeros where the detector's column passed its zero gradient back)
    assert all(t.grad is None or not t.grad.any() for t in untouched)
    # G's update (D frozen): the gradient flows through every layer of D, back to the samples.
    D.zero_grad(set_to_none=True)
    D.requires_grad_(False)
    torch.nn.functional.softplus(-D(x, gan=True)[:, 1]).mean().backward()
    assert x.grad.abs().sum() > 0
    # Without the head, one logit does both.
    _, plain = build_models(100, 16, 16, 64, torch.Generator().manual_seed(0))
    assert plain.gan_head is None and torch.equal(plain(x, gan=True)[:, 0], plain(x, gan=True)[:, 1])


def test_the_dcgan_initialization_and_its_reproducibility():
    G1, D1 = build_models(100, 64, 64, 64, torch.Generator().manual_seed(7))
    G2, _ = build_models(100, 64, 64, 64, torch.Generator().manual_seed(7))
    conv = G1.main[0].weight
    assert abs(conv.std().item() - 0.02) < 0.001 and abs(conv.mean().item()) < 0.001
    bn = D1.main[3]
    assert abs(bn.weight.mean().item() - 1) < 0.01 and bn.bias.abs().max() == 0
    assert all(torch.equal(a, b) for a, b in zip(G1.state_dict().values(), G2.state_dict().values()))
    assert sum(p.numel() for p in G1.parameters()) == 3_576_704  # the DCGAN of pytorch/examples at 64 px
    assert sum(p.numel() for p in D1.parameters()) == 2_765_568


def test_d_blocks_add_residual_depth_at_each_resolution_and_start_as_the_dcgans_d():
    _, plain = build_models(100, 16, 16, 64)
    _, deep = build_models(100, 16, 16, 64, d_blocks=2)
    blocks = [m for m in deep.main if isinstance(m, Residual)]
    assert len(blocks) == 2 * 4  # two after each of D's four downsamplings, at 32, 16, 8 and 4 px
    assert [b.body[0].in_channels for b in blocks] == [16, 16, 32, 32, 64, 64, 128, 128]
    x = torch.randn(3, 3, 64, 64)
    assert deep(x).shape == (3,) and deep(x, gan=True).shape == (3, 2)
    dcgan = nn.Sequential(*(m for m in deep.main if not isinstance(m, Residual)))  # the same D without its blocks
    assert len(dcgan) == len(plain.main) and torch.equal(deep(x), dcgan(x).flatten())  # blocks start as identities
    block = blocks[0]
    features = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        block.gain.fill_(0.5)
    assert torch.allclose(block(features), features + 0.5 * block.body(features))  # a residual: x + gain f(x)


def test_an_unsupported_size_is_refused():
    with pytest.raises(ValueError, match="image_size 32"):
        Generator(image_size=32)
    with pytest.raises(ValueError, match="image_size 96"):
        Discriminator(image_size=96)


@pytest.mark.parametrize("d_norm", ["group", "batch"])
def test_a_faces_score_is_the_same_alone_in_any_batch_and_in_train_and_eval_mode(d_norm):
    from pipeline.sbi import demo_batch, demo_face, self_blend

    crop, landmarks = demo_face()
    reals, points = demo_batch(crop, landmarks, 64, 8)
    fakes = self_blend(reals, points, torch.Generator().manual_seed(0)).fake
    _, D = build_models(100, 16, 16, 64, torch.Generator().manual_seed(0), d_norm=d_norm)
    with torch.no_grad():
        D.train()
        for _ in range(3):  # BatchNorm's running statistics after a few fake-only batches, as a GAN's D sees
            D(torch.tanh(torch.randn(8, 3, 64, 64)))
        face = reals[:1]
        scores = [D(face)[0], D(torch.cat([face, reals[1:]]))[0], D(torch.cat([face, fakes[1:]]))[0]]
        D.eval()
        scores += [D(face)[0], D(torch.cat([face, fakes[1:]]))[0]]
    spread = (torch.stack(scores) - scores[0]).abs().max().item()
    if d_norm == "group":
        assert spread < 1e-5
    else:  # the paper's BatchNorm D fails exactly this, which is why the detector's D does not use it
        assert spread > 1e-3


def test_the_noise_projection_is_the_transposed_convolution_it_replaces():
    """G's first layer is a matrix product (torch.compile's CUDA backward broke on the 1x1 convolution's
    layouts) and must stay the same function with the same weights, so older checkpoints load and agree."""
    from pipeline.models import NoiseProjection

    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(100, 64, 4, 1, 0, bias=False)
    projection = NoiseProjection(100, 64)
    projection.load_state_dict(conv.state_dict())
    z = torch.randn(8, 100, 1, 1)
    torch.testing.assert_close(projection(z), conv(z))
    projection.to(memory_format=torch.channels_last)
    torch.testing.assert_close(projection(z.contiguous(memory_format=torch.channels_last)), conv(z))


@pytest.mark.parametrize("ndf", [72, 100])
def test_d_widths_that_32_groups_do_not_divide_still_build_with_groupnorm(ndf):
    # ndf 72 has 144 channels after its first downsampling: GroupNorm(32, 144) refused to be built.
    D = Discriminator(ndf, 64)
    norms = [m for m in D.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_channels % m.num_groups == 0 and m.num_channels // m.num_groups >= 4 for m in norms)
    assert [m.num_groups for m in Discriminator(64, 64).modules() if isinstance(m, nn.GroupNorm)] == [32, 32, 32]
    assert D(torch.zeros(2, 3, 64, 64)).shape == (2,)
