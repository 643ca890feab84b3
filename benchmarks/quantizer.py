"""Speed and memory of one quantizer call (forward + backward, training mode), against the original algorithm.

Compares, in one run and on the same inputs:

- `optvq`: this package's `SinkhornQuantizer` (materialised: one (N, K) matrix; the exp-domain solver, one
  matrix-vector product per half-step, with its underflow certificate),
- `optvq-stream`: the same in streaming mode (no (N, K) matrix; tiles recomputed on every pass),
- `log-domain`: the plain log-domain solver (the exact fallback, and what `torch.compile` traces), eager,
- `log-compiled`: the same with its iterations under `torch.compile`,
- `previous` (only with --methods): the solver of an earlier commit, loaded from git (`git show
  REV:optvq_hf/assignment.py`, REV from `--previous-commit`), for A/B comparisons of solver changes; skipped outside a
  git checkout. The default, 2ed03b4, is a guard-free exp-domain solver (not the original's algorithm: it drops the
  +1e-8 guards),
- `original`: the original OptVQ algorithm, `optvq_hf.conversion.original_reference.original_sinkhorn` (its
  transcription: cdist, (D - mean) / (std + 1e-6), minus the min, exp, 5 in-place scaling iterations with the +1e-8
  guards, argmax), the baseline the paper's users run,
- `nearest`: this package's `VectorQuantizer` (nearest code), the floor of what any assignment costs,
- `vq-pytorch`: `vector_quantize_pytorch.VectorQuantize` (nearest code with EMA codebook updates, its defaults), when
  importable (`pip install vector-quantize-pytorch`; benchmark-only).

N rows of dimension d are fed as the paper's layout: (N / 1024, 4 * d, 16, 16) features, 4 heads, one codebook of K
codes shared by the heads. Each call is `loss = out.loss + mean(out.quantized ** 2); loss.backward()`.

    python benchmarks/quantizer.py                                  # CPU, or CUDA when available; default sizes
    python benchmarks/quantizer.py --sizes 16384,4096,64 --repeats 9
    python benchmarks/quantizer.py --device cuda --sizes 32768,16384,64 32768,65536,64

Time: median over `--repeats` rounds after `--warmup` rounds. A round calls every method once, then the limit's
GEMM and passes, then the assignments alone, so that a change of the machine's speed (other processes on shared
cores) reaches them alike; the ratios to the limit are taken round by round (median and range). CUDA times come
from CUDA events.

Memory: the peak above what was allocated before the call (the inputs, parameters and module state; the kernel
matrix the quantizer keeps between calls on CPU is counted as the call's). CUDA: `torch.cuda.max_memory_allocated`.
CPU: the peak resident set size of a fresh process running one call (Linux: /proc/self/clear_refs resets the
high-water mark, VmHWM in /proc/self/status reads it), with glibc told to return freed memory at once, so that the
resident set follows the allocations; it includes a few MB of first-call library buffers, alike for every method.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

# libgomp's threads spin while they wait for each other; where other processes compete for the cores, a spinning
# thread holds a core that a descheduled one needs, and every parallel operation then costs milliseconds.
# Passive waiting, unless the caller chose otherwise (OMP_WAIT_POLICY=ACTIVE is libgomp's default).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

from optvq_hf import SinkhornQuantizer, VectorQuantizer
from optvq_hf.conversion.original_reference import original_sinkhorn

HEADS = 4
DEFAULT_SIZES = ["4096,1024,64", "16384,4096,64", "32768,16384,64"]
METHODS = ["original", "optvq", "optvq-stream", "log-domain", "log-compiled", "nearest", "vq-pytorch"]
EXTRA_METHODS = ["previous"]  # on request: the solver of an earlier commit
SOLVER_PREFIXES = ("optvq", "log", "previous")
COMPARED_WITH_OPTVQ = ("original", "optvq-stream", "log-domain", "log-compiled", "previous")


# ---------------------------------------------------------------------------------------------------------------------
# The compared solvers
# ---------------------------------------------------------------------------------------------------------------------
DEFAULT_PREVIOUS_COMMIT = "2ed03b4"


def previous_solver(commit: str):
    """The solver module of a git revision (None outside a checkout that holds it)."""
    import types

    try:
        source = subprocess.run(
            ["git", "show", f"{commit}:optvq_hf/assignment.py"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("previous_assignment")
    exec(compile(source, "previous_assignment.py", "exec"), module.__dict__)
    return module


class PreviousSinkhornQuantizer(SinkhornQuantizer):
    """This package's quantizer with the solver of an earlier commit (`previous_solver`), for comparison."""

    solver = None

    def sinkhorn_codes(self, rows, codes, distributed):
        return self.solver.sinkhorn_codes(
            rows, codes, self.epsilon, self.iterations, self.cost_normalization, self.chunk_size, distributed, False
        )


