"""OptVQLoss: the original objective's values, the adaptive weight, and the isolation of the discriminator."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from optvq_hf.training.discriminator import NLayerDiscriminator
from optvq_hf.training.losses import OptVQLoss, OptVQLossConfig, adaptive_weight, hinge_d_loss, vanilla_d_loss
from optvq_hf.training.perceptual import LPIPS


def images(seed: int, batch: int = 2, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


class TinyDecoder(nn.Module):
    """Stands in for the autoencoder: latents -> images, ending with a convolution like the real decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.conv_in(z)))


def make_loss(**overrides) -> OptVQLoss:
    torch.manual_seed(0)
    settings = {"disc_start": 0, "perceptual_pretrained": False, "disc_base_channels": 8}
    return OptVQLoss(**{**settings, **overrides})


def build(**overrides):
    loss_fn = make_loss(**overrides)
    torch.manual_seed(1)
    decoder = TinyDecoder()
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    return loss_fn, decoder, latents, images(3)


@pytest.fixture
def setup():
    """A loss without LPIPS (fast), a small discriminator, a decoder, latents and a batch of images."""
    return build(perceptual_weight=0.0)


@pytest.fixture
def setup_lpips():
    """The same with the full objective: a random-weight VGG LPIPS with weight 3."""
    return build()


def bn_state(discriminator: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in discriminator.state_dict().items() if "running" in k or "num_batches" in k}


# -------------------------------------------------------------------------------------------- GAN losses by hand


def test_hinge_loss_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1; half their sum:
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1.0))
    # A discriminator that is right with margin has zero hinge loss.
    assert hinge_d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])).item() == 0.0


