"""The Sinkhorn solver computes the original algorithm, its `+1e-8` guards included: every path (materialised,
streaming, tiled) gives the assignments of a float64 transcription of the original formulas with the guards, also at
the paper's codebook size, where the guards matter; the nearest-code search gives the exact argmin; the quantizer's
loss and gradients follow from the assignment. Also: the memory the modes promise (one (N, K) matrix, or none)."""

import os

import pytest
import torch
from conftest import OFFICIAL_TINY
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import optvq_hf.assignment as assignment
from optvq_hf import SinkhornQuantizer
from optvq_hf.conversion.original_reference import original_indices


def features_and_codes(num_rows: int, num_codes: int, code_dim: int, seed: int, outliers: bool = False):
    """Rows and codes like a model's at initialisation: N(0, 1) features and codebook."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_rows, code_dim, generator=generator)
    codes = torch.randn(num_codes, code_dim, generator=generator)
    if outliers:  # rows and codes far from everything: the original's float32 kernel underflows for them
        rows[:3] *= 6.0
        codes[:4] = codes[:4] * 4.0 + 3.0
    return rows, codes


def solve(rows, codes, mode="all", epsilon=10.0, chunk_size=4096, streaming=False, iterations=5):
    return assignment.sinkhorn_codes(rows, codes, epsilon, iterations, mode, chunk_size, False, streaming)


def test_paper_sized_codebook_equals_the_guarded_float64_formulas():
    # K = 16384 codes, N = 4096 rows: most codes start with a mass far below the 1e-8 guard. The solver equals the
    # float64 transcription with the guards (and the original's own float32 arithmetic); without them 54 differ.
    rows, codes = features_and_codes(4096, 16384, 8, seed=0)
    expected = original_indices(rows, codes)
    assert torch.equal(solve(rows, codes), expected)
    for streaming in (False, True):  # the exp domain alone, without its fallback
        indices, trusted = exp_domain(rows, codes, streaming=streaming, tile_rows=333)
        assert trusted and torch.equal(indices, expected)
    assert int((original_indices(rows, codes, guard=0.0) != expected).sum()) == 54


def test_fixture_sinkhorn_indices_equal_the_original_outputs():
    reference = load_file(OFFICIAL_TINY / "reference_outputs.safetensors")
    weights = load_file(OFFICIAL_TINY / "hub_format" / "model.safetensors")
    quantizer = SinkhornQuantizer(64, 32, num_heads=4, inference_assignment="sinkhorn").eval()
    quantizer.load_state_dict(
        {key[len("model.quantize.") :]: value for key, value in weights.items() if "quantize" in key}
    )
    rows = reference["latents"].permute(0, 2, 3, 1).reshape(-1, 8)
    for streaming in (False, True):
        quantizer.streaming = streaming
        with torch.no_grad():
            indices = quantizer(reference["latents"]).indices
        assert torch.equal(indices, reference["indices"])
    guard_free = original_indices(rows, quantizer.codebook().detach(), guard=0.0).reshape(8, 8, 8, 4)
    assert int((guard_free.permute(0, 3, 1, 2) != reference["indices"]).sum()) == 8  # the README's "8 of 2048"


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("num_rows", "num_codes", "code_dim", "tile_entries"), [(512, 64, 8, 2**12), (999, 300, 16, 2**14)]
)
def test_assignments_equal_the_float64_formulas(num_rows, num_codes, code_dim, tile_entries, streaming, monkeypatch):
    monkeypatch.setattr(assignment, "TILE_ENTRIES", tile_entries)  # several tiles, the last one ragged
    rows, codes = features_and_codes(num_rows, num_codes, code_dim, seed=num_rows)
    assert torch.equal(solve(rows, codes, streaming=streaming), original_indices(rows, codes))


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(("mode", "epsilon"), [("all", 10.0), ("all", 3.0), ("dim", 10.0), ("none", 1.5)])
def test_normalisations_equal_the_float64_formulas(mode, epsilon, streaming):
    rows, codes = features_and_codes(700, 200, 16, seed=1)
    expected = original_indices(rows, codes, epsilon=epsilon, mode=mode)
    assert torch.equal(solve(rows, codes, mode, epsilon, streaming=streaming), expected)


def test_outliers_where_the_original_float32_underflows_get_the_exact_assignment():
    rows, codes = features_and_codes(800, 128, 16, seed=2, outliers=True)
    expected = original_indices(rows, codes, epsilon=20.0)
    float32 = original_indices(rows, codes, epsilon=20.0, dtype=torch.float32)
    assert (float32[:3] != expected[:3]).all()  # the original's float32 kernel underflows for these rows
    assert torch.equal(solve(rows, codes, epsilon=20.0), expected)
    assert torch.equal(solve(rows, codes, epsilon=20.0, streaming=True), expected)


@pytest.mark.parametrize("iterations", [1, 2, 7])
def test_iteration_counts_and_chunk_sizes(iterations):
    rows, codes = features_and_codes(300, 40, 8, seed=4)
    expected = original_indices(rows, codes, iterations=iterations)
    for chunk_size in (1, 77, 4096):
        for streaming in (False, True):
            indices = solve(rows, codes, chunk_size=chunk_size, iterations=iterations, streaming=streaming)
            assert torch.equal(indices, expected)


def exp_domain(rows, codes, epsilon=10.0, mode="all", streaming=False, tile_rows=4096):
    """The exp-domain solver alone: (indices, trusted), without the log-domain fallback."""
    indices, trusted = assignment._exp_domain_indices(rows, codes, epsilon, 5, mode, tile_rows, False, streaming)
    return indices, bool(trusted)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("num_rows", "num_codes", "code_dim", "feature_scale"),
    [(2048, 1024, 64, 1.0), (2048, 1024, 64, 3.0), (2048, 1024, 16, 0.1), (999, 300, 16, 1.0)],
)
def test_the_exp_domain_alone_is_exact_on_model_like_features(num_rows, num_codes, code_dim, feature_scale, streaming):
    # The fast path must not lean on its fallback: on features like a model's (at initialisation, shrunk, spread,
    # far from the codebook), at the paper's codebook size too, it vouches for every mass and argmax, and is exact.
    rows, codes = features_and_codes(num_rows, num_codes, code_dim, seed=code_dim)
    rows = rows * feature_scale
    indices, trusted = exp_domain(rows, codes, streaming=streaming, tile_rows=333)
    assert trusted
    assert torch.equal(indices, original_indices(rows, codes))


def test_untrusted_batches_are_solved_again_in_the_log_domain(monkeypatch):
    # Rows and codes far from everything: e^-87 clamping and underflow could misstate masses, the certificate says so,
    # and the batch is solved exactly in the log domain (where the original's own float32 gets 3 rows wrong).
    rows, codes = features_and_codes(800, 128, 16, seed=2, outliers=True)
    assert not exp_domain(rows, codes, epsilon=20.0)[1]
    fallbacks = []
    log_domain = assignment._sinkhorn_indices
    monkeypatch.setattr(assignment, "_sinkhorn_indices", lambda *args: fallbacks.append(1) or log_domain(*args))
    assert torch.equal(solve(rows, codes, epsilon=20.0), original_indices(rows, codes, epsilon=20.0))
    assert fallbacks == [1]
    solve(*features_and_codes(800, 128, 16, seed=2), epsilon=20.0)
    assert fallbacks == [1]  # a trusted batch is solved once


def distance_statistics(rows, codes, tile_rows=97):
    distances = assignment._Distances(rows, codes)
    scratch = rows.new_empty(tile_rows, codes.shape[0])
    tiles = (
        (start, stop, distances.tile(start, stop, scratch[: stop - start]))
        for start, stop in ((start, min(start + tile_rows, len(rows))) for start in range(0, len(rows), tile_rows))
    )
    return assignment._distance_statistics(tiles, rows, codes, False)


@pytest.mark.parametrize("feature_scale", [1.0, 0.01, 30.0])
def test_distance_statistics_equal_float64_formulas(feature_scale):
    rows, codes = features_and_codes(1000, 300, 64, seed=12)
    rows = rows * feature_scale
    distances = torch.cdist(rows, codes)  # the original's float32 distances
    row_min, code_shift, minimum, std, trusted = distance_statistics(rows, codes)
    assert bool(trusted)
    assert abs(std.double() / distances.double().std() - 1) < 1e-6  # float32 two-pass sums: a few 1e-6
    assert torch.equal(row_min, distances.amin(1))
    assert torch.equal(code_shift, (distances - distances.amin(1, keepdim=True)).amin(0))
    assert torch.equal(minimum, distances.min())


def test_distances_too_alike_for_the_closed_form_variance_are_solved_in_the_log_domain(monkeypatch):
    # Rows in a tight cluster far from a tight codebook: all distances within a few percent of each other (mean
    # square / variance about 30,000), so the closed-form variance (mean square minus squared mean) loses digits; it
    # is not trusted, and the log domain gives the exact assignment. Six times wider spreads (ratio about 850) stay
    # within the bound and the fast path keeps them.
    rows, codes = features_and_codes(600, 128, 16, seed=13)
    tight_rows, tight_codes = rows * 0.05 + 3.0, codes * 0.05
    trusted = distance_statistics(tight_rows, tight_codes)[4]
    assert not bool(trusted)
    assert bool(distance_statistics(rows * 0.3 + 3.0, codes * 0.3)[4])
    fallbacks = []
    log_domain = assignment._sinkhorn_indices
    monkeypatch.setattr(assignment, "_sinkhorn_indices", lambda *args: fallbacks.append(1) or log_domain(*args))
    assert torch.equal(solve(tight_rows, tight_codes), original_indices(tight_rows, tight_codes))
    assert fallbacks == [1]
    assert not exp_domain(tight_rows, tight_codes)[1]
    assert exp_domain(tight_rows, tight_codes, mode="dim")[1]  # only "all" standardises by the variance


class OperatorCount(TorchDispatchMode):
    """Counts the calls of the given aten operators."""

    def __init__(self, *operators):
        super().__init__()
        self.operators, self.count = operators, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.operators:
            self.count += 1
        return func(*args, **(kwargs or {}))


# The operators that copy a tensor's value to the host (`.item()`, `bool()`, `.tolist()`).
HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)


@pytest.mark.parametrize("streaming", [False, True])
def test_the_solver_reads_one_value_on_the_host_after_its_iterations(streaming):
    rows, codes = features_and_codes(512, 64, 8, seed=3)
    with OperatorCount(*HOST_READS) as reads:
        assignment._exp_domain_indices(rows, codes, 10.0, 5, "all", 100, False, streaming)
    assert reads.count == 0
    with OperatorCount(*HOST_READS) as reads:
        solve(rows, codes, streaming=streaming)
    assert reads.count == 1  # whether the certificate vouched for the batch


@pytest.mark.parametrize(("num_rows", "tile_rows"), [(300, 300), (300, 7), (1000, 128)])
def test_distance_tiles_equal_cdist(num_rows, tile_rows):
    rows, codes = features_and_codes(num_rows, 257, 64, seed=num_rows)
    distances = assignment._Distances(rows, codes)
    whole = distances.finish(distances.product(0, num_rows, torch.empty(num_rows, 257)))
    tiles = torch.cat(
        [
            distances.tile(s, min(s + tile_rows, num_rows), torch.empty(min(tile_rows, num_rows - s), 257))
            for s in range(0, num_rows, tile_rows)
        ]
    )
    assert torch.equal(whole, torch.cdist(rows, codes))
    assert torch.equal(tiles, whole)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("num_codes", [4096, 640, 64, 100])
def test_row_extremes_by_blocks_equal_torch_argmax_and_argmin_ties_included(num_codes, largest):
    generator = torch.Generator().manual_seed(num_codes)
    sign = 1.0 if largest else -1.0
    tile = torch.rand(50, num_codes, generator=generator) * sign
    tile[:, 7] = 2.0 * sign  # a tie across blocks: the first occurrence wins
    tile[:10, num_codes - 1] = 2.0 * sign
    tile[10:20, 3] = 2.0 * sign  # a tie inside the first block
    tile[20:30, num_codes // 2 + 1] = 3.0 * sign  # a single extreme in a later block
    tile[30:35] = 0.5  # a whole row tied
    indices, values = assignment._row_extreme(tile, largest)
    assert torch.equal(indices, torch.argmax(tile, dim=1) if largest else torch.argmin(tile, dim=1))
    assert torch.equal(values, tile.amax(1) if largest else tile.amin(1))
    assert indices[:10].tolist() == [7] * 10 and indices[10:20].tolist() == [3] * 10
    assert indices[20:30].tolist() == [num_codes // 2 + 1] * 10 and indices[30:35].tolist() == [0] * 5


def _bytes_advised_huge(tensor: torch.Tensor) -> int:
    """Bytes of the tensor's data inside memory mappings marked for huge pages ("hg" in /proc/self/smaps VmFlags;
    madvise splits a mapping where the advised range starts). Whether the kernel then finds free 2 MiB pages depends
    on the machine's memory fragmentation; the advice itself does not."""
    first = tensor.data_ptr()
    last = first + tensor.numel() * tensor.element_size()
    advised, overlap = 0, 0
    with open("/proc/self/smaps") as handle:
        for line in handle:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                overlap = max(0, min(high, last) - max(low, first))
            elif line.startswith("VmFlags:") and "hg" in line.split()[1:]:
                advised += overlap
    return advised