class LogDomainSinkhornQuantizer(SinkhornQuantizer):
    """This package's quantizer with its plain log-domain solver (the exact fallback, and the solver that
    torch.compile traces), eager or with its iterations compiled."""

    compiled = False
    iterations_compiled = None

    def sinkhorn_codes(self, rows, codes, distributed):
        import optvq_hf.assignment as assignment

        solve = assignment._sinkhorn_indices
        if self.compiled:
            if LogDomainSinkhornQuantizer.iterations_compiled is None:
                LogDomainSinkhornQuantizer.iterations_compiled = torch.compile(assignment._sinkhorn_indices)
            solve = LogDomainSinkhornQuantizer.iterations_compiled
        kernel = assignment._LogKernel(
            rows, codes, self.epsilon, self.cost_normalization, self.chunk_size, distributed, False
        )
        return solve(kernel, codes.shape[0], self.iterations, distributed, rows.device)


class OriginalSinkhornQuantizer(nn.Module):
    """The original quantizer's training-mode computation, with this package's parameters and loss."""

    def __init__(
        self,
        num_codes: int,
        embed_dim: int,
        num_heads: int,
        epsilon: float = 10.0,
        iterations: int = 5,
        beta: float = 0.25,
    ):
        super().__init__()
        self.num_heads, self.code_dim = num_heads, embed_dim // num_heads
        self.epsilon, self.iterations, self.beta = epsilon, iterations, beta
        self.embedding = nn.Embedding(num_codes, self.code_dim)
        self.proj = nn.Linear(self.code_dim, self.code_dim)

    def forward(self, z: torch.Tensor):
        channels_last = z.permute(0, 2, 3, 1)
        rows = channels_last.float().reshape(-1, self.code_dim)
        codes = self.proj(self.embedding.weight)
        distances = torch.cdist(rows, codes)  # outside no_grad, as in the original
        with torch.no_grad():
            cost = (distances - distances.mean()) / (distances.std() + 1e-6)
            cost = cost - cost.min()
            plan = original_sinkhorn(cost, self.iterations, self.epsilon)
        indices = plan.argmax(dim=-1)
        selected = codes[indices]
        loss = torch.mean((rows - selected.detach()) ** 2) + self.beta * torch.mean((selected - rows.detach()) ** 2)
        quantized = rows + (selected - rows).detach()
        quantized = quantized.reshape(channels_last.shape).permute(0, 3, 1, 2)
        return quantized, indices, loss


# ---------------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------------
def vq_pytorch_available() -> bool:
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def build(method: str, num_codes: int, code_dim: int, device: torch.device) -> nn.Module:
    embed_dim = HEADS * code_dim
    torch.manual_seed(0)
    # One codebook for the three Sinkhorn variants, so that their assignments can be compared.
    reference = VectorQuantizer(num_codes, embed_dim, HEADS).state_dict()
    if method == "original":
        module = OriginalSinkhornQuantizer(num_codes, embed_dim, HEADS)
    elif method in ("optvq", "optvq-stream"):
        module = SinkhornQuantizer(num_codes, embed_dim, HEADS, streaming=method == "optvq-stream")
    elif method in ("log-domain", "log-compiled"):
        module = LogDomainSinkhornQuantizer(num_codes, embed_dim, HEADS, streaming=False)
        module.compiled = method == "log-compiled"
    elif method == "previous":
        module = PreviousSinkhornQuantizer(num_codes, embed_dim, HEADS, streaming=False)
    elif method == "nearest":
        module = VectorQuantizer(num_codes, embed_dim, HEADS)
    elif method == "vq-pytorch":
        from vector_quantize_pytorch import VectorQuantize

        module = VectorQuantize(
            dim=embed_dim,
            codebook_size=num_codes,
            heads=HEADS,
            codebook_dim=code_dim,
            separate_codebook_per_head=False,
            accept_image_fmap=True,
        )
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if method in ("optvq", "optvq-stream", "log-domain", "log-compiled", "previous", "original"):
        module.load_state_dict(reference)
    return module.to(device).train()


