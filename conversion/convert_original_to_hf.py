#!/usr/bin/env python
"""Convert an original OptVQ checkpoint into an optvq-hf folder: see `python conversion/convert_original_to_hf.py
--help`. The code lives in `optvq_hf.conversion` (also `python -m optvq_hf.conversion` after a wheel install)."""

import sys

from optvq_hf.conversion.convert import main

if __name__ == "__main__":
    sys.exit(main())
