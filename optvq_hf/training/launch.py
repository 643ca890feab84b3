"""The multi-process guard: refuse to train when a launcher started several processes that did not form one
distributed group (each would train alone and overwrite the others' checkpoints)."""

from __future__ import annotations

import os
import signal
import sys
import threading
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


class StopRequest:
    """SIGTERM / SIGINT (what cluster schedulers send before they stop a job) as a request to stop after the current
    step: the handler only records the signal; the loop asks `requested()` once per step, which agrees over all
    processes (a signal that reached one process stops all of them at the same step), then writes a checkpoint and
    exits. A second SIGINT interrupts at once (Ctrl-C twice)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be installed there
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, accelerator) -> bool:
        """Whether any process received a stop signal (a collective when there are several processes)."""
        import torch

        if accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor([0.0 if self.signum is None else 1.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="max").item())

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process it stopped (SIGTERM if another process got it)."""
        return 128 + int(self.signum or signal.SIGTERM)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def stop_with_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """Under `accelerate launch` (or torchrun), ask the kernel to send this process SIGTERM when its launcher dies.

    `accelerate launch` with one process runs the script with `subprocess.Popen(...).wait()` and forwards no signal:
    SIGTERM to the launcher would stop the launcher alone and leave the trainer running as an orphan. With the
    parent-death signal the trainer receives SIGTERM instead, finishes its step, checkpoints and exits. (torchrun,
    used by `accelerate launch --multi_gpu`, forwards SIGTERM to its workers itself.) Linux only; returns whether it
    was set."""
    environ = os.environ if environ is None else environ
    launched = "LOCAL_RANK" in environ or any(name.startswith("ACCELERATE_") for name in environ)
    if not launched or not sys.platform.startswith("linux"):
        return False
    import ctypes

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getppid()
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True
