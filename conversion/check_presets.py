#!/usr/bin/env python
"""
Check the conversion of the released architectures without their weights: random weights in the original layout of
each preset (original names and shapes, from the original constructors) are mapped into `OptVQModel` and compared
with the original network written from its formulas. Prints one table per preset.

    OMP_NUM_THREADS=1 python conversion/check_presets.py --image_size 256 --batch_size 2    # minutes on a CPU
    python conversion/check_presets.py --image_size 32 --batch_size 1                       # seconds

The released weights themselves convert with `convert_original_to_hf.py --verify`, which runs the same comparisons.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from optvq_hf.conversion.convert import build_model
from optvq_hf.conversion.original_checkpoint import split_and_check
from optvq_hf.conversion.original_config import PRESETS, spec_from_preset
from optvq_hf.conversion.original_reference import original_parameter_shapes, random_original_state_dict
from optvq_hf.conversion.verification import verify_conversion


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=sorted(PRESETS), choices=sorted(PRESETS))
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    passed = True
    for name in args.presets:
        start = time.perf_counter()
        spec = spec_from_preset(name)
        weights = split_and_check(random_original_state_dict(spec, args.seed), spec, f"random weights ({name})")
        model = build_model(spec, weights, "nearest")
        original_count = sum(torch.Size(s).numel() for s in original_parameter_shapes(spec).values())
        report = verify_conversion(
            model,
            spec,
            weights.model,
            batch_size=args.batch_size,
            image_size=args.image_size,
            tolerance=args.tolerance,
            seed=args.seed,
        )
        print(f"## {name} ({PRESETS[name][1]})\n")
        print(
            f"parameters: OptVQModel {model.num_parameters():,}, original constructor {original_count:,}, "
            f"expected {PRESETS[name][2]:,}; original weights mapped: {len(weights.model)}\n"
        )
        print(report.table())
        print(f"\n({time.perf_counter() - start:.1f} s)\n")
        passed &= report.passed and model.num_parameters() == original_count == PRESETS[name][2]
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