@pytest.mark.skipif(
    not (os.path.exists("/proc/self/smaps") and os.path.isdir("/sys/kernel/mm/transparent_hugepage")),
    reason="needs Linux with transparent huge pages",
)
def test_the_kernel_matrix_is_advised_huge_pages_and_keeps_its_values():
    plain = torch.empty(64, 2**18)  # 64 MiB
    assignment._advise_huge_pages(plain[:1])  # below the size threshold: no advice
    assert _bytes_advised_huge(plain) == 0
    advised = torch.empty(64, 2**18)
    assignment._advise_huge_pages(advised)
    assert _bytes_advised_huge(advised) >= advised.numel() * 4 - 4096  # all but the partial first page
    advised.fill_(1.5)
    plain.fill_(1.5)
    assert torch.equal(advised, plain)
    written = torch.arange(2**24, dtype=torch.float32).reshape(64, -1)
    assignment._advise_huge_pages(written)  # advice after writing keeps the data
    assert torch.equal(written.flatten(), torch.arange(2**24, dtype=torch.float32))


def test_the_solver_compiles_without_graph_breaks_in_its_iterations():
    rows, codes = features_and_codes(256, 64, 8, seed=6)
    compiled = torch.compile(assignment._sinkhorn_indices, backend="eager")
    kernel = assignment._LogKernel(rows, codes, 10.0, "all", 4096, False, False)
    assert torch.equal(compiled(kernel, 64, 5, False, rows.device), original_indices(rows, codes))


