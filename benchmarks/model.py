"""Throughput (images/s) and peak memory of OptVQModel: encode, decode and a full training step (forward + backward).

Each configuration runs with diffusers' default attention (`AttnProcessor2_0`, PyTorch's fused
scaled_dot_product_attention) and with plain attention (`AttnProcessor`: explicit softmax(QK^T)V, as the original
OptVQ computes it), same weights, the two models called in turn. Options: channels-last memory format, bfloat16
autocast, `torch.compile` of the encoder and decoder (the quantizer always runs eagerly in float32).

    python benchmarks/model.py                                  # CPU: small batches; CUDA when available: batch 32
    python benchmarks/model.py --configs small --batch 8 --repeats 5
    python benchmarks/model.py --device cuda --batch 32 --bf16 --channels_last
    python benchmarks/model.py --device cuda --batch 32 --compile
    python benchmarks/model.py --step-ratio --configs small default --batch 2   # optvq vs vq training step

`--step-ratio` times the training step (forward, L1 + L2 + quantizer loss, backward, AdamW step) of the same
model and batch with `quantizer_type="optvq"` (Sinkhorn assignment) and `"vq"` (nearest code), interleaved call by
call, and prints step(optvq) / step(vq). The perceptual (LPIPS) term is left out: its weights are a download; the
GAN is left out as the issue asks.

Configurations: `default` is `OptVQConfig()` (256x256 images, 16x16x4 tokens, 16384 codes, 73 M parameters);
`small` is a 64x64 model (8x8x4 tokens, 1024 codes). Phases: `encode` and `decode` in eval mode without gradients
(nearest-code assignment), `train` = training-mode forward + L1 reconstruction loss + quantizer loss + backward
(Sinkhorn assignment over the batch). Time: median of `--repeats` calls after `--warmup` calls (CUDA events on GPU),
the two attention variants interleaved call by call.
Memory: peak above what was allocated before the call: `torch.cuda.max_memory_allocated` on GPU; on CPU the peak
resident set (Linux /proc/self/clear_refs + VmHWM, with glibc told to return freed memory at once; the script re-runs
itself with those settings).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import re
import statistics
import sys
import time

# libgomp's threads spin while they wait for each other; where other processes compete for the cores, a spinning
# thread holds a core that a descheduled one needs, and every parallel operation then costs milliseconds.
# Passive waiting, unless the caller chose otherwise (OMP_WAIT_POLICY=ACTIVE is libgomp's default).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from optvq_hf import OptVQConfig, OptVQModel

CONFIGS = {
    "default": {},
    "small": dict(
        resolution=64,
        base_channels=32,
        channel_multipliers=(1, 2, 2, 4),
        num_res_blocks=1,
        attn_resolutions=(8,),
        latent_channels=64,
        embed_dim=64,
        num_heads=4,
        num_codes=1024,
    ),
}
PHASES = ("encode", "decode", "train")
_MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
# glibc (2.35 and later) advising transparent huge pages for the memory it maps: a large activation then costs one
# page fault per 2 MiB instead of one per 4 KiB.
_HUGE_PAGES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def set_attention(model: OptVQModel, plain: bool) -> int:
    """Give every attention layer the plain or the fused (SDPA) processor; returns how many layers there are."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    layers = [module for module in model.modules() if isinstance(module, Attention)]
    for layer in layers:
        layer.set_processor(AttnProcessor() if plain else AttnProcessor2_0())
    return len(layers)


def build_model(config_name: str, plain_attention: bool, args, device: torch.device) -> OptVQModel:
    torch.manual_seed(0)
    model = OptVQModel(OptVQConfig(**CONFIGS[config_name])).to(device)
    set_attention(model, plain_attention)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model.encoder = torch.compile(model.encoder)
        model.decoder = torch.compile(model.decoder)
    return model


