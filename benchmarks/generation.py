#!/usr/bin/env python
"""
Class-conditional generation of scikit-learn's digits (upsampled to 16x16) on OptVQ vs plain VQ tokens, 1 vs 4 heads,
flat (one token per step) vs position-level (all heads of a position per step) generators, CFG scale 1 vs the best of a
small sweep. Everything is trained here, on CPU, from scratch:

- tokenizers: `OptVQModel` with the small CNN backbone (factor 4: a 4x4 latent grid), 64 codes per head, embed_dim 16,
  trained `--tokenizer_steps` steps (Adam 1e-3, batch 64, MSE + quantizer loss) on the training split;
- generators: `optvq_hf.generation.TokenGenerator` (Llama, 2 layers x 64, ~0.1 M parameters), `--generator_steps`
  steps (AdamW 2e-3, batch 64, class dropout 0.1) on the tokens of the training split;
- metric: `optvq_hf.digits_metrics`: a CNN classifier trained on the training split; for 20 samples per class
  (200 images) its accuracy and digits-FD against the 360 held-out real digits; the floor is the FD of the training
  split's first 360 digits against the held-out ones, and (the FD grows as the set shrinks) of three disjoint sets of
  200 training digits, the samples' count.

Run: OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/generation.py --out docs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import get_cosine_schedule_with_warmup

from optvq_hf import OptVQConfig, OptVQModel
from optvq_hf.digits_metrics import class_accuracy, digits_fd, load_digits_images, train_digits_classifier
from optvq_hf.generation import TokenGenerator, TokenGeneratorConfig, indices_to_steps, sample_codes, steps_to_indices
from optvq_hf.metrics import codebook_usage, psnr
from optvq_hf.training.images import image_grid

CFG_SWEEP = (1.5, 2.0, 3.0)


def train_tokenizer(images, quantizer_type, heads, steps, seed):
    torch.manual_seed(seed)
    config = OptVQConfig(
        resolution=16,
        in_channels=1,
        out_channels=1,
        backbone="simple_cnn",
        base_channels=32,
        latent_channels=16,
        embed_dim=16,
        num_heads=heads,
        num_codes=64,
        quantizer_type=quantizer_type,
    )
    model = OptVQModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = images[torch.randint(0, images.shape[0], (64,), generator=generator)]
        out = model(batch)
        loss = torch.nn.functional.mse_loss(out.reconstruction, batch) + out.quantizer_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def tokenizer_stats(model, images):
    out = model(images)
    counts = torch.bincount(out.indices.flatten(), minlength=model.config.num_codes)
    quality = psnr((out.reconstruction.clamp(-1, 1) + 1) / 2, (images + 1) / 2, y_channel=False).mean()
    return out.indices, float(quality), float(codebook_usage(counts))


def train_generator(codes, labels, heads, steps, seed, val_codes, val_labels):
    torch.manual_seed(seed)
    config = TokenGeneratorConfig(
        num_codes=64,
        codes_per_step=codes.shape[2],
        num_steps=codes.shape[1],
        num_classes=10,
        class_dropout=0.1,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        heads_per_position=heads,
    )
    model = TokenGenerator(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05, betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, codes.shape[0], (64,), generator=generator)
        loss = model(codes[pick], labels[pick]).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        val = float(model(val_codes, val_labels).nats_per_position)
    return model, val, sum(p.numel() for p in model.parameters())


def generate(generator, tokenizer, cfg_scale, per_class, seed, heads, side):
    labels = torch.arange(10).repeat_interleave(per_class)
    rng = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    codes = sample_codes(generator, labels, cfg_scale=cfg_scale, temperature=1.0, generator=rng)
    with torch.no_grad():
        images = tokenizer.decode_indices(steps_to_indices(codes, heads, (side, side))).sample.clamp(-1, 1)
    return images, labels, (time.perf_counter() - start) / labels.numel()


def save_grid(images, path, per_class, scale=3, pad=2):
    """One row per class (the first 10 samples of each), cells separated by `pad` grey pixels."""
    columns = min(10, per_class)
    chosen = torch.cat([images[row * per_class : row * per_class + columns] for row in range(10)])
    image_grid(chosen, columns, pad=pad, scale=scale).save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer_steps", type=int, default=800)
    parser.add_argument("--generator_steps", type=int, default=600)
    parser.add_argument("--per_class", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    images, labels = load_digits_images(16)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    test, train = order[:360], order[360:]
    classifier = train_digits_classifier(images[train], labels[train], steps=400)
    held_acc = class_accuracy(classifier, images[test], labels[test])
    floor = digits_fd(classifier, images[train[:360]], images[test])
    # the FD of a finite set is biased upwards: the floor at the sample count (10 * per_class real digits)
    count = 10 * args.per_class
    floors = [digits_fd(classifier, images[train[k * count : (k + 1) * count]], images[test]) for k in range(3)]
    print(
        f"classifier held-out accuracy {held_acc:.3f}; digits-FD floor (real train vs real held-out): 360 images "
        f"{floor:.2f}, {count} images {statistics.mean(floors):.2f} ± {statistics.stdev(floors):.2f} (3 splits)"
    )

    rows = []
    side = 4
    for quantizer_type in ("optvq", "vq"):
        for heads in (4, 1):
            tokenizer = train_tokenizer(images[train], quantizer_type, heads, args.tokenizer_steps, seed=0)
            train_idx, _, _ = tokenizer_stats(tokenizer, images[train])
            val_idx, val_psnr, usage = tokenizer_stats(tokenizer, images[test])
            modes = ("position", "flat") if heads > 1 else ("position",)
            for mode in modes:
                per_step = heads if mode == "position" else 1
                headline = heads == 4 and mode == "position"
                seeds = range(args.seeds if headline else 1)
                results = {"cfg1": [], "best": []}
                for seed in seeds:
                    codes = indices_to_steps(train_idx, per_step)
                    val_codes = indices_to_steps(val_idx, per_step)
                    t0 = time.perf_counter()
                    gen, val_loss, params = train_generator(
                        codes, labels[train], heads, args.generator_steps, seed, val_codes, labels[test]
                    )
                    train_s = time.perf_counter() - t0
                    sweep = {}
                    for scale in (1.0, *CFG_SWEEP):
                        samples, sample_labels, per_image = generate(
                            gen, tokenizer, scale, args.per_class, 100 + seed, heads, side
                        )
                        sweep[scale] = (
                            class_accuracy(classifier, samples, sample_labels),
                            digits_fd(classifier, samples, images[test]),
                            per_image,
                            samples,
                        )
                    best = min(CFG_SWEEP, key=lambda s: sweep[s][1])
                    for key, scale in (("cfg1", 1.0), ("best", best)):
                        acc, fd, per_image, samples = sweep[scale]
                        results[key].append(dict(scale=scale, acc=acc, fd=fd, ms=1000 * per_image, val=val_loss))
                        if seed == 0 and heads == 4 and mode == "position" or seed == 0 and heads == 1:
                            name = f"gen_{quantizer_type}_{heads}h_{mode}_{key}.png"
                            save_grid(samples, out / name, args.per_class)
                    print(
                        f"{quantizer_type} {heads}h {mode} seed {seed}: val {val_loss:.3f} nats/pos, "
                        f"{params} params, train {train_s:.0f}s, sweep "
                        + ", ".join(f"{s}: acc {v[0]:.2f} FD {v[1]:.1f}" for s, v in sweep.items()),
                        flush=True,
                    )
                for key in ("cfg1", "best"):
                    rows.append(
                        dict(
                            tokenizer=quantizer_type,
                            heads=heads,
                            mode=mode,
                            steps=side * side * (1 if mode == "position" else heads),
                            cfg=key,
                            psnr=val_psnr,
                            usage=usage,
                            runs=results[key],
                        )
                    )

    def cell(values, fmt):
        if len(values) == 1:
            return format(values[0], fmt)
        return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"

    lines = [
        "| tokenizer | heads | generator (steps/image) | CFG | PSNR (dB) | usage | val nats/position | class acc |"
        " digits-FD | ms/image | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        runs = row["runs"]
        scales = sorted({r["scale"] for r in runs})
        lines.append(
            f"| {row['tokenizer']} | {row['heads']} | {row['mode']} ({row['steps']}) | "
            f"{'/'.join(format(s, 'g') for s in scales)} | {row['psnr']:.2f} | {row['usage']:.2f} | "
            f"{cell([r['val'] for r in runs], '.3f')} | {cell([r['acc'] for r in runs], '.2f')} | "
            f"{cell([r['fd'] for r in runs], '.1f')} | {cell([r['ms'] for r in runs], '.2f')} | {len(runs)} |"
        )
    table = "\n".join(lines)
    print(
        f"\nclassifier held-out accuracy {held_acc:.3f}; digits-FD floor {floor:.2f} (360 real), "
        f"{statistics.mean(floors):.2f} ± {statistics.stdev(floors):.2f} ({count} real, the samples' count)\n"
    )
    print(table)
    print(f"\ntotal {time.perf_counter() - began:.0f}s")
    (out / "generation_benchmark.json").write_text(
        json.dumps(
            dict(
                classifier_accuracy=held_acc,
                fd_floor=floor,
                fd_floor_at_sample_count=floors,
                rows=rows,
                args=vars(args),
            ),
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
