"""Cost of the eager-only input value checks (NaN/Inf and range of pixel_values) against an eager encode.

    python benchmarks/input_checks.py [--batch 1] [--repeats 3]

Prints a table: the time of `OptVQModel._check_pixel_values` (shape, dtype and value checks) and of one eager
`encode`, on the default (ImageNet 256x256) config, and the ratio. The issue's bar: at most 1%.
"""

import argparse
import time

import torch

from optvq_hf import OptVQConfig, OptVQModel


def best_of(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="images per encode")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (best is reported)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = OptVQModel(OptVQConfig()).eval()
    pixel_values = torch.rand(args.batch, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        model.encode(pixel_values)  # warm-up
        encode = best_of(lambda: model.encode(pixel_values), args.repeats)
        check = best_of(lambda: model._check_pixel_values(pixel_values), max(args.repeats, 20))
    print("| threads | batch | eager encode (ms) | input checks (ms) | share |")
    print("|---|---|---|---|---|")
    print(
        f"| {torch.get_num_threads()} | {args.batch} | {encode * 1e3:.1f} | {check * 1e3:.3f} | "
        f"{100 * check / encode:.3f}% |"
    )


if __name__ == "__main__":
    main()
