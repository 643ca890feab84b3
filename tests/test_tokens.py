"""Token layouts for sequence models: both orders, both vocabularies, exact round trips, clear errors."""

import pytest
import torch
from conftest import tiny_config_kwargs
from hypothesis import given, settings
from hypothesis import strategies as st

from optvq_hf import OptVQConfig, OptVQModel, TokenLayout, indices_to_tokens, tokens_to_indices
from optvq_hf.tokens import ORDERS, VOCABULARIES

# One image, 2 heads, a 2x3 grid; head 0 holds 0..5 and head 1 holds 10..15 in raster order.
K = 16
INDICES = torch.stack([torch.arange(6).view(2, 3), torch.arange(10, 16).view(2, 3)])[None]  # (1, 2, 2, 3)
EXPECTED = {
    ("position-major", "shared"): [0, 10, 1, 11, 2, 12, 3, 13, 4, 14, 5, 15],
    ("head-major", "shared"): [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15],
    ("position-major", "per-head"): [0, 26, 1, 27, 2, 28, 3, 29, 4, 30, 5, 31],
    ("head-major", "per-head"): [0, 1, 2, 3, 4, 5, 26, 27, 28, 29, 30, 31],
}


@pytest.mark.parametrize("order, vocabulary", list(EXPECTED))
def test_layouts_written_out_by_hand(order, vocabulary):
    tokens = indices_to_tokens(INDICES, K, order=order, vocabulary=vocabulary)
    assert tokens.dtype == torch.long and tokens.tolist() == [EXPECTED[order, vocabulary]]
    back = tokens_to_indices(tokens, K, num_heads=2, latent_shape=(2, 3), order=order, vocabulary=vocabulary)
    assert back.dtype == torch.long and torch.equal(back, INDICES)


def test_head_major_is_the_original_generators_flattening_and_position_major_the_raster_order():
    indices = torch.randint(0, 64, (3, 4, 5, 6))
    head_major = indices_to_tokens(indices, 64, order="head-major")
    assert torch.equal(head_major, indices.view(3, -1))  # the original's `code.view(B, -1)`
    position_major = indices_to_tokens(indices, 64, order="position-major")
    row, col = 2, 3  # position (2, 3) is the 2*6+3 = 15th position; its heads fill places 60..63
    assert position_major[:, 15 * 4 : 16 * 4].tolist() == indices[:, :, row, col].tolist()


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(0, 3),
    heads=st.integers(1, 4),
    height=st.integers(1, 4),
    width=st.integers(1, 4),
    num_codes=st.integers(1, 300),
    order=st.sampled_from(ORDERS),
    vocabulary=st.sampled_from(VOCABULARIES),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_exact(batch, heads, height, width, num_codes, order, vocabulary, seed):
    layout = TokenLayout(num_codes, heads, (height, width), order=order, vocabulary=vocabulary)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, num_codes, (batch, heads, height, width), generator=generator)
    tokens = layout.to_tokens(indices)
    assert tokens.shape == (batch, layout.sequence_length) == (batch, heads * height * width)
    assert torch.equal(layout.to_indices(tokens), indices)
    low, high = layout.id_bounds()
    assert bool(((tokens >= low) & (tokens < high)).all())
    if vocabulary == "per-head":  # the id alone tells the head
        assert torch.equal(tokens // num_codes, layout.head_of_slot().expand_as(tokens))
    if batch:
        assert 0 <= int(tokens.min()) and int(tokens.max()) < layout.vocab_size


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_smaller_integer_dtypes_are_accepted_and_give_int64(dtype):
    layout = TokenLayout(K, 2, (2, 3), vocabulary="per-head")
    tokens = layout.to_tokens(INDICES.to(dtype))
    assert tokens.dtype == torch.long and tokens.tolist() == [EXPECTED["position-major", "per-head"]]
    back = layout.to_indices(tokens.to(torch.int32))
    assert back.dtype == torch.long and torch.equal(back, INDICES)


def test_sizes():
    layout = TokenLayout(num_codes=1024, num_heads=4, latent_shape=(16, 8))
    assert (layout.num_positions, layout.sequence_length, layout.vocab_size) == (128, 512, 1024)
    assert TokenLayout(1024, 4, (16, 8), vocabulary="per-head").vocab_size == 4096
    assert TokenLayout(1024, 4, [16, 8]).latent_shape == (16, 8)
    assert TokenLayout(10, 3, (1, 2), order="head-major").head_of_slot().tolist() == [0, 0, 1, 1, 2, 2]
    assert TokenLayout(10, 3, (1, 2)).head_of_slot().tolist() == [0, 1, 2, 0, 1, 2]
    low, high = TokenLayout(10, 3, (1, 2), vocabulary="per-head").id_bounds()
    assert low.tolist() == [0, 10, 20, 0, 10, 20] and high.tolist() == [10, 20, 30, 10, 20, 30]


# -- errors -----------------------------------------------------------------------------------------------------------
LAYOUT = TokenLayout(K, 2, (2, 3), vocabulary="per-head")


@pytest.mark.parametrize(
    "tokens, message",
    [
        (torch.zeros(1, 11, dtype=torch.long), r"length 11, the layout needs num_heads \* h \* w = 2 \* 2 \* 3 = 12"),
        (torch.zeros(12, dtype=torch.long), r"\(batch, sequence_length\).*tokens\[None\]"),
        (torch.zeros(1, 12), "integer tensor.*torch.float32"),
        (torch.zeros(1, 12, dtype=torch.bool), "integer tensor.*torch.bool"),
        ([[0] * 12], "must be a torch.Tensor, got list"),
        (torch.tensor([[0, 26, 1, 27, 2, 28, 3, 29, 4, 30, 5, 32]]), r"id 32 at sequence 0, place 11.*head 1.*\[16,"),
        (
            torch.tensor([[0, 5, 1, 27, 2, 28, 3, 29, 4, 30, 5, 31]]),
            r"id 5 at sequence 0, place 1.*head 1.*\[16, 32\)",
        ),
        (
            torch.tensor([[-1, 26, 1, 27, 2, 28, 3, 29, 4, 30, 5, 31]]),
            r"id -1 at sequence 0, place 0.*head 0.*\[0, 16",
        ),
    ],
)
def test_bad_tokens_raise(tokens, message):
    with pytest.raises(ValueError, match=message):
        LAYOUT.to_indices(tokens)


def test_shared_vocabulary_rejects_ids_of_the_per_head_range():
    tokens = torch.tensor([EXPECTED["position-major", "per-head"]])
    with pytest.raises(ValueError, match=r"id 26 at sequence 0, place 1 is out of range.*\[0, 16\).*'shared'"):
        TokenLayout(K, 2, (2, 3)).to_indices(tokens)


@pytest.mark.parametrize(
    "indices, message",
    [
        (torch.zeros(1, 3, 2, 3, dtype=torch.long), r"\(batch, 2, 2, 3\), got \(1, 3, 2, 3\)"),
        (torch.zeros(2, 3, dtype=torch.long), r"\(batch, 2, 2, 3\), got \(2, 3\)"),
        (torch.full((1, 2, 2, 3), K), r"\[0, 16\), got values in \[16, 16\]"),
        (torch.full((1, 2, 2, 3), -2), r"\[0, 16\), got values in \[-2, -2\]"),
        (torch.zeros(1, 2, 2, 3, dtype=torch.float64), "integer tensor.*float64"),
    ],
)
def test_bad_indices_raise(indices, message):
    with pytest.raises(ValueError, match=message):
        LAYOUT.to_tokens(indices)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(order="row-major"), "order must be one of"),
        (dict(vocabulary="offsets"), "vocabulary must be one of"),
        (dict(num_codes=0), "num_codes must be a positive integer"),
        (dict(num_heads=True), "num_heads must be a positive integer"),
        (dict(latent_shape=(4,)), r"latent_shape must be a pair"),
        (dict(latent_shape=(4, 0)), "latent_shape entries must be a positive integer"),
    ],
)
def test_bad_layouts_raise(kwargs, message):
    arguments = dict(num_codes=K, num_heads=2, latent_shape=(2, 3)) | kwargs
    with pytest.raises(ValueError, match=message):
        TokenLayout(**arguments)


