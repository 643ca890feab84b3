"""The optimised Sinkhorn solver computes the original formulas: every path (exp / log domain, materialised /
streaming, tiled, with its underflow repairs) gives the assignments of a float64 computation of the original
algorithm, and the quantizer's loss and gradients follow from them. Also: the memory the modes promise (one (N, K)
matrix, or none)."""

import pytest
import torch
from original_formulas import normalize_cost, original_indices, original_plan
from torch.utils._python_dispatch import TorchDispatchMode

import optvq_hf.assignment as quantization
from optvq_hf import SinkhornQuantizer


def features_and_codes(num_rows: int, num_codes: int, code_dim: int, seed: int, outliers: bool = False):
    """Rows and codes like a model's at initialisation: N(0, 1) features and codebook."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_rows, code_dim, generator=generator)
    codes = torch.randn(num_codes, code_dim, generator=generator)
    if outliers:  # rows and codes far from everything: their exp-domain sums underflow and must be repaired
        rows[:3] *= 6.0
        codes[:4] = codes[:4] * 4.0 + 3.0
    return rows, codes


def solve(rows, codes, mode="all", epsilon=10.0, chunk_size=4096, streaming=False, iterations=5):
    solver = quantization._SinkhornSolver(
        epsilon, iterations, mode, chunk_size, distributed=False, streaming=streaming
    )
    return solver.assign(rows, codes)


@pytest.fixture
def small_tiles(monkeypatch):
    # Tiles of a few rows, so that every size below runs through many tiles and a ragged last one.
    monkeypatch.setattr(quantization, "CPU_TILE_ENTRIES", 2**14)


class RepairCounter:
    """Counts the rows and codes whose exp-domain sums were recomputed in the log domain."""

    def __init__(self, monkeypatch):
        self.rows = self.codes = 0
        original = quantization._Kernel.log_block

        def counting(kernel, rows, codes=None):
            if codes is None:
                self.rows += len(rows)
            else:
                self.codes += len(codes)
            return original(kernel, rows, codes)

        monkeypatch.setattr(quantization._Kernel, "log_block", counting)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("num_rows", "num_codes", "code_dim", "tile_entries"),
    [(512, 64, 8, 2**12), (999, 300, 16, 2**14), (2560, 1024, 64, 2**20)],
)
def test_assignments_equal_the_float64_formulas(num_rows, num_codes, code_dim, tile_entries, streaming, monkeypatch):
    monkeypatch.setattr(quantization, "CPU_TILE_ENTRIES", tile_entries)  # several tiles, the last one ragged
    rows, codes = features_and_codes(num_rows, num_codes, code_dim, seed=num_rows)
    indices = solve(rows, codes, streaming=streaming)
    assert torch.equal(indices, original_indices(rows, codes))


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(("mode", "epsilon"), [("all", 10.0), ("all", 3.0), ("dim", 10.0), ("none", 1.5)])
def test_both_domains_equal_the_float64_formulas(mode, epsilon, streaming, small_tiles, monkeypatch):
    rows, codes = features_and_codes(700, 200, 16, seed=1)
    expected = original_indices(rows, codes, epsilon=epsilon, mode=mode)
    for spread_limit in (1e9, -1.0):  # exp domain, then log domain
        monkeypatch.setattr(quantization, "EXP_DOMAIN_MAX_SPREAD", spread_limit)
        assert torch.equal(solve(rows, codes, mode, epsilon, streaming=streaming), expected)


def test_underflowing_rows_and_codes_are_repaired_exactly(small_tiles, monkeypatch):
    # Outlying rows and codes: in float32 their kernel entries underflow, and the original's own float32 code assigns
    # the outlying rows wrongly. The exp domain detects each sum it cannot vouch for and recomputes it exactly.
    rows, codes = features_and_codes(800, 128, 16, seed=2, outliers=True)
    expected = original_indices(rows, codes, epsilon=20.0)
    cost = normalize_cost(torch.cdist(rows, codes), "all", 16)
    assert (original_plan(cost, 20.0, 5, guard=1e-8).argmax(dim=1)[:3] != expected[:3]).all()
    monkeypatch.setattr(quantization, "EXP_DOMAIN_MAX_SPREAD", 1e9)
    repairs = RepairCounter(monkeypatch)
    indices = solve(rows, codes, epsilon=20.0)
    assert repairs.rows > 0 and repairs.codes > 0
    assert torch.equal(indices, expected)
    assert torch.equal(solve(rows, codes, epsilon=20.0, streaming=True), expected)


def test_repairing_every_sum_gives_the_same_assignment(small_tiles, monkeypatch):
    # With a certificate that trusts nothing, every row, code and argmax goes through the repair path.
    rows, codes = features_and_codes(300, 50, 8, seed=3)
    expected = original_indices(rows, codes)
    monkeypatch.setattr(quantization, "_LOST_TERM", 1.0)
    monkeypatch.setattr(quantization, "_ARGMAX_FLOOR", 2.0)
    repairs = RepairCounter(monkeypatch)
    assert torch.equal(solve(rows, codes), expected)
    assert repairs.rows == 300 * 5  # 4 row steps + the argmax, every row
    assert repairs.codes == 50 * 5 * -(-300 // (2**14 // 50))  # 5 column steps, every code, tile by tile


@pytest.mark.parametrize("iterations", [1, 2, 7])
def test_iteration_counts_and_chunk_sizes(iterations, monkeypatch):
    monkeypatch.setattr(quantization, "CPU_TILE_ENTRIES", 10**9)  # tiles of exactly chunk_size rows
    rows, codes = features_and_codes(300, 40, 8, seed=4)
    expected = original_indices(rows, codes, iterations=iterations)
    for chunk_size in (1, 77, 4096):
        for streaming in (False, True):
            indices = solve(rows, codes, chunk_size=chunk_size, iterations=iterations, streaming=streaming)
            assert torch.equal(indices, expected)


def test_streaming_is_chosen_above_the_memory_threshold(monkeypatch):
    rows, codes = features_and_codes(256, 32, 8, seed=5)
    monkeypatch.setattr(quantization, "STREAMING_MIN_BYTES", 256 * 32 * 4)
    assert not quantization._SinkhornSolver(10.0, 5, "all", 64, False).uses_streaming(256, 32)
    assert quantization._SinkhornSolver(10.0, 5, "all", 64, False).uses_streaming(257, 32)
    assert not quantization._SinkhornSolver(10.0, 5, "all", 64, False, streaming=False).uses_streaming(10**6, 10**6)
    with pytest.raises(ValueError, match="streaming"):
        SinkhornQuantizer(32, 8, streaming="auto")


def test_quantizer_streaming_flag_changes_nothing_but_memory():
    torch.manual_seed(0)
    quantizers = [SinkhornQuantizer(96, 32, num_heads=4, chunk_size=40, streaming=mode) for mode in (False, True)]
    quantizers[1].load_state_dict(quantizers[0].state_dict())
    z = torch.randn(3, 32, 5, 5)
    materialised, streamed = (quantizer.train()(z) for quantizer in quantizers)
    assert torch.equal(materialised.indices, streamed.indices)
    assert torch.equal(materialised.quantized, streamed.quantized) and torch.equal(materialised.loss, streamed.loss)
    assert "streaming=True" in repr(quantizers[1])


# -- memory: which (N, K) matrices exist ------------------------------------------------------------------------------
class LargeAllocations(TorchDispatchMode):
    """Records the storages of at least `min_numel` elements that the operations inside the block create."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel, self.storages = min_numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes() >= 4 * self.min_numel:
                self.storages.add(tensor.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize(("streaming", "expected"), [(False, 1), (True, 0)])
def test_one_or_no_full_matrix(streaming, expected):
    num_rows, num_codes = 1024, 512
    quantizer = SinkhornQuantizer(num_codes, 16, streaming=streaming, chunk_size=256).train()
    z = torch.randn(1, num_rows, 16, requires_grad=True)
    with LargeAllocations(min_numel=num_rows * num_codes // 2) as allocations:
        out = quantizer(z)
        out.loss.backward()
    assert len(allocations.storages) == expected


# -- loss and gradients -----------------------------------------------------------------------------------------------
def test_loss_and_gradients_follow_from_the_exact_assignment():
    torch.manual_seed(0)
    quantizer = SinkhornQuantizer(128, 64, num_heads=4, beta=0.25).train()
    z = torch.randn(4, 64, 6, 6, requires_grad=True)
    out = quantizer(z)
    (out.loss + out.quantized.pow(2).mean()).backward()

    # Reference: the original's formulas, float64 assignment, float64 loss.
    weight = quantizer.embedding.weight.detach().double().requires_grad_(True)
    proj_weight = quantizer.proj.weight.detach().double().requires_grad_(True)
    proj_bias = quantizer.proj.bias.detach().double().requires_grad_(True)
    z_ref = z.detach().double().requires_grad_(True)
    codes = torch.nn.functional.linear(weight, proj_weight, proj_bias)
    rows = z_ref.permute(0, 2, 3, 1).reshape(-1, 16)
    indices = original_indices(rows.detach().float(), codes.detach().float())
    assert torch.equal(out.indices.permute(0, 2, 3, 1).reshape(-1), indices)
    selected = codes[indices]
    loss = ((rows - selected.detach()) ** 2).mean() + 0.25 * ((selected - rows.detach()) ** 2).mean()
    quantized = rows + (selected - rows).detach()
    (loss + quantized.pow(2).mean()).backward()

    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(z.grad, z_ref.grad.float(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(quantizer.embedding.weight.grad, weight.grad.float(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(quantizer.proj.weight.grad, proj_weight.grad.float(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(quantizer.proj.bias.grad, proj_bias.grad.float(), rtol=1e-5, atol=1e-8)
