"""The fuzzing harness of benchmarks/fuzz.py with a small budget: each public entry point returns a checked result
(finite, right shape, tokens round-trip) or raises ValueError/TypeError with a message."""

import collections
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz.py"
_spec = importlib.util.spec_from_file_location("optvq_fuzz", _PATH)
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


@pytest.mark.parametrize("kind", list(fuzz.CASES))
def test_fuzz(kind):
    counts = collections.Counter()
    fuzz.fuzz(kind, 25, counts)
    assert sum(counts.values()) >= 25
