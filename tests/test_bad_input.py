"""Bad values that used to give wrong answers or unclear errors now raise a clear error naming the problem."""

import math

import pytest
import torch

from optvq_hf import OptVQConfig, OptVQModel
from optvq_hf.quantization import SinkhornQuantizer
from tests.conftest import tiny_config_kwargs


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sinkhorn_epsilon", "10", "sinkhorn_epsilon must be a number.*'10'.*str"),
        ("sinkhorn_epsilon", math.nan, "sinkhorn_epsilon must be finite"),
        ("sinkhorn_epsilon", math.inf, "sinkhorn_epsilon must be finite"),
        ("commitment_beta", math.nan, "commitment_beta must be finite"),
        ("dropout", True, "dropout must be a number"),
        ("initializer_range", "0.02", "initializer_range must be a number"),
        ("use_codebook_projection", "no", "use_codebook_projection must be a bool.*'no'"),
        ("use_codebook_projection", 1, "use_codebook_projection must be a bool"),
        ("num_codes", True, "num_codes must be a positive integer"),
        ("num_codes", 16.0, "num_codes must be a positive integer"),
        ("embed_dim", "8", "embed_dim must be a positive integer"),
    ],
)
def test_config_type_checks_name_the_field(field, value, message):
    config = OptVQConfig(**tiny_config_kwargs())
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        config.validate_architecture()


def test_valid_config_passes():
    OptVQConfig(**tiny_config_kwargs()).validate_architecture()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("training", [True, False])
def test_quantizer_refuses_non_finite_features(bad, training):
    config = OptVQConfig(**tiny_config_kwargs())
    model = OptVQModel(config).train(training)
    z = torch.randn(2, config.embed_dim, 4, 4)
    z[1, 0, 2, 3] = bad
    with pytest.raises(ValueError, match="non-finite features"):
        model.quantizer(z)
    # A NaN / Inf weight (a diverged run) reaches the quantizer through finite pixels.
    with torch.no_grad():
        model.quant_conv.bias[0] = bad
    with pytest.raises(ValueError, match="non-finite features"):
        model.encode(torch.zeros(1, 3, 32, 32))


def test_sinkhorn_quantizer_class_checks_too():
    assert isinstance(OptVQModel(OptVQConfig(**tiny_config_kwargs())).quantizer, SinkhornQuantizer)


def test_empty_batch_and_empty_images():
    model = OptVQModel(OptVQConfig(**tiny_config_kwargs())).eval()
    with pytest.raises(ValueError, match=r"empty \(shape \(0, 3, 32, 32\)\)"):
        model.encode(torch.zeros(0, 3, 32, 32))
    with pytest.raises(ValueError, match=r"empty \(shape \(1, 3, 0, 0\)\)"):
        model.encode(torch.zeros(1, 3, 0, 0))
    with pytest.raises(ValueError, match="non-empty batch"):
        model.quantizer(torch.zeros(0, model.config.embed_dim, 4, 4))


def test_tokenize_in_training_mode_uses_eval_and_restores_mode():
    torch.manual_seed(0)
    model = OptVQModel(OptVQConfig(**tiny_config_kwargs()))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    expected = model.eval().tokenize(images[:1])
    model.train()
    # In training mode a Sinkhorn assignment over the batch would make image 0's tokens depend on images 1 and 2.
    assert torch.equal(model.tokenize(images)[:1], expected)
    assert model.training and model.quantizer.training
