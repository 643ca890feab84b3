"""The multi-process guard: refuse to train when a launcher started several processes that did not form one
distributed group (each would train alone and overwrite the others' checkpoints)."""

from __future__ import annotations

import os
from collections.abc import Mapping

# Variables through which launchers (torchrun / accelerate, Open MPI, Intel MPI / MPICH, MVAPICH) announce a world
# size.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")

LAUNCH_HELP = """How to launch:
  one process (CPU or one GPU):  accelerate launch --num_processes 1 examples/train.py ...
  8 GPUs of one machine:         accelerate launch --multi_gpu --num_processes 8 examples/train.py ...
  2 nodes of 8 GPUs (on each):   accelerate launch --multi_gpu --num_machines 2 --num_processes 16 \\
                                   --machine_rank <0 or 1> --main_process_ip <node 0> --main_process_port 29500 \\
                                   examples/train.py ...
  2 processes on CPU (testing):  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \\
                                   examples/train.py ...
(`torchrun --nproc_per_node N examples/train.py ...` works too.)"""


def launched_world_size(environ: Mapping[str, str] | None = None) -> int:
    """The number of processes the launcher says it started (1 when no launcher variable is set)."""
    environ = os.environ if environ is None else environ
    for name in WORLD_SIZE_VARIABLES:
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def check_process_group(num_processes: int, environ: Mapping[str, str] | None = None) -> None:
    """Raise a `RuntimeError` when the launcher started several processes that did not form one distributed group.

    This happens, e.g., with `accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: each
    process falls back to a single-process run, and all of them would train the same model independently and
    overwrite each other's checkpoints. `num_processes` is what the training framework sees
    (`accelerator.num_processes`).
    """
    launched = launched_world_size(environ)
    if launched != num_processes:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but they did not form one distributed "
            f"group: this process sees {num_processes} process(es). Each would train on its own and overwrite the "
            f"others' checkpoints. Typical causes: a multi-GPU launch on a machine where no GPU is visible (for CPU "
            f"processes set ACCELERATE_USE_CPU=true), or a launcher mixing torchrun and accelerate settings.\n"
            + LAUNCH_HELP
        )
