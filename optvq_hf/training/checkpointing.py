"""Atomic training checkpoints: `accelerator.save_state` written into a temporary folder and renamed when complete,
so that a crash while saving never leaves a half-written `checkpoint-<step>` behind; `latest` finds the newest
complete one."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-checkpoint-"
# Written last into a checkpoint (after every process has written its files): a folder without it is incomplete.
STATE_FILENAME = "training_state.json"
PROCESS_STATE_PATTERN = "process_state_{}.json"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a `checkpoint-<step>` folder name, else None."""
    match = re.fullmatch(rf"{re.escape(CHECKPOINT_PREFIX)}(\d+)", os.path.basename(os.fspath(path).rstrip("/")))
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, STATE_FILENAME))


def list_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Complete `checkpoint-<step>` folders of `output_dir`, oldest first (temporary and incomplete ones skipped)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        step = checkpoint_step(name)
        if step is not None and os.path.isdir(path) and is_complete_checkpoint(path):
            found.append((step, path))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete checkpoint of `output_dir` with the highest step, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> str | None:
    """The folder to resume from: `"latest"` (None when there is no complete checkpoint yet), or a path (a
    `ValueError` unless it is a complete checkpoint)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return find_latest_checkpoint(output_dir)
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    if not os.path.isdir(path) or not is_complete_checkpoint(path):
        raise ValueError(
            f"resume_from_checkpoint {resume_from_checkpoint!r} is not a complete checkpoint folder (one written by "
            f"this script holds {STATE_FILENAME}); use 'latest' to pick the newest complete checkpoint of output_dir"
        )
    return path


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    state: Mapping[str, Any],
    process_state: Mapping[str, Any] | None = None,
) -> str:
    """`accelerator.save_state` into `output_dir/checkpoint-<step>`, atomically. Every process must call it.

    The state is written into `.tmp-checkpoint-<step>`; each process adds `process_state_<rank>.json`
    (`process_state`, e.g. its data position); the main process writes `state` as `training_state.json` last and
    renames the folder. A crash at any point leaves either the previous checkpoints only, or the new one complete.
    On nodes without a shared filesystem, each node's local main process renames its own copy.
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    temporary = os.path.join(output_dir, f"{TEMPORARY_PREFIX}{step}")
    if accelerator.is_local_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left over by a crash during an earlier save of this step
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(temporary)
        with open(os.path.join(temporary, PROCESS_STATE_PATTERN.format(accelerator.process_index)), "w") as handle:
            json.dump(dict(process_state or {}), handle)
        if accelerator.is_local_main_process:
            _ordinary_permissions(temporary)
    except OSError as error:
        # A full disk: drop the partial folder (the previous checkpoints stay untouched) and say where it failed.
        shutil.rmtree(temporary, ignore_errors=True)
        previous = find_latest_checkpoint(output_dir)
        raise OSError(
            error.errno,
            f"could not write checkpoint {final}: {error.strerror or error}; nothing of it was kept"
            + (f", {previous} is the newest complete checkpoint" if previous else ""),
        ) from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json_atomically(os.path.join(temporary, STATE_FILENAME), dict(state))
        _replace_directory(temporary, final)
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process and os.path.isdir(temporary):  # this node does not share the main's disk
        _write_json_atomically(os.path.join(temporary, STATE_FILENAME), dict(state))
        _replace_directory(temporary, final)
    accelerator.wait_for_everyone()
    return final


def _ordinary_permissions(folder: str) -> None:
    """The weights written by `save_state` come out 0600 (written through a private temporary file); give every file
    the mode a plain `open` gives (0666 minus the umask), so that jobs of the same group can read them."""
    mask = os.umask(0)
    os.umask(mask)
    for root, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _write_json_atomically(path: str, content: Any) -> None:
    with open(path + ".part", "w") as handle:
        json.dump(content, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".part", path)


def _replace_directory(source: str, destination: str) -> None:
    if os.path.isdir(destination):  # the same step saved again (e.g. a run resumed and stopped at this step)
        stale = destination + ".old"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(destination, stale)
        os.replace(source, destination)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(source, destination)


def load_checkpoint_state(path: str | os.PathLike, process_index: int) -> tuple[dict, dict | None]:
    """`training_state.json` of a checkpoint and this process's `process_state_<rank>.json` (None if absent)."""
    with open(os.path.join(path, STATE_FILENAME)) as handle:
        state = json.load(handle)
    process_file = os.path.join(path, PROCESS_STATE_PATTERN.format(process_index))
    process_state = None
    if os.path.isfile(process_file):
        with open(process_file) as handle:
            process_state = json.load(handle)
    return state, process_state


def prune_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> list[str]:
    """Delete all but the `keep` newest complete checkpoints (and leftover temporary folders); returns the deleted.
    Call it on the main process, after a successful save."""
    if keep is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = checkpoints[: max(0, len(checkpoints) - keep)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
