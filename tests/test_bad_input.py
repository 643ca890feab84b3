"""Bad values that used to give wrong answers or unclear errors now raise a clear error naming the problem."""

import math

import pytest
import torch

from optvq_hf import OptVQConfig, OptVQModel
from optvq_hf.quantization import SinkhornQuantizer, all_finite
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_all_finite_equals_isfinite_all(dtype):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3, 5, 7, generator=generator).to(dtype)
    assert all_finite(values) and all_finite(values[:0])
    for bad in (math.nan, math.inf, -math.inf):
        for position in ((0, 0, 0), (1, 2, 3), (2, 4, 6)):
            broken = values.clone()
            broken[position] = bad
            assert not all_finite(broken) and not bool(torch.isfinite(broken).all())
            assert all_finite(broken[:, :, :0])


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


def test_nan_weight_in_checkpoint_names_the_key():
    from optvq_hf.conversion.original_checkpoint import CheckpointError, split_and_check
    from optvq_hf.conversion.original_config import spec_from_preset
    from optvq_hf.conversion.original_reference import random_original_state_dict

    spec = spec_from_preset("optvq-16x16x8")
    state = random_original_state_dict(spec, seed=0)
    key = sorted(k for k, v in state.items() if v.is_floating_point() and "loss" not in k)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match=rf"NaN or Inf in model weight\(s\): .*{key}"):
        split_and_check(state, spec, "random")


def test_verify_batch_size_zero_is_refused(tmp_path, capsys):
    from optvq_hf.conversion.convert import main

    argv = ["--original_path", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--verify_batch_size", "0"]
    code = main(argv)
    assert code != 0
    assert "--verify_batch_size must be >= 1, got 0" in capsys.readouterr().err


def test_push_while_offline_names_hf_hub_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from optvq_hf.hub import push_folder_to_hub

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_text("x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="cannot be reached.*OfflineModeIsEnabled.*HF_HUB_OFFLINE.*dry_run"):
        push_folder_to_hub(tmp_path, "someone/x")


def test_evaluate_missing_local_model_path(tmp_path):
    from conftest import load_example

    evaluate = load_example("evaluate")
    with pytest.raises(ValueError, match="--model .*nowhere.* is not an existing folder"):
        evaluate.main(["--model", str(tmp_path / "nowhere"), "--data_dir", str(tmp_path)])