def test_vanilla_loss_on_known_logits():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0])
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * ((softplus(0.0) + softplus(-2.0)) / 2 + (softplus(0.0) + softplus(-1.0)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------ adaptive weight


def test_adaptive_weight_on_a_hand_made_layer():
    weight = nn.Parameter(torch.ones(2, 2))
    rec = (weight * torch.tensor([[3.0, 0.0], [0.0, 4.0]])).sum()  # gradient norm 5
    g = (weight * torch.tensor([[0.0, 2.0], [0.0, 0.0]])).sum()  # gradient norm 2
    assert adaptive_weight(rec, g, weight).item() == pytest.approx(5 / (2 + 1e-4))
    # A vanishing adversarial gradient: 5 / 1e-4 = 5e4, clamped to 1e4.
    assert adaptive_weight(rec, (weight * 0).sum(), weight).item() == pytest.approx(1e4)
    # A loss that does not reach the layer counts as zero gradient.
    assert adaptive_weight(torch.tensor(1.0, requires_grad=True) * 2, g, weight).item() == 0.0
    # NaN gradients give 0, as in the original.
    assert adaptive_weight((weight * torch.full((2, 2), float("nan"))).sum(), g, weight).item() == 0.0
    assert weight.grad is None  # nothing accumulated


def test_generator_loss_equals_the_objective_computed_by_hand(setup_lpips):
    loss_fn, decoder, latents, x = setup_lpips
    reference_disc = copy.deepcopy(loss_fn.discriminator)  # same weights, train mode, used for the hand computation
    q_loss = torch.tensor(0.3)

    x_rec = decoder(latents)
    loss, logs = loss_fn.generator_loss(x, x_rec, q_loss, global_step=0, last_layer=decoder.conv_out.weight)

    l1 = (x_rec - x).abs().mean()
    l2 = ((x_rec - x) ** 2).mean()
    perceptual = loss_fn.perceptual(x, x_rec).mean()
    rec = 1.0 * l1 + 1.0 * l2 + 3.0 * perceptual
    g = -reference_disc(x_rec).mean()
    rec_grad = torch.autograd.grad(rec, decoder.conv_out.weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, decoder.conv_out.weight, retain_graph=True)[0]
    weight = min(max(rec_grad.norm().item() / (g_grad.norm().item() + 1e-4), 0.0), 1e4)
    expected = rec.item() + 1.0 * 0.3 + weight * g.item()

    assert logs["g_weight"] == pytest.approx(weight, rel=1e-5)
    assert logs["g_loss"] == pytest.approx(g.item(), rel=1e-5, abs=1e-7)
    assert logs["perceptual_loss"] == pytest.approx(perceptual.item(), rel=1e-5)
    assert logs["l1_loss"] == pytest.approx(l1.item()) and logs["l2_loss"] == pytest.approx(l2.item())
    assert logs["rec_loss"] == pytest.approx(rec.item(), rel=1e-6)
    assert logs["quantizer_loss"] == pytest.approx(0.3) and logs["disc_factor"] == 1.0
    assert loss.item() == pytest.approx(expected, rel=1e-5) and logs["loss"] == pytest.approx(loss.item())
    assert 0 < weight < 1e4  # the case exercises the ratio, not the clamp

    # The gradient of the returned loss is that of rec + q + w * g with w a constant.
    (grad,) = torch.autograd.grad(loss, decoder.conv_out.weight)
    torch.testing.assert_close(grad, rec_grad + weight * g_grad, rtol=1e-4, atol=1e-7)


def test_disc_weight_scales_the_adaptive_weight(setup):
    _, decoder, latents, x = setup
    x_rec = decoder(latents)
    weights = []
    for disc_weight in (1.0, 0.5):
        loss_fn = make_loss(disc_weight=disc_weight, perceptual_weight=0.0)
        weights.append(loss_fn.generator_loss(x, x_rec, torch.tensor(0.0), 0, decoder.conv_out.weight)[1]["g_weight"])
    assert weights[1] == pytest.approx(0.5 * weights[0], rel=1e-6)


# ------------------------------------------------------------------------------------------------ switching on


def test_pixel_losses_by_hand_and_no_adversarial_term_before_disc_start():
    loss_fn = make_loss(disc_start=100, perceptual_weight=0.0, l1_weight=2.0, l2_weight=4.0, quantizer_weight=0.5)
    assert loss_fn.perceptual is None
    calls = []
    loss_fn.discriminator.register_forward_pre_hook(lambda *args: calls.append(1))

    x = torch.zeros(1, 3, 8, 8)
    x_rec = torch.full((1, 3, 8, 8), 0.5, requires_grad=True)
    loss, logs = loss_fn.generator_loss(x, x_rec, torch.tensor([0.2, 0.4]), global_step=99, last_layer=None)
    # L1 = 0.5, L2 = 0.25, q = mean(0.2, 0.4) = 0.3: 2 * 0.5 + 4 * 0.25 + 0.5 * 0.3
    assert loss.item() == pytest.approx(2.15)
    expected_logs = {
        "loss": 2.15,
        "rec_loss": 2.0,
        "l1_loss": 0.5,
        "l2_loss": 0.25,
        "perceptual_loss": 0.0,
        "quantizer_loss": 0.3,
        "g_loss": 0.0,
        "g_weight": 0.0,
        "disc_factor": 0.0,
    }
    assert logs == pytest.approx(expected_logs)
    assert calls == []  # the discriminator is not even evaluated before disc_start
    assert not loss_fn.adversarial_active(99) and loss_fn.adversarial_active(100)


def test_adversarial_term_needs_the_last_layer(setup):
    loss_fn, decoder, latents, x = setup
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn.generator_loss(x, decoder(latents), torch.tensor(0.0), 0, last_layer=None)


def test_validation_under_no_grad_gives_weight_zero(setup):
    loss_fn, decoder, latents, x = setup
    with torch.no_grad():
        loss, logs = loss_fn.generator_loss(x, decoder(latents), torch.tensor(0.1), 0, decoder.conv_out.weight)
    assert logs["g_weight"] == 0.0 and logs["g_loss"] != 0.0
    assert loss.item() == pytest.approx(logs["rec_loss"] + 0.1, rel=1e-6)


def test_discriminator_trains_from_step_zero_unless_delayed(setup):
    loss_fn, decoder, latents, x = setup
    x_rec = decoder(latents)
    loss, logs = loss_fn.discriminator_loss(x, x_rec, global_step=0)
    assert logs["disc_factor"] == 1.0 and loss.item() == pytest.approx(logs["d_loss"]) and logs["d_loss"] > 0

    delayed = make_loss(disc_train_start=10, disc_loss_weight=2.0)
    loss, logs = delayed.discriminator_loss(x, x_rec, global_step=9)
    assert loss.item() == 0.0 and logs["disc_factor"] == 0.0 and not delayed.discriminator_trains(9)
    loss, logs = delayed.discriminator_loss(x, x_rec, global_step=10)
    assert loss.item() == pytest.approx(2.0 * logs["d_loss"])


def test_discriminator_loss_is_the_hinge_of_separate_real_and_fake_passes(setup):
    loss_fn, decoder, latents, x = setup
    x_rec = decoder(latents)
    reference = copy.deepcopy(loss_fn.discriminator)
    expected = hinge_d_loss(reference(x), reference(x_rec.detach()))
    loss, logs = loss_fn.discriminator_loss(x, x_rec, 0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # Two train-mode passes, like the reference: the running statistics end where the reference's do.
    for key, value in bn_state(reference).items():
        torch.testing.assert_close(loss_fn.discriminator.state_dict()[key], value)


# --------------------------------------------------------------------------- isolation of the discriminator


def test_generator_pass_leaves_batchnorm_statistics_unchanged(setup):
    loss_fn, decoder, latents, x = setup
    loss_fn.train()
    before = bn_state(loss_fn.discriminator)
    loss, _ = loss_fn.generator_loss(x, decoder(latents), torch.tensor(0.0), 0, decoder.conv_out.weight)
    loss.backward()
    after = bn_state(loss_fn.discriminator)
    assert all(torch.equal(before[k], after[k]) for k in before)

    # The check has teeth: a discriminator pass does move them.
    loss_fn.discriminator_loss(x, decoder(latents), 0)
    assert not torch.equal(before["main.3.running_mean"], loss_fn.discriminator.main[3].running_mean)
    assert loss_fn.discriminator.main[3].num_batches_tracked.item() == 2


def test_generator_backward_gives_the_discriminator_no_gradient(setup):
    loss_fn, decoder, latents, x = setup
    x_rec = decoder(latents)
    loss, logs = loss_fn.generator_loss(x, x_rec, torch.tensor(0.0), 0, decoder.conv_out.weight)
    assert logs["g_weight"] > 0  # the adversarial term is really in the loss
    loss.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())
    assert decoder.conv_out.weight.grad is not None

    # The discriminator step, in turn, sends nothing back into the generator.
    decoder.zero_grad(set_to_none=True)
    d_loss, _ = loss_fn.discriminator_loss(x, x_rec, 0)
    d_loss.backward()
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())
    # (The last bias can get an exact zero: with every hinge active, d/d bias = (-1 + 1) / 2.)
    assert all(
        p.grad.abs().sum() > 0 for name, p in loss_fn.discriminator.named_parameters() if name != "main.11.bias"
    )
    assert all(p.grad is None for p in decoder.parameters())


def test_only_the_discriminator_is_trainable(setup_lpips):
    loss_fn, *_ = setup_lpips
    trainable = {id(p) for p in loss_fn.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in loss_fn.discriminator.parameters()}
    assert isinstance(loss_fn.perceptual, LPIPS) and loss_fn.perceptual.backbone == "vgg"
    loss_fn.train()
    assert loss_fn.discriminator.training and not loss_fn.perceptual.training
    assert all(k.startswith(("discriminator.main.", "perceptual.")) for k in loss_fn.state_dict())


def test_forward_dispatches_to_the_two_entry_points(setup):
    loss_fn, decoder, latents, x = setup
    x_rec = decoder(latents).detach()
    loss_fn.eval()  # eval: both calls see the same BatchNorm statistics
    assert loss_fn("discriminator", x, x_rec, 0)[1] == loss_fn.discriminator_loss(x, x_rec, 0)[1]
    with torch.no_grad():
        assert (
            loss_fn("generator", x, x_rec, torch.tensor(0.0), 0)[1]
            == loss_fn.generator_loss(x, x_rec, torch.tensor(0.0), 0)[1]
        )
    with pytest.raises(ValueError, match="mode"):
        loss_fn("both", x, x_rec, 0)


# ---------------------------------------------------------------------------------------------- configuration


def test_config_defaults_are_the_original_imagenet_objective():
    config = OptVQLossConfig()
    assert (config.l1_weight, config.l2_weight, config.perceptual_weight, config.quantizer_weight) == (1, 1, 3, 1)
    assert (config.disc_weight, config.disc_loss_weight, config.disc_start) == (1.0, 1.0, 150_000)
    assert (config.disc_loss, config.disc_num_layers, config.disc_base_channels) == ("hinge", 3, 64)
    assert config.perceptual_backbone == "vgg"


def test_config_overrides_and_validation():
    loss_fn = OptVQLoss(OptVQLossConfig(l1_weight=2.0, perceptual_weight=0.0), l2_weight=0.5)
    assert (loss_fn.config.l1_weight, loss_fn.config.l2_weight) == (2.0, 0.5)
    assert isinstance(loss_fn.discriminator, NLayerDiscriminator) and loss_fn.discriminator.base_channels == 64
    with pytest.raises(ValueError, match="l1_weight"):
        OptVQLossConfig(l1_weight=-1.0)
    with pytest.raises(ValueError, match="disc_loss"):
        OptVQLossConfig(disc_loss="wgan")
    with pytest.raises(TypeError):
        OptVQLoss(perceptual_weight=0.0, no_such_field=1)


# ----------------------------------------------------------------------------------------------- a training step


def test_one_generator_and_discriminator_step_under_bfloat16_autocast(setup_lpips):
    loss_fn, decoder, latents, x = setup_lpips
    loss_fn.train()
    opt_g = torch.optim.AdamW(decoder.parameters(), lr=1e-3)
    opt_d = torch.optim.AdamW(loss_fn.discriminator.parameters(), lr=1e-3)
    decoder_before = [p.detach().clone() for p in decoder.parameters()]
    disc_before = [p.detach().clone() for p in loss_fn.discriminator.parameters()]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_rec = decoder(latents)
        assert x_rec.dtype == torch.bfloat16
        loss, logs = loss_fn.generator_loss(x, x_rec, torch.tensor(0.05), 0, decoder.conv_out.weight)
    assert loss.dtype == torch.float32 and all(math.isfinite(v) for v in logs.values()) and logs["g_weight"] > 0
    loss.backward()
    torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
    opt_g.step()
    opt_g.zero_grad(set_to_none=True)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        d_loss, d_logs = loss_fn.discriminator_loss(x, x_rec, 0)
    assert all(math.isfinite(v) for v in d_logs.values())
    d_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in loss_fn.discriminator.parameters())
    opt_d.step()

    for before, p in zip(decoder_before + disc_before, [*decoder.parameters(), *loss_fn.discriminator.parameters()]):
        assert torch.isfinite(p).all() and not torch.equal(before, p)
    bn = loss_fn.discriminator.main[3]
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()


def test_ddp_recipe_all_reduces_the_discriminator_and_skips_the_generator_pass(setup, tmp_path):
    """The documented multi-GPU use, on one CPU process: discriminator step through the DDP wrapper, generator step
    on the module itself. Two iterations, so that DDP would complain about a missing reduction."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    loss_fn, decoder, latents, x = setup
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(loss_fn)
        for step in range(2):
            x_rec = decoder(latents)
            loss, _ = wrapped.module.generator_loss(x, x_rec, torch.tensor(0.0), step, decoder.conv_out.weight)
            loss.backward()
            assert all(p.grad is None for p in loss_fn.discriminator.parameters())
            d_loss, _ = wrapped("discriminator", x, x_rec, step)
            d_loss.backward()
            assert all(p.grad is not None for p in loss_fn.discriminator.parameters())
            loss_fn.discriminator.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()
