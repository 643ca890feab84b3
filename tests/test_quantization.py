"""SinkhornQuantizer / VectorQuantizer / sinkhorn: the public behaviour and the maths of the original."""

import math

import pytest
import torch
from conftest import OFFICIAL_TINY
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import optvq_hf.assignment as assignment
from optvq_hf import SinkhornQuantizer, VectorQuantizer, sinkhorn
from optvq_hf.conversion.original_reference import original_indices, original_sinkhorn


def make_quantizer(**kwargs) -> SinkhornQuantizer:
    torch.manual_seed(0)
    defaults = dict(num_codes=64, embed_dim=32, num_heads=4)
    defaults.update(kwargs)
    return SinkhornQuantizer(**defaults)


# -- shapes, lookup, straight-through, loss ---------------------------------------------------------------------------
def test_image_features_shapes_and_exact_lookup():
    quantizer = make_quantizer().eval()
    z = torch.randn(2, 32, 5, 3)
    out = quantizer(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == torch.float32
    assert out.indices.shape == (2, 4, 5, 3) and out.indices.dtype == torch.int64
    # Head j of position (b, y, x) holds channels [8j, 8j+8) and is replaced by code indices[b, j, y, x].
    codes = quantizer.codebook()
    b, j, y, x = 1, 2, 4, 0
    assert torch.equal(out.quantized[b, 8 * j : 8 * j + 8, y, x], codes[out.indices[b, j, y, x]])
    assert torch.equal(quantizer.lookup(out.indices), out.quantized)


def test_sequence_features_shapes_and_exact_lookup():
    quantizer = make_quantizer().eval()
    z = torch.randn(3, 7, 32)
    out = quantizer(z)
    assert out.indices.shape == (3, 7, 4)
    assert torch.equal(quantizer.lookup(out.indices), out.quantized)
    assert torch.equal(out.quantized[2, 6, 24:], quantizer.codebook()[out.indices[2, 6, 3]])


def test_nearest_assignment_is_the_argmin_of_distances():
    quantizer = make_quantizer().eval()
    z = torch.randn(4, 32, 3, 3)
    indices = quantizer(z).indices
    rows = z.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = torch.cdist(rows.double(), quantizer.codebook().double()).argmin(dim=1)
    assert torch.equal(indices.permute(0, 2, 3, 1).reshape(-1), expected)


def test_straight_through_gradient_and_loss_formula():
    quantizer = make_quantizer(beta=0.25).train()
    z = torch.randn(2, 32, 4, 4, requires_grad=True)
    out = quantizer(z)
    rows = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    selected = quantizer.codebook().detach()[out.indices.permute(0, 2, 3, 1).reshape(-1)]
    squared = ((rows - selected) ** 2).mean()
    assert out.loss.item() == pytest.approx(1.25 * squared.item(), rel=1e-5)
    # quantized = z + sg(c - z): d quantized / d z is the identity.
    weights = torch.randn_like(z)
    (out.quantized * weights).sum().backward()
    assert torch.allclose(z.grad, weights)


def test_loss_gradients_reach_codebook_and_projection():
    quantizer = make_quantizer().train()
    z = torch.randn(2, 32, 4, 4, requires_grad=True)
    out = quantizer(z)
    out.loss.backward()
    assert quantizer.embedding.weight.grad.abs().sum() > 0
    assert quantizer.proj.weight.grad.abs().sum() > 0
    # Commitment term: d/dz mean((z - sg c)^2) = 2 (z - c) / numel.
    rows = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    selected = quantizer.codebook().detach()[out.indices.permute(0, 2, 3, 1).reshape(-1)]
    expected = (2 * (rows - selected) / rows.numel()).reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
    assert torch.allclose(z.grad, expected, atol=1e-7)


def test_codebook_without_projection_is_the_embedding():
    quantizer = make_quantizer(use_projection=False)
    assert quantizer.proj is None
    assert torch.equal(quantizer.codebook(), quantizer.embedding.weight)
    assert "proj.weight" not in quantizer.state_dict()


def test_original_initialisation():
    quantizer = make_quantizer(num_codes=4096, embed_dim=256, num_heads=4)
    assert quantizer.embedding.weight.std().item() == pytest.approx(1.0, abs=0.02)
    assert quantizer.proj.weight.std().item() == pytest.approx(64**-0.5, abs=0.01)


# -- the Sinkhorn maths -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guard", [1e-8, 1e-3, 0.0])
def test_sinkhorn_matches_the_original_formulas_in_float64(guard):
    torch.manual_seed(0)
    cost = torch.rand(50, 12, dtype=torch.float64) * 3
    expected = original_sinkhorn(cost.clone(), 5, 10.0, guard=guard)
    expected = expected / expected.sum(dim=1, keepdim=True)  # the original's final `* N`, where no row is guarded
    assert torch.allclose(sinkhorn(cost, epsilon=10.0, iterations=5, guard=guard), expected, atol=1e-12)


def test_the_guard_is_not_shift_invariant():
    # Adding a constant to the cost scales the kernel: without the guard the plan is unchanged, with it it is not.
    torch.manual_seed(0)
    cost = torch.rand(50, 12, dtype=torch.float64) * 3
    shifted = cost + 4.0  # every kernel entry drops by e^-40 ~ 4e-18: the masses fall far below the guard
    assert torch.allclose(sinkhorn(cost, 10.0, 5, guard=0.0), sinkhorn(shifted, 10.0, 5, guard=0.0), atol=1e-12)
    assert (sinkhorn(cost, 10.0, 5) - sinkhorn(shifted, 10.0, 5)).abs().max() > 0.03


def test_sinkhorn_matches_the_fixture_plan():
    reference = load_file(OFFICIAL_TINY / "reference_outputs.safetensors")
    plan = sinkhorn(reference["sinkhorn_cost"], epsilon=10.0, iterations=5)
    # The original runs in float32 with the same +1e-8 guards: only its rounding separates the two.
    assert (plan - reference["sinkhorn_plan"]).abs().max().item() < 1e-5
    assert torch.allclose(plan.sum(dim=1), torch.ones(64), atol=1e-6)


@pytest.mark.parametrize("mode", ["all", "dim", "none"])
def test_training_assignment_equals_the_float64_original(mode):
    quantizer = make_quantizer(cost_normalization=mode, epsilon=1.0 if mode == "none" else 10.0, chunk_size=100)
    quantizer.train()
    z = torch.randn(8, 32, 4, 4) * 0.5
    indices = quantizer(z).indices.permute(0, 2, 3, 1).reshape(-1)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = original_indices(rows, quantizer.codebook().detach(), quantizer.epsilon, 5, mode)
    assert torch.equal(indices, expected)
    assert indices.unique().numel() == 64  # transport spreads 512 rows over all 64 codes


def test_fixture_sinkhorn_indices_equal_the_exact_plan_and_the_original():
    reference = load_file(OFFICIAL_TINY / "reference_outputs.safetensors")
    weights = load_file(OFFICIAL_TINY / "hub_format" / "model.safetensors")
    quantizer = SinkhornQuantizer(64, 32, num_heads=4, inference_assignment="sinkhorn").eval()
    quantizer.load_state_dict(
        {
            "embedding.weight": weights["model.quantize.embedding.weight"],
            "proj.weight": weights["model.quantize.proj.weight"],
            "proj.bias": weights["model.quantize.proj.bias"],
        }
    )
    with torch.no_grad():
        indices = quantizer(reference["latents"]).indices
        nearest = assignment.nearest_codes(
            reference["latents"].permute(0, 2, 3, 1).reshape(-1, 8), quantizer.codebook()
        )
    rows = reference["latents"].permute(0, 2, 3, 1).reshape(-1, 8)
    exact = original_indices(rows, quantizer.codebook()).reshape(8, 8, 8, 4).permute(0, 3, 1, 2)
    assert torch.equal(indices, exact)
    assert torch.equal(indices, reference["indices"])  # the guards included: 0 of 2048 differ
    assert torch.equal(nearest.reshape(8, 8, 8, 4).permute(0, 3, 1, 2), reference["indices_nearest"])


def test_uniform_assignment_when_rows_equal_codes():
    # N = K rows, each equal to one code: the optimal transport is the identity permutation.
    quantizer = make_quantizer(num_codes=16, embed_dim=8, num_heads=1, use_projection=False).train()
    rows = quantizer.codebook().detach()[torch.randperm(16)]
    indices = quantizer(rows[None]).indices.reshape(-1)
    assert torch.equal(quantizer.codebook()[indices], rows)


# -- robustness -------------------------------------------------------------------------------------------------------
finite_costs = st.tuples(
    st.integers(1, 12), st.integers(1, 40), st.floats(-1e30, 1e30), st.floats(0.0, 1e30), st.integers(0, 2**31 - 1)
)


@settings(max_examples=60, deadline=None)
@given(finite_costs, st.floats(1e-3, 100.0), st.integers(1, 6))
def test_sinkhorn_plan_is_finite_and_rows_sum_to_one(params, epsilon, iterations):
    num_rows, num_codes, offset, scale, seed = params
    generator = torch.Generator().manual_seed(seed)
    cost = offset + scale * torch.rand(num_rows, num_codes, generator=generator, dtype=torch.float64)
    plan = sinkhorn(cost, epsilon=epsilon, iterations=iterations)
    assert torch.isfinite(plan).all()
    assert (plan >= 0).all()
    assert torch.allclose(plan.sum(dim=1), torch.ones(num_rows, dtype=plan.dtype), atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.sampled_from([1e-20, 1e-3, 1.0, 1e3, 1e15]),
    st.sampled_from(["all", "dim", "none"]),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_quantizer_is_finite_for_any_scale(batch, scale, mode, seed, constant):
    quantizer = make_quantizer(cost_normalization=mode).train()
    generator = torch.Generator().manual_seed(seed)
    z = torch.full((batch, 32, 2, 2), scale) if constant else scale * torch.randn(batch, 32, 2, 2, generator=generator)
    out = quantizer(z)
    assert torch.isfinite(out.quantized).all() and torch.isfinite(out.loss)
    assert out.indices.min() >= 0 and out.indices.max() < 64


def test_single_row_and_many_more_codes_than_rows():
    quantizer = make_quantizer(num_codes=4096, embed_dim=8, num_heads=1).train()
    out = quantizer(torch.randn(1, 1, 8))
    assert out.indices.shape == (1, 1, 1) and torch.isfinite(out.loss)
    plan = sinkhorn(torch.rand(1, 4096), epsilon=10.0, iterations=5)
    assert torch.isfinite(plan).all() and plan.sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_autocast_keeps_the_quantizer_in_float32(dtype):
    quantizer = make_quantizer().train()
    z = torch.randn(2, 32, 4, 4)
    reference = quantizer(z)
    with torch.autocast("cpu", dtype=dtype):
        out = quantizer(z.to(dtype))
    assert out.quantized.dtype == dtype
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    # Same assignment as float32 up to the rounding of the inputs themselves.
    same = quantizer(z.to(dtype).float()).indices
    assert torch.equal(out.indices, same)
    assert (out.indices == reference.indices).float().mean() > 0.8


# -- batch independence and collectives -------------------------------------------------------------------------------
def test_eval_nearest_tokens_do_not_depend_on_the_batch():
    quantizer = make_quantizer().eval()
    z = torch.randn(8, 32, 4, 4)
    together = quantizer(z).indices
    alone = torch.cat([quantizer(z[i : i + 1]).indices for i in range(8)])
    assert torch.equal(together, alone)


def test_eval_makes_no_collective_call_and_training_does(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("collective called")

    monkeypatch.setattr(assignment.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(assignment.dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(assignment.dist, "all_reduce", forbidden)
    z = torch.randn(2, 32, 4, 4)
    for rule in ("nearest", "sinkhorn"):
        make_quantizer(inference_assignment=rule).eval()(z)
    with pytest.raises(AssertionError, match="collective"):
        make_quantizer().train()(z)


# -- the nearest-neighbour baseline -----------------------------------------------------------------------------------
def test_vq_baseline_assigns_nearest_codes_in_training():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(64, 32, num_heads=4).train()
    z = torch.randn(4, 32, 4, 4)
    out = quantizer(z)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = torch.cdist(rows, quantizer.codebook()).argmin(dim=1)
    assert torch.equal(out.indices.permute(0, 2, 3, 1).reshape(-1), expected)


# -- bad input --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("z", "message"),
    [
        (torch.randn(2, 16, 4, 4), "32 feature channels"),
        (torch.randn(32), "shape"),
        (torch.ones(2, 32, 4, 4, dtype=torch.long), "floating-point"),
    ],
)
def test_bad_features_raise(z, message):
    with pytest.raises(ValueError, match=message):
        make_quantizer()(z)


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        (torch.full((1, 4, 2, 2), 64), r"\[0, 64\)"),
        (torch.full((1, 4, 2, 2), -1), r"\[0, 64\)"),
        (torch.zeros(1, 3, 2, 2, dtype=torch.long), "num_heads=4"),
        (torch.zeros(1, 4, 2, 2), "integer"),
        (torch.zeros(4, 2, dtype=torch.long), "shape"),
    ],
)
def test_bad_indices_raise(indices, message):
    with pytest.raises(ValueError, match=message):
        make_quantizer().lookup(indices)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(embed_dim=30), "divisible"),
        (dict(cost_normalization="null"), "cost_normalization"),
        (dict(inference_assignment="sample"), "inference_assignment"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(num_codes=0), "positive"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_quantizer(**kwargs)


def test_sinkhorn_rejects_bad_costs():
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn(torch.rand(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        sinkhorn(torch.tensor([[0.0, math.inf]]))
