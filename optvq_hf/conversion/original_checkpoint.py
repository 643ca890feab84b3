"""Reading original OptVQ weights and checking them, key by key, against the original configuration.

Two layouts exist:

- the Hub format of the original `VQModelHF` (the released BorelTHU/optvq-* repos): a folder with `config.json` and
  `model.safetensors` (or `pytorch_model.bin`), every key prefixed `model.`;
- the original trainer's checkpoint: a torch pickle holding the model's state dict under `"model"` (keys prefixed
  `_orig_mod.` when the run used torch.compile), beside optimizer / scheduler / scaler states.

Pickles are loaded with `torch.load(..., weights_only=True)`, which refuses to run code. Every original weight ends up
either in the model or in the list of loss-only weights (`loss.perceptual_loss.*`: LPIPS; `loss.discriminator.*`:
PatchGAN); anything else, anything missing, and any shape other than the original constructor's is an error that
names the key.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .original_config import OriginalModelSpec
from .original_keys import WRAPPER_PREFIXES
from .original_reference import original_parameter_shapes

# The loss modules of the original `AELossWithDisc` / `AELoss`: training only, kept out of the tokenizer.
LOSS_GROUPS = {"loss.perceptual_loss.": "perceptual (LPIPS)", "loss.discriminator.": "discriminator (PatchGAN)"}
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TRAINING_CHECKPOINT_MODEL_KEY = "model"  # the original train.py: {"model": state_dict, "epoch": ..., "step": ...}


class CheckpointError(ValueError):
    """An original checkpoint that cannot be read, or whose weights do not match the original configuration."""


@dataclass
class OriginalWeights:
    """
    The weights of an original checkpoint, split and checked.

    Attributes:
        model: the tokenizer's weights under their original names (wrappers stripped).
        loss: the loss-only weights under their original names (`loss.perceptual_loss.*`, `loss.discriminator.*`).
        source: the file they were read from.
        wrapper_prefixes: the prefixes stripped from every key (`model.`, `_orig_mod.`).
        dtypes: the floating dtypes found in the model weights.
    """

    model: dict[str, torch.Tensor]
    loss: dict[str, torch.Tensor]
    source: str
    wrapper_prefixes: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)

    def loss_groups(self) -> dict[str, int]:
        """Number of loss-only weights per group, by key prefix (`loss.perceptual_loss.`, `loss.discriminator.`)."""
        return {prefix: sum(k.startswith(prefix) for k in self.loss) for prefix in LOSS_GROUPS}


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# -- reading ----------------------------------------------------------------------------------------------------------
def hub_weight_file(folder: Path) -> Path:
    """The weights file of an original Hub-format folder."""
    for name in HUB_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} holds none of {list(HUB_WEIGHT_FILES)}; is it an original OptVQ Hub folder?")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"cannot read {path} as safetensors (corrupt or truncated file?): {error}") from error


def read_torch_pickle(path: Path) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses any object that is not tensors / containers / numbers: such a file could run code.
        raise CheckpointError(
            f"{path} holds objects that a safe load (torch.load(weights_only=True)) refuses, so it is not read: "
            f"{str(error).splitlines()[0]}. If you trust the file, re-save only its state dict "
            f"(torch.save({{'model': checkpoint['model']}}, path)) and convert that."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot read {path} as a torch checkpoint (corrupt or truncated file?): {error}"
        ) from error


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """
    The raw state dict of an original checkpoint: a Hub-format folder, a `.safetensors` file, or a torch pickle (the
    original trainer's checkpoint with its `"model"` entry, or a bare state dict).

    Returns:
        (state dict, the file it came from).
    """
    path = Path(path)
    if path.is_dir():
        path = hub_weight_file(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path), str(path)
    content = read_torch_pickle(path)
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a checkpoint dict")
    if TRAINING_CHECKPOINT_MODEL_KEY in content and isinstance(content[TRAINING_CHECKPOINT_MODEL_KEY], dict):
        content = content[TRAINING_CHECKPOINT_MODEL_KEY]
    elif not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise CheckpointError(
            f"{path} is neither an original training checkpoint (no {TRAINING_CHECKPOINT_MODEL_KEY!r} entry) nor a "
            f"state dict; its entries are {_listing(sorted(map(str, content)))}"
        )
    bad = sorted(str(k) for k, v in content.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{path}: the model state dict has entries that are not tensors: {_listing(bad)}")
    return content, str(path)


# -- checking ---------------------------------------------------------------------------------------------------------
def split_and_check(state_dict: dict[str, torch.Tensor], spec: OriginalModelSpec, source: str) -> OriginalWeights:
    """
    Strip the wrappers, separate the loss-only weights, and check the rest against the weights the original
    constructors create for `spec`.

    Raises:
        CheckpointError: for a file of another model, unknown keys, missing keys or shape mismatches (each named).
    """
    stripped, prefixes = dict(state_dict), []
    for prefix in WRAPPER_PREFIXES:  # the same order as strip_wrapper_prefixes, recording what was removed
        if stripped and all(key.startswith(prefix) for key in stripped):
            stripped = {key[len(prefix) :]: value for key, value in stripped.items()}
            prefixes.append(prefix)
    expected = original_parameter_shapes(spec)
    loss = {k: v for k, v in stripped.items() if k.startswith(tuple(LOSS_GROUPS))}
    model = {k: v for k, v in stripped.items() if k not in loss}
    if not (set(model) & set(expected)):
        raise CheckpointError(
            f"{source} does not look like an original OptVQ checkpoint: none of its {len(stripped)} key(s) is an "
            f"OptVQ weight (first keys: {_listing(sorted(stripped), 5)}); is it a file of another model?"
        )
    problems = []
    unknown = sorted(set(model) - set(expected))
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s) (no weight of the original model): {_listing(unknown)}")
    missing = sorted(set(expected) - set(model))
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    mismatched = [
        f"{k}: checkpoint {tuple(model[k].shape)} vs config {expected[k]}"
        for k in expected
        if k in model and tuple(model[k].shape) != expected[k]
    ]
    if mismatched:
        problems.append(
            f"{len(mismatched)} shape mismatch(es) between the weights and the config ({spec.source}): "
            + _listing(mismatched)
        )
    not_float = sorted(k for k, v in model.items() if k in expected and not v.is_floating_point())
    if not_float:
        problems.append(f"non-floating-point model weight(s): {_listing(not_float)}")
    non_finite = sorted(
        k for k, v in model.items() if k in expected and v.is_floating_point() and not bool(torch.isfinite(v).all())
    )
    if non_finite:
        problems.append(
            f"NaN or Inf in model weight(s): {_listing(non_finite)} (a diverged or corrupted checkpoint; "
            f"convert an earlier one)"
        )
    if problems:
        raise CheckpointError(
            f"{source} does not match the original model of {spec.source}:\n  - " + "\n  - ".join(problems)
        )
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in model.values()})
    return OriginalWeights(model=model, loss=loss, source=source, wrapper_prefixes=prefixes, dtypes=dtypes)


__all__ = [
    "CheckpointError",
    "HUB_WEIGHT_FILES",
    "LOSS_GROUPS",
    "OriginalWeights",
    "hub_weight_file",
    "read_state_dict",
    "split_and_check",
]
