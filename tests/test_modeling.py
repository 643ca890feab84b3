"""OptVQModel: architecture, the original's outputs, API, serialisation, dtypes, bad input."""

import json

import pytest
import torch
from conftest import OFFICIAL_TINY, official_tiny_config_kwargs, tiny_config_kwargs
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel

from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel
from optvq_hf.conversion.original_keys import map_original_state_dict


def tiny_model(**overrides) -> OptVQModel:
    torch.manual_seed(0)
    return OptVQModel(OptVQConfig(**tiny_config_kwargs(**overrides))).eval()


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def count_parameters(config: OptVQConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in OptVQModel(config).parameters())


# -- architecture -----------------------------------------------------------------------------------------------------
def test_parameter_counts_equal_the_released_models():
    assert count_parameters(OptVQConfig()) == 72_932_291  # 16x16x4
    assert count_parameters(OptVQConfig(num_heads=8)) == 72_404_899  # 16x16x8


def test_simple_cnn_parameter_count_equals_the_original_mnist_model():
    config = OptVQConfig(
        backbone="simple_cnn",
        resolution=32,
        in_channels=1,
        out_channels=1,
        base_channels=32,
        latent_channels=32,
        embed_dim=8,
        num_heads=4,
        num_codes=1024,
    )
    conv = lambda i, o, k: i * o * k * k + o  # noqa: E731
    encoder = conv(1, 16, 3) + conv(16, 16, 2) + conv(16, 16, 3) + conv(16, 16, 2) + conv(16, 32, 3) + conv(32, 32, 3)
    decoder = conv(32, 32, 3) + conv(32, 16, 2) + conv(16, 16, 3) + conv(16, 16, 2) + conv(16, 16, 3) + conv(16, 1, 3)
    connectors = conv(32, 8, 1) + conv(8, 32, 1)
    quantizer = 1024 * 2 + 2 * 2 + 2
    assert count_parameters(config) == encoder + decoder + connectors + quantizer
    model = OptVQModel(config).eval()
    out = model(torch.rand(2, 1, 32, 32) * 2 - 1)
    assert out.reconstruction.shape == (2, 1, 32, 32) and out.indices.shape == (2, 4, 8, 8)


def test_dropout_reaches_the_resnet_blocks():
    model = tiny_model(dropout=0.1)
    from diffusers.models.resnet import ResnetBlock2D

    probabilities = [m.dropout.p for m in model.modules() if isinstance(m, ResnetBlock2D)]
    assert len(probabilities) == 10 and set(probabilities) == {0.1}  # encoder 2 + 2 mid, decoder 2 mid + 4


# -- the original's outputs (fixture) ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_model_and_reference():
    weights = load_file(OFFICIAL_TINY / "hub_format" / "model.safetensors")
    model = OptVQModel(OptVQConfig(**official_tiny_config_kwargs())).eval()
    mapped, dropped = map_original_state_dict(weights, num_levels=3)
    model.load_state_dict(mapped, strict=True)
    assert dropped and all(key.startswith("loss.") for key in dropped)
    return model, load_file(OFFICIAL_TINY / "reference_outputs.safetensors")


def test_fixture_parameter_count(fixture_model_and_reference):
    model, _ = fixture_model_and_reference
    summary = json.loads((OFFICIAL_TINY / "summary.json").read_text())
    assert model.num_parameters() == summary["num_model_params_without_loss"] == 1_037_451


def test_fixture_latents_and_reconstructions_match_the_original(fixture_model_and_reference):
    model, reference = fixture_model_and_reference
    with torch.no_grad():
        encoded = model.encode(reference["pixel_values"])
        from_quantized = model.decode(reference["quantized"]).sample
        from_indices = model.decode_indices(reference["indices"]).sample
    assert (encoded.latents - reference["latents"]).abs().max() < 1e-5
    assert (from_quantized - reference["reconstruction"]).abs().max() < 1e-5
    assert (from_indices - reference["reconstruction_from_indices"]).abs().max() < 1e-5
    # Default inference: the nearest code, batch-independent, equal to the original's argmin.
    assert torch.equal(encoded.indices, reference["indices_nearest"])


def test_fixture_sinkhorn_inference_reproduces_the_original_batch_assignment(fixture_model_and_reference):
    model, reference = fixture_model_and_reference
    model.quantizer.inference_assignment = "sinkhorn"
    try:
        with torch.no_grad():
            encoded = model.encode(reference["pixel_values"])
    finally:
        model.quantizer.inference_assignment = "nearest"
    # Equal except where the original's float32 scaling underflows (fixture README: 8 of 2048).
    assert int((encoded.indices != reference["indices"]).sum()) <= 8
    with torch.no_grad():
        quantized = model.quantizer.lookup(reference["indices"])
    assert (quantized - reference["quantized"]).abs().max() < 1e-5


