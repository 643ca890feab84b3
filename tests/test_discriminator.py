"""PatchGAN discriminator: the original OptVQ / taming layout, parameter names, sizes and initialisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from optvq_hf.training.discriminator import NLayerDiscriminator

HUB_CHECKPOINT = Path(__file__).parent / "fixtures" / "official-tiny" / "hub_format" / "model.safetensors"

# State dict of the original `loss.discriminator` with ndf=8, 3 layers (the official-tiny fixture), prefix removed.
ORIGINAL_TINY_KEYS = {
    "main.0.weight": (8, 3, 4, 4),
    "main.0.bias": (8,),
    "main.2.weight": (16, 8, 4, 4),
    "main.3.weight": (16,),
    "main.3.bias": (16,),
    "main.3.running_mean": (16,),
    "main.3.running_var": (16,),
    "main.3.num_batches_tracked": (),
    "main.5.weight": (32, 16, 4, 4),
    "main.6.weight": (32,),
    "main.6.bias": (32,),
    "main.6.running_mean": (32,),
    "main.6.running_var": (32,),
    "main.6.num_batches_tracked": (),
    "main.8.weight": (64, 32, 4, 4),
    "main.9.weight": (64,),
    "main.9.bias": (64,),
    "main.9.running_mean": (64,),
    "main.9.running_var": (64,),
    "main.9.num_batches_tracked": (),
    "main.11.weight": (1, 64, 4, 4),
    "main.11.bias": (1,),
}


def test_parameter_count_matches_the_original_3_layer_64_filter_discriminator():
    # Layer shapes of the original NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3):
    expected = (
        (3 * 64 * 4 * 4 + 64)  # conv 3->64, bias
        + (64 * 128 * 4 * 4)
        + 2 * 128  # conv 64->128 without bias, BatchNorm scale and shift
        + (128 * 256 * 4 * 4)
        + 2 * 256
        + (256 * 512 * 4 * 4)
        + 2 * 512  # the stride-1 block
        + (512 * 1 * 4 * 4 + 1)  # conv 512->1, bias
    )
    assert expected == 2_765_633
    discriminator = NLayerDiscriminator()
    assert sum(p.numel() for p in discriminator.parameters()) == expected


def test_parameter_count_with_two_layers():
    # The original's vqgan.yaml uses disc_num_layers=2: 3->64 (s2), 64->128 (s2), 128->256 (s1), 256->1.
    expected = (3 * 64 * 16 + 64) + (64 * 128 * 16 + 256) + (128 * 256 * 16 + 512) + (256 * 16 + 1)
    assert sum(p.numel() for p in NLayerDiscriminator(num_layers=2).parameters()) == expected


def test_state_dict_keys_and_shapes_match_the_original():
    state_dict = NLayerDiscriminator(base_channels=8).state_dict()
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == ORIGINAL_TINY_KEYS


def test_loads_the_original_discriminator_weights_from_the_fixture():
    prefix = "model.loss.discriminator."
    original = {k[len(prefix) :]: v for k, v in load_file(HUB_CHECKPOINT).items() if k.startswith(prefix)}
    discriminator = NLayerDiscriminator(base_channels=8)
    discriminator.load_state_dict(original, strict=True)
    logits = discriminator.eval()(torch.zeros(1, 3, 32, 32))
    assert logits.shape == (1, 1, 2, 2) and torch.isfinite(logits).all()


def test_layer_layout():
    main = NLayerDiscriminator().main
    convs = [(i, m) for i, m in enumerate(main) if isinstance(m, nn.Conv2d)]
    assert [i for i, _ in convs] == [0, 2, 5, 8, 11]
    assert [m.stride for _, m in convs] == [(2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]
    assert all(m.kernel_size == (4, 4) and m.padding == (1, 1) for _, m in convs)
    assert [m.bias is not None for _, m in convs] == [True, False, False, False, True]
    assert [i for i, m in enumerate(main) if isinstance(m, nn.BatchNorm2d)] == [3, 6, 9]
    slopes = [m.negative_slope for m in main if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.2, 0.2, 0.2, 0.2]


@pytest.mark.parametrize(("size", "side"), [(32, 2), (256, 30)])
def test_output_is_a_patch_logit_map(size, side):
    torch.manual_seed(0)
    discriminator = NLayerDiscriminator().eval()
    with torch.no_grad():
        logits = discriminator(torch.rand(2 if size == 32 else 1, 3, size, size) * 2 - 1)
    assert logits.shape == (2 if size == 32 else 1, 1, side, side)
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_taming_initialisation():
    torch.manual_seed(0)
    discriminator = NLayerDiscriminator()
    big_conv = discriminator.main[8].weight  # 2,097,152 samples of N(0, 0.02)
    assert abs(big_conv.mean().item()) < 1e-4
    assert big_conv.std().item() == pytest.approx(0.02, rel=0.01)
    bn_scales = torch.cat([discriminator.main[i].weight for i in (3, 6, 9)])  # 896 samples of N(1, 0.02)
    assert bn_scales.mean().item() == pytest.approx(1.0, abs=0.003)
    assert bn_scales.std().item() == pytest.approx(0.02, rel=0.15)
    assert all(
        torch.equal(discriminator.main[i].bias, torch.zeros_like(discriminator.main[i].bias)) for i in (3, 6, 9)
    )
    # The first and last convolutions keep PyTorch's default bias initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    assert discriminator.main[0].bias.abs().max() <= 1 / (3 * 16) ** 0.5
    assert discriminator.main[0].bias.abs().max() > 0


def test_rejects_zero_layers():
    with pytest.raises(ValueError, match="num_layers"):
        NLayerDiscriminator(num_layers=0)