def phase_call(phase: str, model: OptVQModel, images: torch.Tensor, quantized: torch.Tensor, args):
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    if phase == "train":
        model.train()
        model.zero_grad(set_to_none=True)
        with autocast:
            out = model(images)
            loss = (out.reconstruction.float() - images).abs().mean() + out.quantizer_loss
        loss.backward()
        return
    model.eval()
    with torch.no_grad(), autocast:
        if phase == "encode":
            model.encode(images)
        else:
            model.decode(quantized)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE).group(1))


def timed_call(phase, model, images, quantized, args, device, measure_memory: bool):
    """(seconds, peak bytes above the memory in use before the call, or None)."""
    model.zero_grad(set_to_none=True)
    peak = None
    if measure_memory:
        gc.collect()
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        if measure_memory:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        begin.record()
        phase_call(phase, model, images, quantized, args)
        end.record()
        torch.cuda.synchronize()
        if measure_memory:
            peak = torch.cuda.max_memory_allocated(device) - before
        return begin.elapsed_time(end) / 1000, peak
    measure_memory = measure_memory and sys.platform.startswith("linux")
    if measure_memory:
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # VmHWM := VmRSS
    begin = time.perf_counter()
    phase_call(phase, model, images, quantized, args)
    seconds = time.perf_counter() - begin
    if measure_memory:
        peak = (_status_kib("VmHWM") - before) * 1024
    return seconds, peak


def measure(phase, models, images, quantized, args, device):
    """Per attention variant: (median seconds, peak bytes of the last call). The variants are interleaved call by
    call, so that the load of other processes falls on both alike."""
    for attention, model in models.items():
        for _ in range(args.warmup):
            phase_call(phase, model, images, quantized[attention], args)
    times = {attention: [] for attention in models}
    peaks = {}
    for repeat in range(args.repeats):
        for attention, model in models.items():
            seconds, peak = timed_call(
                phase, model, images, quantized[attention], args, device, measure_memory=repeat == args.repeats - 1
            )
            times[attention].append(seconds)
            peaks[attention] = peak
    for model in models.values():
        model.zero_grad(set_to_none=True)
    return {attention: (statistics.median(times[attention]), peaks[attention]) for attention in models}


def format_bytes(value) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:,.0f} MiB" if value < 2**30 else f"{value / 2**30:,.2f} GiB"