# -- API --------------------------------------------------------------------------------------------------------------
def test_encode_decode_forward_are_consistent():
    model = tiny_model()
    x = images()
    with torch.no_grad():
        encoded = model.encode(x)
        assert encoded.latents.shape == (2, 32, 16, 16) and encoded.quantized.shape == (2, 32, 16, 16)
        assert encoded.indices.shape == (2, 4, 16, 16) and encoded.indices.dtype == torch.int64
        assert encoded.quantizer_loss.ndim == 0
        decoded = model.decode(encoded.quantized).sample
        assert torch.equal(model.decode_indices(encoded.indices).sample, decoded)
        out = model(x)
    assert torch.equal(out.reconstruction, decoded) and torch.equal(out.indices, encoded.indices)
    assert out.quantizer_loss.item() == pytest.approx(encoded.quantizer_loss.item())
    as_tuple = model(x, return_dict=False)
    assert torch.equal(as_tuple[0], decoded)


def test_model_tokens_do_not_depend_on_the_batch():
    model = tiny_model()
    x = images(batch=8)
    with torch.no_grad():
        together = model.encode(x).indices
        alone = torch.cat([model.encode(x[i : i + 1]).indices for i in range(8)])
    assert torch.equal(together, alone)


def test_training_forward_backward_reaches_every_parameter():
    model = tiny_model().train()
    out = model(images(batch=4))
    (out.reconstruction.abs().mean() + out.quantizer_loss).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_gradient_checkpointing_gives_the_same_gradients():
    x = images(batch=2)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(attn_resolutions=(16,)).train()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
            assert model.encoder.gradient_checkpointing and model.decoder.gradient_checkpointing
        out = model(x)
        (out.reconstruction.square().mean() + out.quantizer_loss).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# -- serialisation ----------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    loaded = OptVQModel.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = images()
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert torch.equal(expected.indices, got.indices)
    assert (expected.reconstruction - got.reconstruction).abs().max() < 1e-5


def test_auto_classes_resolve_optvq(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    OptVQImageProcessor(resolution=32).save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is OptVQModel
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is OptVQImageProcessor


def test_missing_weights_are_initialised_on_load(tmp_path):
    # transformers builds the model on the meta device: a weight absent from the file must still get a real init.
    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["quantizer.embedding.weight"], weights["quantizer.proj.weight"], weights["quant_conv.weight"]
    from safetensors.torch import save_file

    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = OptVQModel.from_pretrained(tmp_path)
    codes = loaded.quantizer.embedding.weight
    assert torch.isfinite(codes).all() and codes.std().item() == pytest.approx(1.0, abs=0.15)
    projection = loaded.quantizer.proj.weight
    assert projection.std().item() == pytest.approx(8**-0.5, rel=0.3)  # N(0, 1/d), d = 8
    conv = loaded.quant_conv.weight
    assert torch.isfinite(conv).all() and 0 < conv.abs().max() <= 1 / 32**0.5 + 1e-6  # kaiming-uniform bound
    assert torch.equal(loaded.post_quant_conv.weight, model.post_quant_conv.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_keeps_the_quantizer_in_float32(tmp_path, dtype):
    tiny_model().save_pretrained(tmp_path)
    model = OptVQModel.from_pretrained(tmp_path, dtype=dtype).eval()
    assert model.encoder.conv_in.weight.dtype == dtype
    assert model.quantizer.embedding.weight.dtype == torch.float32
    assert model.quantizer.proj.weight.dtype == torch.float32
    if dtype == torch.float16:
        return  # CPU float16 convolutions are not the point; bf16 runs end to end below
    with torch.no_grad():
        out = model(images())
    assert out.reconstruction.dtype == dtype and torch.isfinite(out.reconstruction.float()).all()


def test_bf16_autocast_forward_backward():
    model = tiny_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images())
        loss = out.reconstruction.float().abs().mean() + out.quantizer_loss
    loss.backward()
    assert out.quantizer_loss.dtype == torch.float32 and torch.isfinite(loss)


# -- bad input --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pixel_values", "message"),
    [
        (torch.zeros(2, 1, 32, 32), "1 channels"),
        (torch.zeros(2, 3, 31, 32), "multiples of the downsampling factor 2"),
        (torch.zeros(3, 32, 32), "shape"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "floating-point"),
        (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
        (torch.full((2, 3, 32, 32), 255.0), r"\[-1, 1\]"),
        (torch.full((1, 3, 32, 32), float("inf")), "Inf"),
    ],
)
def test_bad_pixel_values_raise(pixel_values, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().encode(pixel_values)


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        (torch.full((1, 4, 16, 16), 64), r"\[0, 64\)"),
        (torch.zeros(1, 2, 16, 16, dtype=torch.long), "num_heads=4"),
        (torch.zeros(1, 16, 16, dtype=torch.long), "shape"),
        (torch.zeros(1, 4, 16, 16), "integer"),
    ],
)
def test_bad_indices_raise(indices, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().decode_indices(indices)


def test_bad_quantized_raises():
    with pytest.raises(ValueError, match="embed_dim=32"):
        tiny_model().decode(torch.zeros(1, 16, 4, 4))
