"""Names of the original OptVQ weights (GitHub zbr17/OptVQ) in this package's `OptVQModel`.

The original encoder/decoder are the taming-transformers modules; this package builds the same network from
diffusers' blocks, whose parameters carry other names (and whose attention projections are linear layers where the
original has 1x1 convolutions). `map_original_state_dict` renames every weight and reports which original weights
belong to the training loss only (perceptual network, discriminator) and are not part of the model.
"""

from __future__ import annotations

import re

import torch

# Loss-only weights of the original (`loss.perceptual_loss.*`, `loss.discriminator.*`): not part of the tokenizer.
LOSS_PREFIX = "loss."
# Prefixes that wrap the original state dict: the Hub mixin's `model.` and torch.compile's `_orig_mod.`.
WRAPPER_PREFIXES = ("model.", "_orig_mod.")

_ATTENTION_RENAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET_RENAMES = {"nin_shortcut": "conv_shortcut"}


class KeyMappingError(ValueError):
    """An original weight that this package cannot place (unknown key, or missing from the checkpoint)."""


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the `model.` (Hub format) and `_orig_mod.` (torch.compile) prefixes where every key carries them."""
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def _rename_block_part(part: str, renames: dict[str, str]) -> str:
    head, _, tail = part.partition(".")
    return f"{renames.get(head, head)}.{tail}" if tail else renames.get(head, head)


def _rename_backbone_key(key: str, num_levels: int) -> str | None:
    """Map one original encoder/decoder key to diffusers' names; None when the key is not a known pattern."""
    simple = {"conv_in.", "conv_out.", "norm_out."}
    module, _, rest = key.partition(".")
    if module not in ("encoder", "decoder"):
        return None
    if any(rest.startswith(prefix) for prefix in simple):
        return f"{module}.{rest.replace('norm_out.', 'conv_norm_out.')}"

    match = re.fullmatch(r"mid\.(block_1|block_2|attn_1)\.(.+)", rest)
    if match:
        part, tail = match.groups()
        if part == "attn_1":
            return f"{module}.mid_block.attentions.0.{_rename_block_part(tail, _ATTENTION_RENAMES)}"
        index = 0 if part == "block_1" else 1
        return f"{module}.mid_block.resnets.{index}.{_rename_block_part(tail, _RESNET_RENAMES)}"

    level_name = "down" if module == "encoder" else "up"
    match = re.fullmatch(rf"{level_name}\.(\d+)\.(block|attn)\.(\d+)\.(.+)", rest)
    if match:
        level, kind, index, tail = match.groups()
        level = int(level) if module == "encoder" else num_levels - 1 - int(level)
        blocks = "down_blocks" if module == "encoder" else "up_blocks"
        if kind == "block":
            return f"{module}.{blocks}.{level}.resnets.{index}.{_rename_block_part(tail, _RESNET_RENAMES)}"
        return f"{module}.{blocks}.{level}.attentions.{index}.{_rename_block_part(tail, _ATTENTION_RENAMES)}"

    match = re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(weight|bias)", rest)
    if match and module == "encoder":
        return f"encoder.down_blocks.{match.group(1)}.downsamplers.0.conv.{match.group(2)}"
    match = re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(weight|bias)", rest)
    if match and module == "decoder":
        return f"decoder.up_blocks.{num_levels - 1 - int(match.group(1))}.upsamplers.0.conv.{match.group(2)}"
    return None


def _rename_key(key: str, num_levels: int, backbone: str) -> str | None:
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    if key in ("quantize.embedding.weight", "quantize.proj.weight", "quantize.proj.bias"):
        return key.replace("quantize.", "quantizer.", 1)
    if backbone == "simple_cnn":
        # The plain CNN modules carry the original names (in_fc, down1, conv1, ...).
        return key if re.fullmatch(r"(encoder|decoder)\.\w+\.(weight|bias)", key) else None
    return _rename_backbone_key(key, num_levels)


def map_original_state_dict(
    original: dict[str, torch.Tensor], num_levels: int, backbone: str = "diffusion"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """
    Rename an original OptVQ state dict to this package's names.

    Args:
        original: the original `VQModel` state dict (the `model.` / `_orig_mod.` wrappers are stripped here).
        num_levels: `len(ch_mult)` of the original encoder (the decoder's levels are indexed in reverse).
        backbone: "diffusion" or "simple_cnn".

    Returns:
        (the renamed model weights, the original keys of the loss-only weights that were left out).

    Raises:
        KeyMappingError: naming every original key that matches no known pattern.
    """
    original = strip_wrapper_prefixes(dict(original))
    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, value in original.items():
        if key.startswith(LOSS_PREFIX):
            dropped.append(key)
            continue
        new_key = _rename_key(key, num_levels, backbone)
        if new_key is None:
            unknown.append(key)
            continue
        if ".attentions." in new_key and new_key.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 convolution -> linear layer
        mapped[new_key] = value
    if unknown:
        listed = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise KeyMappingError(f"{len(unknown)} original weight(s) match no OptVQ parameter: {listed}")
    return mapped, dropped