def step_ratio(args, device: torch.device) -> None:
    """Training step with quantizer_type "optvq" against "vq": same weights, same batch, interleaved."""
    for config_name in args.configs:
        batch = args.batch or (8 if device.type == "cuda" else (1 if config_name == "default" else 8))
        models, optimizers, weights = {}, {}, None
        # Compiled whole, the quantizer included: its Sinkhorn solver runs eagerly at a graph break (the default),
        # and, for comparison, traced into the graph (`solver_in_graph`: the log-domain solver).
        variants = ("optvq", "optvq-in-graph", "vq") if args.compile else ("optvq", "vq")
        variants = tuple(variant for variant in variants if variant in args.variants or variant == "vq")
        for variant in variants:
            torch.manual_seed(0)
            quantizer_type = variant.removesuffix("-in-graph")
            model = OptVQModel(OptVQConfig(**CONFIGS[config_name], quantizer_type=quantizer_type)).to(device).train()
            if weights is None:
                weights = model.state_dict()
            model.load_state_dict(weights)
            if quantizer_type == "optvq":
                model.quantizer.solver_in_graph = variant.endswith("-in-graph")
            models[variant] = torch.compile(model) if args.compile else model
            optimizers[variant] = torch.optim.AdamW(model.parameters(), lr=1e-4)
        size = OptVQConfig(**CONFIGS[config_name]).resolution
        images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        times = {name: [] for name in models}
        for call in range(args.warmup + args.repeats):
            for name, model in models.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                begin = time.perf_counter()
                with autocast:
                    out = model(images)
                    error = out.reconstruction.float() - images
                    loss = error.abs().mean() + error.pow(2).mean() + out.quantizer_loss
                loss.backward()
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if call >= args.warmup:
                    times[name].append(time.perf_counter() - begin)
        vq = statistics.median(times["vq"])
        for name in variants[:-1]:
            optvq = statistics.median(times[name])
            # each round's optvq step over the vq step right after it: the machine's drift cancels
            paired = [a / b for a, b in zip(times[name], times["vq"])]
            print(
                f"{config_name:<8} batch {batch:>3} {'compiled' if args.compile else 'eager':<8} "
                f"{'bf16' if args.bf16 else 'fp32'}: step {name} {optvq * 1e3:9.1f} ms, vq {vq * 1e3:9.1f} ms, "
                f"ratio {optvq / vq:.3f} (medians of {args.repeats}); per round {statistics.median(paired):.3f} "
                f"(median; range {min(paired):.3f}-{max(paired):.3f})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="images per call (default: 32 on CUDA; CPU: 1 for the default config, 8 for the small one)",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (the quantizer stays float32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder and the decoder")
    parser.add_argument("--attention", nargs="+", default=["sdpa", "plain"], choices=["sdpa", "plain"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--step-ratio", action="store_true", help="training step, quantizer_type optvq against vq")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["optvq", "optvq-in-graph"],
        choices=["optvq", "optvq-in-graph"],
        help="--step-ratio: the optvq models timed against vq (optvq-in-graph: with --compile only; one model fewer "
        "where memory is short)",
    )
    parser.add_argument(
        "--glibc",
        default="measure",
        choices=["measure", "default", "hugepages"],
        help="CPU allocator settings the script re-runs itself with: `measure` returns freed memory at once (exact "
        "peaks; every large allocation page-faults anew), `default` leaves glibc's defaults (what a user gets), "
        "`hugepages` sets GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (the peaks include memory glibc keeps)",
    )
    args = parser.parse_args()
    if args.compile and args.warmup < 2:
        args.warmup = 2  # the first calls compile
    device = torch.device(args.device)
    wanted = {"measure": _MALLOC_SETTINGS, "hugepages": _HUGE_PAGES, "default": {}}[args.glibc]
    if (
        device.type == "cpu"
        and sys.platform.startswith("linux")
        and any(os.environ.get(k) != v for k, v in wanted.items())
    ):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})
    if args.threads:
        torch.set_num_threads(args.threads)

    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), glibc allocator: {args.glibc}"
    )
    options = [name for name in ("channels_last", "bf16", "compile") if getattr(args, name)] or ["fp32"]
    print(f"machine: {machine}; torch {torch.__version__}; options: {', '.join(options)}")
    if args.step_ratio:
        step_ratio(args, device)
        return
    print(
        f"{'config':<8} {'attention':<9} {'phase':<7} {'batch':>5} {'ms/call':>9} {'images/s':>9} "
        f"{'vs plain':>8} {'peak memory':>12}"
    )
    for config_name in args.configs:
        batch = args.batch or (32 if device.type == "cuda" else (1 if config_name == "default" else 8))
        config = OptVQConfig(**CONFIGS[config_name])
        generator = torch.Generator().manual_seed(0)
        images = (torch.rand(batch, 3, config.resolution, config.resolution, generator=generator) * 2 - 1).to(device)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        models = {
            attention: build_model(config_name, attention == "plain", args, device) for attention in args.attention
        }
        with torch.no_grad():
            quantized = {attention: model.eval().encode(images).quantized for attention, model in models.items()}
        results = {}
        for phase in args.phases:
            for attention, result in measure(phase, models, images, quantized, args, device).items():
                results[attention, phase] = result
        del models, quantized
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for attention in args.attention:
            for phase in args.phases:
                seconds, peak = results[attention, phase]
                plain = results.get(("plain", phase))
                speedup = f"{plain[0] / seconds:.2f}x" if plain else "-"
                print(
                    f"{config_name:<8} {attention:<9} {phase:<7} {batch:>5} {seconds * 1e3:>9.1f} "
                    f"{batch / seconds:>9.2f} {speedup:>8} {format_bytes(peak):>12}"
                )


if __name__ == "__main__":
    main()
