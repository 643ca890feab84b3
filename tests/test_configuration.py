"""OptVQConfig: defaults of the original ImageNet model, validation, serialisation, Auto registration."""

import logging

import pytest
import torch
from conftest import tiny_config_kwargs
from transformers import AutoConfig

from optvq_hf import OptVQConfig


def test_defaults_are_the_original_imagenet_16x16x4_model():
    config = OptVQConfig()
    assert (config.resolution, config.in_channels, config.out_channels, config.base_channels) == (256, 3, 3, 128)
    assert config.channel_multipliers == [1, 1, 2, 2, 4]
    assert (config.num_res_blocks, config.attn_resolutions, config.latent_channels) == (2, [16], 256)
    assert (config.embed_dim, config.num_heads, config.num_codes) == (256, 4, 16384)
    assert config.use_codebook_projection is True
    assert (config.quantizer_type, config.sinkhorn_epsilon, config.sinkhorn_iterations) == ("optvq", 10.0, 5)
    assert (config.cost_normalization, config.commitment_beta, config.inference_assignment) == ("all", 0.25, "nearest")
    assert config.dropout == 0.0
    assert config.model_type == "optvq"
    assert (config.downsample_factor, config.latent_resolution, config.code_dim) == (16, 16, 64)


def test_simple_cnn_backbone_downsamples_by_four():
    config = OptVQConfig(
        backbone="simple_cnn",
        resolution=32,
        base_channels=32,
        latent_channels=32,
        embed_dim=8,
        num_heads=4,
        num_codes=1024,
    )
    assert (config.downsample_factor, config.latent_resolution, config.code_dim) == (4, 8, 2)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(embed_dim=30, num_heads=4), "embed_dim"),
        (dict(base_channels=48), "base_channels"),
        (dict(latent_channels=0), "latent_channels"),
        (dict(quantizer_type="kmeans"), "quantizer_type"),
        (dict(cost_normalization="null"), "cost_normalization"),
        (dict(inference_assignment="sample"), "inference_assignment"),
        (dict(backbone="vit"), "backbone"),
        (dict(num_codes=0), "num_codes"),
        (dict(num_heads=-1), "num_heads"),
        (dict(resolution=0), "resolution"),
        (dict(sinkhorn_iterations=0), "sinkhorn_iterations"),
        (dict(sinkhorn_epsilon=0.0), "sinkhorn_epsilon"),
        (dict(commitment_beta=-0.1), "commitment_beta"),
        (dict(dropout=1.5), "dropout"),
        (dict(resolution=40, channel_multipliers=(1, 2, 2, 2, 2)), "resolution"),
        (dict(channel_multipliers=()), "channel_multipliers"),
        (dict(num_codes=64.0), "num_codes"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        OptVQConfig(**tiny_config_kwargs(**overrides))


def test_unknown_field_is_kept_with_a_warning(caplog):
    # A config.json written by a newer version (a field this one does not know) must load, as in transformers.
    with caplog.at_level(logging.WARNING):
        config = OptVQConfig(**tiny_config_kwargs(future_field=7))
    assert config.future_field == 7 and config.to_dict()["future_field"] == 7
    assert "future_field" in caplog.text


def test_unknown_field_survives_a_json_round_trip(tmp_path):
    OptVQConfig(**tiny_config_kwargs(future_field=[1, 2])).save_pretrained(tmp_path)
    assert OptVQConfig.from_pretrained(tmp_path).future_field == [1, 2]


@pytest.mark.parametrize("latent_channels", [16, 48, 20])
def test_latent_channels_need_not_be_a_multiple_of_the_groupnorm_groups(latent_channels):
    # No GroupNorm acts on the latent channels: original checkpoints have z_channels 16 or 48.
    from optvq_hf import OptVQModel

    model = OptVQModel(OptVQConfig(**tiny_config_kwargs(latent_channels=latent_channels))).eval()
    assert model.encoder.conv_out.out_channels == latent_channels
    assert model(torch.rand(1, 3, 32, 32) * 2 - 1).reconstruction.shape == (1, 3, 32, 32)


def test_standard_pretrained_config_kwargs_are_accepted():
    config = OptVQConfig(
        **tiny_config_kwargs(attn_implementation="eager", dtype="bfloat16", output_hidden_states=True)
    )
    assert config._attn_implementation == "eager" and config.output_hidden_states is True


def test_round_trip_through_json(tmp_path):
    config = OptVQConfig(**tiny_config_kwargs(num_heads=8, cost_normalization="dim", inference_assignment="sinkhorn"))
    config.save_pretrained(tmp_path)
    loaded = OptVQConfig.from_pretrained(tmp_path)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.channel_multipliers == [1, 2]


def test_auto_config_resolves_optvq(tmp_path):
    OptVQConfig(**tiny_config_kwargs()).save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is OptVQConfig
    assert type(AutoConfig.for_model("optvq")) is OptVQConfig