def make_input(num_rows: int, code_dim: int, device: torch.device) -> torch.Tensor:
    if num_rows % (HEADS * 256):
        raise ValueError(f"N must be a multiple of {HEADS * 256} (batch x 16 x 16 positions x {HEADS} heads)")
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(num_rows // (HEADS * 256), HEADS * code_dim, 16, 16, generator=generator)
    return z.to(device).requires_grad_(True)


def step(module: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """One training-mode forward + backward; returns the indices."""
    out = module(z)
    quantized, indices, loss = (out.quantized, out.indices, out.loss) if hasattr(out, "quantized") else out
    (loss.sum() + quantized.float().pow(2).mean()).backward()
    return indices


def clear_grads(module: nn.Module, z: torch.Tensor) -> None:
    z.grad = None
    module.zero_grad(set_to_none=True)


def estimated_peak_bytes(method: str, num_rows: int, num_codes: int) -> float:
    """Rough peak, to skip cases that cannot fit: in (N, K) float32 matrices, from the code of each method."""
    matrices = {
        "original": 4.5,
        "vq-pytorch": 4.0,
        "optvq": 1.1,
        "log-domain": 1.1,
        "log-compiled": 1.1,
        "previous": 1.1,
        "optvq-stream": 0.05,
        "nearest": 0.3,
    }[method]
    return matrices * num_rows * num_codes * 4


# ---------------------------------------------------------------------------------------------------------------------
# Timing (one process, methods interleaved)
# ---------------------------------------------------------------------------------------------------------------------
def timed(call, device: torch.device):
    """(seconds, result) of one call: CUDA events on a GPU, wall time on CPU."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        result = call()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / 1000, result
    begin = time.perf_counter()
    result = call()
    return time.perf_counter() - begin, result


def method_calls(methods, num_rows, num_codes, code_dim, device) -> dict:
    """One training-mode quantizer step per method (its gradients cleared first, untimed)."""
    calls = {}
    for method in methods:
        module, z = build(method, num_codes, code_dim, device), make_input(num_rows, code_dim, device)
        calls[method] = (lambda module=module, z=z: clear_grads(module, z), lambda module=module, z=z: step(module, z))
    return calls


def limit_calls(num_rows, num_codes, code_dim, device) -> dict:
    """The limit's parts: the GEMM of the distance shape into a preallocated matrix, and 10 streaming passes over it
    (matrix-vector products, one per half-step of 5 iterations). The matrix gets the page size the solver's kernel
    matrix gets, so that the two differ by their operations only."""
    import optvq_hf.assignment as assignment

    rows, codes = torch.randn(num_rows, code_dim, device=device), torch.randn(num_codes, code_dim, device=device)
    matrix, vector = torch.empty(num_rows, num_codes, device=device), torch.randn(num_codes, device=device)
    assignment._advise_huge_pages(matrix)
    matrix.zero_()
    norms = codes.pow(2).sum(1)
    return {
        "gemm": (None, lambda: torch.addmm(norms, rows, codes.T, alpha=-2, out=matrix)),
        "10 passes": (None, lambda: [torch.mv(matrix, vector) for _ in range(10)]),
    }


def assignment_calls(num_rows, num_codes, code_dim, device) -> dict:
    """The assignments alone (no quantizer around them, no backward) on the inputs of the quantizer step: the
    Sinkhorn solver materialised (with a quantizer's kernel workspace, and without: a new matrix every call) and
    streaming, and the nearest-code search."""
    import optvq_hf.assignment as assignment

    module = build("optvq", num_codes, code_dim, device)
    z = make_input(num_rows, code_dim, device).detach()
    rows = z.permute(0, 2, 3, 1).reshape(-1, code_dim).contiguous()
    codes = module.codebook(device).detach()
    settings = (module.epsilon, module.iterations, module.cost_normalization, module.chunk_size, False)
    return {
        "sinkhorn alone": (
            None,
            lambda: assignment.sinkhorn_codes(
                rows, codes, *settings, streaming=False, workspace=module.kernel_workspace
            ),
        ),
        "fresh memory alone": (None, lambda: assignment.sinkhorn_codes(rows, codes, *settings, streaming=False)),
        "stream alone": (None, lambda: assignment.sinkhorn_codes(rows, codes, *settings, streaming=True)),
        "nearest alone": (None, lambda: assignment.nearest_codes(rows, codes, module.chunk_size)),
    }


def time_round_robin(calls: dict, device, warmup, repeats, max_seconds):
    """Seconds of every call in every timed round, the calls alternated within each round, so that a change of
    the machine's speed (other processes on shared cores) reaches all of them alike, and ratios can be taken
    round by round; also each call's last result."""
    times = {name: [] for name in calls}
    results = {}
    started = time.perf_counter()
    for round_ in range(warmup + repeats):
        for name, (prepare, call) in calls.items():
            if prepare is not None:
                prepare()
            elapsed, results[name] = timed(call, device)
            if round_ >= warmup:
                times[name].append(elapsed)
        if round_ >= warmup + 2 and time.perf_counter() - started > max_seconds:
            break  # large sizes: at least 3 timed rounds, then stop at the time budget
    return times, results


def paired(times: dict, name: str, reference) -> str:
    """Median and range over the rounds of a call's time divided by `reference` (a per-round list)."""
    ratios = [value / base for value, base in zip(times[name], reference)]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def comparable_indices(method: str, indices: torch.Tensor) -> torch.Tensor:
    if method == "vq-pytorch":  # (B, H, W, heads)
        return indices.reshape(-1)
    if indices.ndim == 4:  # (B, heads, H, W) -> rows in position-major, heads-adjacent order
        return indices.permute(0, 2, 3, 1).reshape(-1)
    return indices.reshape(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------------
def forget_kernel_workspace(module: nn.Module) -> None:
    """The memory a call needs includes the kernel matrix that the quantizer keeps between calls on CPU."""
    if getattr(module, "kernel_workspace", None) is not None:
        module.kernel_workspace.clear()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE).group(1))


def cpu_peak_in_this_process(method, num_rows, num_codes, code_dim) -> int:
    """Peak resident bytes above the resident set before one call (run in a fresh process)."""
    device = torch.device("cpu")
    module, z = build(method, num_codes, code_dim, device), make_input(num_rows, code_dim, device)
    step(module, z)  # first call: library buffers, lazily created state
    clear_grads(module, z)
    forget_kernel_workspace(module)
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current resident set
    step(module, z)
    return (_status_kib("VmHWM") - before) * 1024


def cpu_peak(method, num_rows, num_codes, code_dim) -> int | None:
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [
        sys.executable,
        __file__,
        "--memory-case",
        method,
        str(num_rows),
        str(num_codes),
        str(code_dim),
        "--threads",
        str(torch.get_num_threads()),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        print(f"memory case {method} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def cuda_peak(method, num_rows, num_codes, code_dim, device) -> int:
    module, z = build(method, num_codes, code_dim, device), make_input(num_rows, code_dim, device)
    step(module, z)
    clear_grads(module, z)
    forget_kernel_workspace(module)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step(module, z)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - before
    del module, z
    gc.collect()
    torch.cuda.empty_cache()
    return peak


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def time_elementwise(device: torch.device, repeats: int) -> None:
    """Nanoseconds per entry of the solver's elementwise operations on one tile of the size it works on (1M
    entries; on CPU, cache-resident), against a copy: what each pass over the (N, K) kernel costs beyond memory."""
    import optvq_hf.assignment as assignment

    entries = assignment.CPU_TILE_ENTRIES if device.type == "cpu" else assignment.GPU_TILE_ENTRIES
    source = torch.rand(entries // 4096, 4096, device=device) * -80.0
    out, weights = torch.empty_like(source), torch.rand(4096, device=device)
    calls = {
        "copy": lambda: out.copy_(source),
        "exp": lambda: torch.exp(source, out=out),
        "exp2": lambda: torch.exp2(source, out=out),
        "sqrt (of -x)": lambda: torch.sqrt(torch.neg(source, out=out), out=out),
        "neg": lambda: torch.neg(source, out=out),
        "clamp": lambda: torch.clamp(source, min=-50.0, out=out),
        "mul by a row vector": lambda: torch.mul(source, weights, out=out),
        "matrix-vector product": lambda: torch.mv(source, weights),
    }
    times = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, call in calls.items():
            elapsed, _ = timed(call, device)
            if round_:
                times[name].append(elapsed)
    print(f"elementwise passes over a ({source.shape[0]}, 4096) float32 tile, ns per entry (median of {repeats}):")
    for name, values in times.items():
        print(f"  {name:<24} {statistics.median(values) / entries * 1e9:8.3f}")


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            processor = re.search(r"model name\s*:\s*(.*)", handle.read()).group(1)
    except (OSError, AttributeError):
        pass
    return (
        f"{processor}, {os.cpu_count()} cores, {torch.get_num_threads()} threads "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), torch {torch.__version__}"
    )


def ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def format_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:,.0f} MiB" if value < 2**30 else f"{value / 2**30:,.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="N,K,d triples (N rows, K codes, d dims)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + EXTRA_METHODS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per size, after 3 timed calls")
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="skip a case whose estimated peak exceeds this (default: 20 on CPU, the free GPU memory)",
    )
    parser.add_argument(
        "--previous-commit",
        default=DEFAULT_PREVIOUS_COMMIT,
        help="git revision whose optvq_hf/assignment.py the `previous` method runs",
    )
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument(
        "--elementwise", action="store_true", help="only time the solver's elementwise operations on one tile"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--busy-processes",
        type=int,
        default=0,
        help="start this many busy-looping processes for the run: the load of a shared machine",
    )
    parser.add_argument("--memory-case", nargs=4, metavar=("METHOD", "N", "K", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.memory_case:
        method, num_rows, num_codes, code_dim = args.memory_case
        peak = cpu_peak_in_this_process(method, int(num_rows), int(num_codes), int(code_dim))
        print(json.dumps({"peak_bytes": peak}))
        return

    if args.elementwise:
        print(f"machine: {describe_machine(torch.device(args.device))}")
        time_elementwise(torch.device(args.device), max(args.repeats, 21))
        return
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy_processes)]
    try:
        run(args)
    finally:
        for process in busy:
            process.kill()


def run(args) -> None:
    device = torch.device(args.device)
    methods = [m for m in args.methods if m != "vq-pytorch" or vq_pytorch_available()]
    if "vq-pytorch" in args.methods and "vq-pytorch" not in methods:
        print("vq-pytorch: vector_quantize_pytorch is not installed; skipped")
    if "previous" in methods:
        PreviousSinkhornQuantizer.solver = previous_solver(args.previous_commit)
        if PreviousSinkhornQuantizer.solver is None:
            print(f"previous: no git checkout holding {args.previous_commit}; skipped")
            methods.remove("previous")
    if args.max_memory_gb is not None:
        budget = args.max_memory_gb * 2**30
    elif device.type == "cuda":
        budget = 0.9 * torch.cuda.mem_get_info(device)[0]
    else:
        budget = 20 * 2**30
    print(
        f"machine: {describe_machine(device)}"
        + (f"; {args.busy_processes} busy processes beside it" if args.busy_processes else "")
    )
    print(
        f"training-mode forward + backward; {HEADS} heads; epsilon 10, 5 Sinkhorn iterations; time = median; "
        f"memory = peak above the inputs ({'max_memory_allocated' if device.type == 'cuda' else 'peak RSS'})"
    )
    header = (
        f"{'N':>6} {'K':>6} {'d':>3}  {'method':<13} {'time ms':>10} {'vs original':>11} {'vs nearest':>10} "
        f"{'peak memory':>12} {'mem vs orig':>11} {'same idx as optvq':>17}"
    )
    rows = []
    for size in args.sizes:
        num_rows, num_codes, code_dim = (int(value) for value in size.split(","))
        fitting = [m for m in methods if estimated_peak_bytes(m, num_rows, num_codes) <= budget]
        for method in sorted(set(methods) - set(fitting), key=methods.index):
            print(
                f"skipped {method} at N={num_rows} K={num_codes} d={code_dim}: estimated peak "
                f"{format_bytes(estimated_peak_bytes(method, num_rows, num_codes))} > budget {format_bytes(budget)}"
            )
        if not fitting:
            continue
        calls = method_calls(fitting, num_rows, num_codes, code_dim, device)
        calls.update(limit_calls(num_rows, num_codes, code_dim, device))
        calls.update(assignment_calls(num_rows, num_codes, code_dim, device))
        all_times, results = time_round_robin(calls, device, args.warmup, args.repeats, args.max_seconds)
        rounds = len(all_times["gemm"])
        times = {name: statistics.median(values) for name, values in all_times.items()}
        indices = {method: results[method].detach() for method in fitting}
        gemms = all_times["gemm"]
        limits = [gemm + passes for gemm, passes in zip(gemms, all_times["10 passes"])]
        limit = statistics.median(limits)
        solvers = [m for m in fitting if m.startswith(SOLVER_PREFIXES)]
        print(
            f"N={num_rows} K={num_codes} d={code_dim}: limit {limit * 1e3:.1f} ms = GEMM {times['gemm'] * 1e3:.1f} ms"
            f" + 10 passes over (N, K) (matrix-vector products) {times['10 passes'] * 1e3:.1f} ms; "
            "time / limit, median (range) of the rounds: "
            + ", ".join(f"{m} {paired(all_times, m, limits)}" for m in solvers)
        )
        print(
            f"  assignment alone (no quantizer, no backward): sinkhorn {times['sinkhorn alone'] * 1e3:.1f} ms = "
            f"{paired(all_times, 'sinkhorn alone', limits)} limit (a new matrix every call: "
            f"{times['fresh memory alone'] * 1e3:.1f} ms = {paired(all_times, 'fresh memory alone', limits)}), "
            f"streaming {times['stream alone'] * 1e3:.1f} ms = "
            f"{paired(all_times, 'stream alone', limits)} limit; nearest {times['nearest alone'] * 1e3:.1f} ms = "
            f"{paired(all_times, 'nearest alone', gemms)} GEMM"
        )
        peaks = {}
        if not args.no_memory:
            for method in fitting:
                peaks[method] = (
                    cuda_peak(method, num_rows, num_codes, code_dim, device)
                    if device.type == "cuda"
                    else cpu_peak(method, num_rows, num_codes, code_dim)
                )
        reference = comparable_indices("optvq", indices["optvq"]) if "optvq" in indices else None
        for method in fitting:
            same = "-"
            if reference is not None and method in COMPARED_WITH_OPTVQ:
                same = f"{(comparable_indices(method, indices[method]) == reference).float().mean().item():.4%}"
            rows.append(
                (
                    num_rows,
                    num_codes,
                    code_dim,
                    method,
                    times[method] * 1e3,
                    times[method] / times["original"] if "original" in times else math.nan,
                    times[method] / times["nearest"] if "nearest" in times else math.nan,
                    peaks.get(method),
                    peaks[method] / peaks["original"] if peaks.get(method) and peaks.get("original") else math.nan,
                    same,
                    rounds,
                )
            )
    print(header)
    for (
        num_rows,
        num_codes,
        code_dim,
        method,
        milliseconds,
        vs_original,
        vs_nearest,
        peak,
        memory_ratio,
        same,
        _calls,
    ) in rows:
        print(
            f"{num_rows:>6} {num_codes:>6} {code_dim:>3}  {method:<13} {milliseconds:>10.1f} {ratio(vs_original):>11} "
            f"{ratio(vs_nearest):>10} {format_bytes(peak):>12} {ratio(memory_ratio):>11} {same:>17}"
        )
    print(f"(median of {args.repeats} calls after {args.warmup} warm-up, fewer where --max-seconds cut a size short)")


if __name__ == "__main__":
    main()