# -- model convenience methods ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    model = OptVQModel(OptVQConfig(**tiny_config_kwargs())).eval()
    return model, torch.rand(2, 3, 32, 32) * 2 - 1


def test_model_sizes(model_and_images):
    model, _ = model_and_images
    assert model.vocab_size == model.get_vocab_size("shared") == 64
    assert model.get_vocab_size("per-head") == 4 * 64
    assert model.tokens_per_image == 4 * 16 * 16
    with pytest.raises(ValueError, match="vocabulary must be one of"):
        model.get_vocab_size("per_head")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("vocabulary", VOCABULARIES)
def test_tokenize_and_detokenize_follow_the_layout(model_and_images, order, vocabulary):
    model, images = model_and_images
    with torch.no_grad():
        encoded = model.encode(images)
        expected_images = model.decode_indices(encoded.indices).sample
        tokens = model.tokenize(images, order=order, vocabulary=vocabulary)
        decoded = model.detokenize(tokens, order=order, vocabulary=vocabulary)
    layout = TokenLayout(64, 4, (16, 16), order=order, vocabulary=vocabulary)
    assert tokens.shape == (2, model.tokens_per_image) and torch.equal(tokens, layout.to_tokens(encoded.indices))
    assert torch.unique(encoded.indices).numel() > 10  # a real mix of codes, not a constant grid
    assert torch.equal(decoded, expected_images)


def test_detokenize_other_sizes_needs_latent_shape(model_and_images):
    model, _ = model_and_images
    images = torch.rand(1, 3, 16, 24) * 2 - 1  # 8x12 latent grid
    with torch.no_grad():
        tokens = model.tokenize(images, order="head-major")
        assert tokens.shape == (1, 4 * 8 * 12)
        with pytest.raises(ValueError, match=r"length 384, the layout needs .* = 1024"):
            model.detokenize(tokens, order="head-major")
        decoded = model.detokenize(tokens, order="head-major", latent_shape=(8, 12))
        expected = model.decode_indices(model.encode(images).indices).sample
    assert decoded.shape == (1, 3, 16, 24) and torch.equal(decoded, expected)


def test_detokenize_rejects_a_mismatched_vocabulary(model_and_images):
    model, images = model_and_images
    with torch.no_grad():
        tokens = model.tokenize(images, vocabulary="per-head")
    assert int(tokens.max()) >= 64  # some head beyond the first uses an offset id
    with pytest.raises(ValueError, match="out of range.*'shared'"):
        model.detokenize(tokens, vocabulary="shared")
