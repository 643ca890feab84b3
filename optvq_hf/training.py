"""Reusable pieces of a training loop for OptVQ tokenizers (used by `examples/train.py`).

- `build_config`: a dataclass of training options from a YAML file plus command-line overrides, every value checked
  against the field's type, unknown fields rejected with a suggestion.
- `check_process_group`: refuse to train when several processes were launched but did not form one group.
- `save_checkpoint` / `find_latest_checkpoint`: `accelerator.save_state` written into a temporary folder and renamed
  when complete, so that a crash while saving never leaves a half-written `checkpoint-<step>` behind.
- `kmeans_init_codebook`: the original's optional k-means initialisation of the codebook, on encoder features of a
  few batches, for any number of heads (all heads share the codebook, so their sub-vectors are pooled).
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
import shutil
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------------------------------
# Configuration: YAML file + command-line overrides
# ---------------------------------------------------------------------------------------------------------------------


def field_types(cls: type) -> dict[str, Any]:
    """Keyword argument name -> type hint of a class's `__init__` (a dataclass's fields, a config's arguments)."""
    hints = typing.get_type_hints(cls.__init__)
    return {
        name: hints.get(name, Any)
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
    }


def coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` (from YAML or a command-line string) converted to the type `hint`; a `ValueError` naming `name`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return coerce(value, option, name)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if len(errors) == 1 else f"{name}: {value!r} matches none of {hint}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d[\d_]*\s*", value):
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # also "1e-4", which YAML 1.1 reads as a string
            except ValueError:
                pass
        raise ValueError(f"{name} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{name} must be a string, got {value!r} (quote it in YAML: {name}: \"{value}\")")
    if origin in (tuple, list, Sequence, typing.Sequence) or hint in (tuple, list):
        if isinstance(value, str):
            import yaml

            text = value.strip()
            value = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        item_hint = args[0] if args else Any
        items = [coerce(item, item_hint, f"{name}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple or hint is tuple else items
    if origin is dict or hint is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ValueError(f"{name} must be a mapping, got {value!r}")
    return value


def _unknown_field_error(name: str, known: Iterable[str], where: str) -> ValueError:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
    return ValueError(f"unknown field {name!r} in {where}{hint}")


def build_config(
    cls: type,
    file_values: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    sections: Mapping[str, type] | None = None,
    source: str = "the configuration",
) -> Any:
    """An instance of the dataclass `cls` from a YAML mapping and overrides (applied in that order).

    Keys are the fields of `cls`; a field named in `sections` (e.g. `"model": OptVQConfig`) is a nested mapping whose
    keys are checked against the fields of that class and stays a dict. Overrides use dotted keys for nested fields
    (`"model.num_codes"`). Every value is converted to the field's type; an unknown key or a value of the wrong type
    raises a `ValueError` that names it.
    """
    sections = dict(sections or {})
    types_ = field_types(cls)
    values: dict[str, Any] = {name: {} for name in sections}

    def assign(key: str, value: Any, where: str) -> None:
        top, _, sub = key.partition(".")
        if top not in types_:
            raise _unknown_field_error(top, types_, where)
        if top in sections:
            section_types = field_types(sections[top])
            if not sub:
                if not isinstance(value, Mapping):
                    raise ValueError(f"{top} in {where} must be a mapping of {sections[top].__name__} fields")
                for inner, inner_value in value.items():
                    assign(f"{top}.{inner}", inner_value, where)
                return
            if sub not in section_types:
                raise _unknown_field_error(sub, section_types, f"the {top!r} section of {where}")
            values[top][sub] = coerce(value, section_types[sub], f"{top}.{sub}")
        elif sub:
            raise ValueError(f"{key!r} in {where}: {top!r} has no sub-fields")
        else:
            values[top] = coerce(value, types_[top], top)

    if file_values is not None and not isinstance(file_values, Mapping):
        raise ValueError(f"{source} must be a mapping of field names to values, got {type(file_values).__name__}")
    for key, value in (file_values or {}).items():
        assign(str(key), value, source)
    for key, value in (overrides or {}).items():
        assign(key, value, "the command line")
    return cls(**values)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file's top-level mapping (empty file: `{}`); a `ValueError` for anything else."""
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"config file {os.fspath(path)!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        content = yaml.safe_load(handle)
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ValueError(f"config file {os.fspath(path)!r} must hold a mapping of fields, got {type(content).__name__}")
    return content


# ---------------------------------------------------------------------------------------------------------------------
# The multi-process guard
# ---------------------------------------------------------------------------------------------------------------------
# Variables through which launchers (torchrun / accelerate, Open MPI, Intel MPI / MPICH, MVAPICH) announce a world size.
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


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------
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
    accelerator.save_state(temporary)
    with open(os.path.join(temporary, PROCESS_STATE_PATTERN.format(accelerator.process_index)), "w") as handle:
        json.dump(dict(process_state or {}), handle)
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


# ---------------------------------------------------------------------------------------------------------------------
# k-means initialisation of the codebook
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def nearest_centroids(rows: torch.Tensor, centroids: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Index of the nearest centroid of each row, computed in chunks of rows."""
    return torch.cat([torch.cdist(block, centroids).argmin(dim=1) for block in rows.split(chunk_size)])


@torch.no_grad()
def kmeans(rows: torch.Tensor, num_clusters: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means of `rows` (N, d) in float32: `num_clusters` centroids (K, d).

    Starts from K distinct random rows; a cluster that empties is re-seeded with a random row.
    """
    rows = rows.float()
    if rows.ndim != 2 or rows.shape[0] < num_clusters:
        raise ValueError(
            f"k-means needs at least num_codes={num_clusters} feature rows, got {rows.shape[0] if rows.ndim else 0}; "
            f"use more kmeans_init_batches"
        )
    generator = torch.Generator().manual_seed(seed)
    pick = lambda count: torch.randperm(rows.shape[0], generator=generator)[:count].to(rows.device)  # noqa: E731
    centroids = rows[pick(num_clusters)].clone()
    for _ in range(iterations):
        assignment = nearest_centroids(rows, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, rows)
        counts = torch.bincount(assignment, minlength=num_clusters)
        centroids = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            centroids[empty] = rows[pick(len(empty))]
    return centroids


@torch.no_grad()
def set_codebook(quantizer: torch.nn.Module, codes: torch.Tensor) -> None:
    """Make `quantizer.codebook()` equal `codes` (K, d): the embedding becomes `codes` and a codebook projection,
    if any, the identity (the original writes the centroids into the embedding and keeps the projection, so that
    its codes are a random linear map of the centroids)."""
    quantizer.embedding.weight.copy_(codes)
    if getattr(quantizer, "proj", None) is not None:
        quantizer.proj.weight.copy_(torch.eye(codes.shape[1]))
        quantizer.proj.bias.zero_()


@torch.no_grad()
def latent_rows(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The sub-vectors the quantizer assigns, (B * h * w * num_heads, code_dim): features after `quant_conv`, every
    head's slice a row."""
    latents = model.quant_conv(model.encoder(pixel_values.to(model.quant_conv.weight.dtype)))
    return latents.permute(0, 2, 3, 1).reshape(-1, model.config.code_dim).float()


@torch.no_grad()
def kmeans_init_codebook(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    accelerator=None,
    iterations: int = 20,
    max_rows: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Initialise the codebook of an `OptVQModel` (unwrapped) by k-means on the latent rows of `batches`.

    With an `accelerator`, the rows of all processes are gathered, k-means runs on the main process, and the codes
    are broadcast, so that every process starts from the same codebook. At most `max_rows` rows (a seeded random
    subset) enter k-means. Returns the codes (num_codes, code_dim).
    """
    was_training = model.training
    model.eval()
    device = model.quant_conv.weight.device
    rows = torch.cat([latent_rows(model, batch.to(device)) for batch in batches])
    model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        rows = accelerator.gather(rows)
    if max_rows is not None and rows.shape[0] > max_rows:
        keep = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed + 1))[:max_rows]
        rows = rows[keep.to(rows.device)]
    num_codes, code_dim = model.config.num_codes, model.config.code_dim
    if rows.shape[0] < num_codes:  # checked on every process: the main one alone raising would hang the others
        raise ValueError(
            f"k-means initialisation needs at least num_codes={num_codes} feature rows, the batches gave "
            f"{rows.shape[0]}; use more kmeans_init_batches"
        )
    is_main = accelerator is None or accelerator.is_main_process
    codes = kmeans(rows, num_codes, iterations, seed) if is_main else rows.new_empty(num_codes, code_dim)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        codes = broadcast(codes.contiguous(), from_process=0)
    set_codebook(model.quantizer, codes.to(model.quantizer.embedding.weight.dtype))
    return codes


__all__ = [
    "LAUNCH_HELP",
    "build_config",
    "check_process_group",
    "checkpoint_step",
    "coerce",
    "field_types",
    "find_latest_checkpoint",
    "kmeans",
    "kmeans_init_codebook",
    "latent_rows",
    "launched_world_size",
    "list_checkpoints",
    "load_checkpoint_state",
    "load_yaml",
    "prune_checkpoints",
    "resolve_checkpoint",
    "save_checkpoint",
    "set_codebook",
]