def test_nearest_codes_equal_the_exact_argmin():
    rows, codes = features_and_codes(3000, 1000, 16, seed=7)
    exact = torch.cdist(rows.double(), codes.double()).argmin(dim=1)
    for chunk_size in (1, 333, 4096):
        assert torch.equal(assignment.nearest_codes(rows, codes, chunk_size), exact)


@pytest.mark.parametrize(("threads", "products"), [(1, 16), (2, 8), (4, 4)])
def test_nearest_code_tiles_give_each_thread_64_rows(threads, products):
    # 16,384 codes: a cache-sized tile has 64 rows; with more threads each one's share of the GEMM keeps 64 rows.
    rows, codes = features_and_codes(1024, 16384, 8, seed=8)
    exact = torch.cdist(rows.double(), codes.double()).argmin(dim=1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with OperatorCount(torch.ops.aten.addmm.out) as gemms:
            indices = assignment.nearest_codes(rows, codes)
    finally:
        torch.set_num_threads(before)
    assert gemms.count == products
    assert torch.equal(indices, exact)


@pytest.mark.parametrize("iterations", [1, 5])
def test_streaming_reads_the_features_once_per_iteration(iterations):
    # passes over the distances: statistics, kernel + first column sums, one per further iteration (its row
    # half-step and the next column sums share the pass), the argmax
    rows, codes = features_and_codes(600, 64, 8, seed=9)
    tile_rows, num_tiles = 100, 6
    # matrix-matrix products: the distance tiles, which streaming recomputes on every pass
    with OperatorCount(torch.ops.aten.mm.default, torch.ops.aten.mm.out) as products:
        indices, trusted = assignment._exp_domain_indices(rows, codes, 10.0, iterations, "all", tile_rows, False, True)
    assert bool(trusted)
    assert products.count == (iterations + 2) * num_tiles
    assert torch.equal(indices, original_indices(rows, codes, iterations=iterations))


def test_streaming_is_chosen_above_the_memory_threshold(monkeypatch):
    rows, codes = features_and_codes(256, 32, 8, seed=5)
    calls = []
    original = assignment._exp_domain_indices

    def recording(*args):
        calls.append(args[7])  # streaming
        return original(*args)

    monkeypatch.setattr(assignment, "_exp_domain_indices", recording)
    monkeypatch.setattr(assignment, "STREAMING_MIN_BYTES", 256 * 32 * 4)
    assignment.sinkhorn_codes(rows, codes, 10.0, 5)
    assignment.sinkhorn_codes(torch.cat([rows, rows[:1]]), codes, 10.0, 5)
    assignment.sinkhorn_codes(torch.cat([rows, rows[:1]]), codes, 10.0, 5, streaming=False)
    assert calls == [False, True, False]
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
def test_one_or_no_full_matrix(streaming, expected, monkeypatch):
    monkeypatch.setattr(assignment, "TILE_ENTRIES", 2**16)
    num_rows, num_codes = 1024, 512
    quantizer = SinkhornQuantizer(num_codes, 16, streaming=streaming, chunk_size=256).train()
    z = torch.randn(1, num_rows, 16, requires_grad=True)
    with LargeAllocations(min_numel=num_rows * num_codes // 2) as allocations:
        out = quantizer(z)
        out.loss.backward()
    assert len(allocations.storages) == expected


def test_the_kernel_workspace_keeps_its_memory_and_never_its_values():
    workspace = assignment.KernelWorkspace()
    rows, codes = features_and_codes(300, 64, 8, seed=11)
    seen = []
    original = assignment._exp_domain_indices

    def recording(*args):
        seen.append(args[8].data_ptr())
        args[8].fill_(float("nan"))  # what a previous call left there must not matter
        return original(*args)

    expected = [solve(rows, codes), solve(rows[:200], codes), solve(rows, codes[:50])]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(assignment, "_exp_domain_indices", recording)
        got = [
            assignment.sinkhorn_codes(r, c, 10.0, 5, workspace=workspace)
            for r, c in ((rows, codes), (rows[:200], codes), (rows, codes[:50]))
        ]
    for indices, reference in zip(got, expected):
        assert torch.equal(indices, reference)
    assert len(set(seen)) == 1  # smaller matrices reuse the first one's memory
    assert workspace.nbytes == 300 * 64 * 4
    assert torch.equal(assignment.sinkhorn_codes(rows, codes, 10.0, 5, workspace=workspace, streaming=True), got[0])
    assert workspace.nbytes == 300 * 64 * 4  # streaming holds no matrix and leaves the workspace alone
    bigger = torch.cat([rows, rows])
    assert torch.equal(assignment.sinkhorn_codes(bigger, codes, 10.0, 5, workspace=workspace), solve(bigger, codes))
    assert workspace.nbytes == 600 * 64 * 4
    workspace.clear()
    assert workspace.nbytes == 0


def test_a_busy_or_non_cpu_workspace_hands_out_a_matrix_of_its_own():
    workspace = assignment.KernelWorkspace()
    like = torch.zeros(1)
    with workspace.matrix(4, 3, like) as first, workspace.matrix(4, 3, like) as second:  # another caller meanwhile
        assert first.shape == second.shape == (4, 3)
        assert first.data_ptr() != second.data_ptr()
    assert workspace.nbytes == 4 * 3 * 4
    with workspace.matrix(4, 3, torch.zeros(1, device="meta")) as elsewhere:  # a GPU's allocator caches itself
        assert elsewhere.device.type == "meta"
    assert workspace.nbytes == 4 * 3 * 4


def test_copies_and_pickles_of_a_quantizer_leave_the_workspace_behind():
    import copy
    import pickle

    quantizer = SinkhornQuantizer(256, 16, streaming=False).train()
    quantizer(torch.randn(2, 16, 8, 8)).loss.backward()
    assert quantizer.kernel_workspace.nbytes == 128 * 256 * 4
    assert copy.deepcopy(quantizer).kernel_workspace.nbytes == 0
    restored = pickle.loads(pickle.dumps(quantizer))
    assert restored.kernel_workspace.nbytes == 0
    assert len(pickle.dumps(quantizer)) < 128 * 256 * 4
    restored.train()(torch.randn(2, 16, 8, 8))
    assert restored.kernel_workspace.nbytes == 128 * 256 * 4


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
