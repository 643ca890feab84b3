"""How much the data path of examples/tokenize_dataset.py costs: the whole pipeline (read JPEGs, decode, resize, crop
in DataLoader workers, encode, write Arrow shards) against the model's own eval-mode encode of the same images
already preprocessed in memory.

    python benchmarks/tokenization.py                       # tiny and default config, CPU (or the GPU if present)
    python benchmarks/tokenization.py --configs tiny --images 512 --workers 0 1 2
    python benchmarks/tokenization.py --configs tiny --breakdown       # also where the time goes, batch by batch

(Not named `tokenize.py`: in this folder that name would shadow the standard library's `tokenize` module for every
benchmark run as a script, and torch would fail to import.)

Prints one row per (config, workers): images/s of each (best of --repeats alternated rounds) and the ratio
pipeline / model-only, each round's pipeline against the model-only run just before it: the median of the rounds
and their range (target >= 90%). Both run in this process with the same torch threads (printed): set
OMP_NUM_THREADS to choose them; the default workers follow `token_data.default_num_workers` for these threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import PIL.Image
import torch

from optvq_hf import OptVQConfig, OptVQModel
from optvq_hf.image_processing_optvq import OptVQImageProcessor
from optvq_hf.training import token_data

TINY = dict(
    resolution=32,
    base_channels=32,
    channel_multipliers=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(),
    latent_channels=32,
    embed_dim=32,
    num_heads=4,
    num_codes=64,
)
CONFIGS = {"tiny": TINY, "default": {}}
# Enough images that the run's fixed costs (starting and stopping the workers, about 0.1 s; on a GPU also the
# first batches' kernel selection) do not dominate: the steady state of a real dataset's run.
DEFAULT_IMAGES = {"cpu": {"tiny": 8192, "default": 16}, "cuda": {"tiny": 16384, "default": 1024}}


def make_images(folder: str, count: int, resolution: int) -> None:
    rng = np.random.default_rng(0)
    side = int(resolution * 1.25)  # larger than the resolution: the resize and crop do work
    for i in range(count):
        smooth = rng.integers(0, 256, (side // 8 + 1, side // 8 + 1, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(smooth).resize((side + 7, side), PIL.Image.Resampling.BILINEAR)
        image.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def preprocessed(processor, rows, device) -> torch.Tensor:
    """The pixel values of all the rows, by the image processor, on the device."""
    return torch.cat(
        [processor(token_data.to_pil(rows[i]["image"], f"row {i}"))["pixel_values"] for i in range(len(rows))]
    ).to(device)


def model_only(model, pixels, batch_size, device) -> float:
    """images/s of eval-mode encoding of already preprocessed images (after one warm-up batch)."""
    autocast = device.type == "cuda"
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
        model.encode(pixels[:batch_size])
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for first in range(0, len(pixels), batch_size):
            model.encode(pixels[first : first + batch_size]).indices.cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return len(pixels) / (time.perf_counter() - start)


def pipeline(model, processor, rows, batch_size, workers, device, folder) -> float:
    layout = model.token_layout()
    start = time.perf_counter()
    token_data.write_shards(
        model,
        layout,
        processor,
        rows,
        len(rows),
        folder,
        image_column="image",
        batch_size=batch_size,
        num_workers=workers,
        device=device,
        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
        progress=False,
    )
    return len(rows) / (time.perf_counter() - start)


def breakdown(model, processor, rows, pixels, batch_size) -> dict[str, float]:
    """Median ms per image, batch by batch in this process (0 workers): the encode of an already preprocessed batch
    right after another encode, the data path of the next batch (Arrow read, decode, preprocess: one DataLoader
    item of the pipeline), then the encode of that batch right after it. Alternating batch by batch makes the
    comparison immune to the load changes of a shared machine and shows whether the data path slows the encode."""
    batches = [(0, False, range(i, min(len(rows), i + batch_size)), None) for i in range(0, len(rows), batch_size)]
    items = token_data.RowBatches(rows, batches, "image", None, processor, [0], False, "the benchmark images")
    times = {"encode after encode": [], "data path": [], "encode after the data path": []}
    with torch.no_grad():
        for k, (_, _, indices, _) in enumerate(batches):
            begin = time.perf_counter()
            model.encode(pixels[indices.start : indices.stop]).indices.cpu()
            encoded = time.perf_counter()
            item = items[k]
            prepared = time.perf_counter()
            model.encode(item.pixels.to(pixels.device)).indices.cpu()
            end = time.perf_counter()
            for name, seconds in zip(times, (encoded - begin, prepared - encoded, end - prepared)):
                times[name].append(1e3 * seconds / len(indices))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "default"], choices=sorted(CONFIGS))
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="images per config (default: 8192 tiny and 16 default on CPU, 16384 and 1024 on a GPU)",
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--workers", type=int, nargs="+", default=None, help="DataLoader workers (default: the script's default)"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also where the time goes, batch by batch (0 workers, CPU)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="alternated rounds (model-only, then each pipeline)")
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default_workers = token_data.default_num_workers(device=device)
    if args.workers is None:
        args.workers = [default_workers]
    print(f"device {device}, torch threads {torch.get_num_threads()}, default workers {default_workers}")
    print(
        "| config | images | workers | model-only img/s (best) | pipeline img/s (best) | pipeline / model"
        " (median, range) |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        count = args.images or DEFAULT_IMAGES[device.type][name]
        torch.manual_seed(0)
        model = OptVQModel(OptVQConfig(**CONFIGS[name])).to(device).eval()
        processor = OptVQImageProcessor.from_model_config(model.config)
        with tempfile.TemporaryDirectory() as tmp:
            images = os.path.join(tmp, "images")
            os.makedirs(images)
            make_images(images, count, model.config.resolution)
            rows = datasets.load_dataset("imagefolder", data_dir=images, split="train")
            rows = rows.cast_column("image", datasets.Image(decode=False))
            batch = min(args.batch_size, count)
            pixels = preprocessed(processor, rows, device)
            # Alternated rounds: on a shared machine the load changes between measurements, so each round's
            # pipeline is compared with the model-only run just before it, and the median of these ratios is kept.
            reference, rates = 0.0, dict.fromkeys(args.workers, 0.0)
            ratios = {workers: [] for workers in args.workers}
            for repeat in range(args.repeats):
                model_rate = model_only(model, pixels, batch, device)
                reference = max(reference, model_rate)
                for workers in args.workers:
                    out = os.path.join(tmp, f"out{workers}-{repeat}")
                    rate = pipeline(model, processor, rows, batch, workers, device, out)
                    rates[workers] = max(rates[workers], rate)
                    ratios[workers].append(rate / model_rate)
            for workers, rate in rates.items():
                low, mid, high = min(ratios[workers]), statistics.median(ratios[workers]), max(ratios[workers])
                print(
                    f"| {name} | {count} | {workers} | {reference:.2f} | {rate:.2f} | {100 * mid:.0f}% "
                    f"({100 * low:.0f}-{100 * high:.0f}%) |"
                )
            if args.breakdown:
                parts = breakdown(model, processor, rows, pixels, batch)
                bound = parts["encode after encode"] / (parts["encode after encode"] + parts["data path"])
                print(
                    f"  {name}, median ms/image: "
                    + ", ".join(f"{part} {value:.3f}" for part, value in parts.items())
                    + f"; data path in turn with the encode: at most {100 * bound:.0f}%"
                )


if __name__ == "__main__":
    main()
