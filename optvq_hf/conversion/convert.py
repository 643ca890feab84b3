#!/usr/bin/env python
"""
Convert an original OptVQ checkpoint (GitHub zbr17/OptVQ) into an optvq-hf folder that `OptVQModel.from_pretrained`
loads: `config.json`, `model.safetensors`, the image processor's config, the modeling code (for `trust_remote_code`)
and a model card.

The released models (Hub repos BorelTHU/optvq-16x16x4 and BorelTHU/optvq-16x16x8, downloaded beforehand, e.g. with
`huggingface-cli download BorelTHU/optvq-16x16x4 --local-dir optvq-16x16x4`):

    python conversion/convert_original_to_hf.py --original_path optvq-16x16x4 --output_dir optvq-hf-16x16x4 --verify

A checkpoint of the original `train.py`, with its YAML config or a preset:

    python conversion/convert_original_to_hf.py --original_path logs/run/checkpoint.pth \\
        --original_config configs/imagenet/optvq_256_f16_h4.yaml --output_dir optvq-hf-run --save_loss_weights
    python conversion/convert_original_to_hf.py --original_path logs/run/checkpoint.pth --preset optvq-16x16x8 \\
        --output_dir optvq-hf-run

Upload (`--dry_run` lists the files instead):

    python conversion/convert_original_to_hf.py ... --push_to_hub --hub_model_id my-org/optvq-16x16x4

Nothing is guessed: an original setting this package cannot reproduce, an unknown or missing weight, or a weight whose
shape differs from the config is an error that names it, and a failed conversion leaves no output folder behind (the
folder is written beside its destination and renamed at the end). `--verify` compares the converted model with the
original network written from its formulas (conversion/original_reference.py) on the original weights, and with the
original code's own outputs when `--reference_outputs` gives them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from optvq_hf.conversion.original_checkpoint import (
    LOSS_GROUPS,
    CheckpointError,
    OriginalWeights,
    read_state_dict,
    split_and_check,
)
from optvq_hf.conversion.original_config import (
    PRESETS,
    OriginalConfigError,
    OriginalModelSpec,
    spec_from_hub_config_file,
    spec_from_preset,
    spec_from_yaml,
)
from optvq_hf.conversion.original_keys import map_original_state_dict
from optvq_hf.conversion.verification import VerificationReport, verify_conversion

from .. import OptVQConfig, OptVQImageProcessor, OptVQModel
from ..hub import push_folder_to_hub, render_model_card
from ..training.cli import option, parse_options

LOSS_WEIGHTS_FILE = "loss_weights.safetensors"
LOSS_WEIGHTS_DOC = (
    "Loss-only weights of the original OptVQ training objective, under their original names: "
    "loss.perceptual_loss.* (the LPIPS VGG network of the `lpips` package: net.*, lin0-4.*, scaling_layer.*) and "
    "loss.discriminator.* (the taming-transformers PatchGAN NLayerDiscriminator: main.*). Strip the `loss.` prefix "
    "(and `perceptual_loss.` / `discriminator.`) to load them into the corresponding modules."
)


class ConversionError(ValueError):
    """A conversion that cannot be done as asked (arguments, output folder, failed verification)."""


@dataclass
class ConversionResult:
    output_dir: Path
    config: OptVQConfig
    num_parameters: int
    mapped_keys: int
    dropped_keys: list[str]
    loss_groups: dict[str, int]
    wrapper_prefixes: list[str]
    files: list[str] = field(default_factory=list)
    verification: VerificationReport | None = None


# -- inputs -----------------------------------------------------------------------------------------------------------
def resolve_spec(original_path: Path, original_config: str | None, preset: str | None) -> OriginalModelSpec:
    """The original configuration: a Hub folder's config.json, a YAML, or a preset (checked against each other)."""
    if original_config and preset:
        raise ConversionError("give either --original_config or --preset, not both")
    given = spec_from_yaml(original_config) if original_config else spec_from_preset(preset) if preset else None
    hub_config = original_path / "config.json" if original_path.is_dir() else None
    if hub_config is not None and hub_config.is_file():
        from_folder = spec_from_hub_config_file(hub_config)
        if given is not None:
            _check_same_architecture(from_folder, given)
        return from_folder
    if given is None:
        where = f"the folder {original_path} has no config.json" if original_path.is_dir() else "a checkpoint file"
        raise ConversionError(
            f"{where}: give the original YAML (--original_config) or a preset (--preset, one of {sorted(PRESETS)})"
        )
    return given


def _check_same_architecture(a: OriginalModelSpec, b: OriginalModelSpec) -> None:
    first, second = a.to_optvq_config().to_dict(), b.to_optvq_config().to_dict()
    differ = sorted(k for k in first if k != "transformers_version" and first.get(k) != second.get(k))
    if differ:
        details = ", ".join(f"{k}: {first.get(k)!r} vs {second.get(k)!r}" for k in differ)
        raise ConversionError(f"{a.source} and {b.source} describe different models ({details})")


def build_model(spec: OriginalModelSpec, weights: OriginalWeights, inference_assignment: str) -> OptVQModel:
    """The `OptVQModel` of `spec` holding the original weights (float32), loaded strictly."""
    config = spec.to_optvq_config(inference_assignment)
    mapped, _ = map_original_state_dict(weights.model, spec.num_levels, spec.backbone)
    with torch.device("meta"):  # every weight comes from the checkpoint: skip the random initialisation
        model = OptVQModel(config).eval()
    expected = model.state_dict()
    # The original keys were checked against the original constructor; a mismatch here is a mapping defect.
    problems = sorted(set(expected) ^ set(mapped))
    problems += [
        f"{k}: mapped {tuple(v.shape)} vs OptVQModel {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        raise ConversionError(f"the key mapping does not produce OptVQModel's weights: {problems[:10]}")
    model.load_state_dict({k: v.float().contiguous() for k, v in mapped.items()}, strict=True, assign=True)
    return model


# -- outputs ----------------------------------------------------------------------------------------------------------
def write_loss_weights(path: Path, weights: OriginalWeights, spec: OriginalModelSpec) -> None:
    if not weights.loss:
        raise ConversionError(f"{weights.source} holds no loss weights (loss.perceptual_loss.*, loss.discriminator.*)")
    metadata = {
        "format": "pt",
        "description": LOSS_WEIGHTS_DOC,
        "source": Path(weights.source).name,
        "original_loss_config": json.dumps(spec.loss),
    }
    save_file({k: v.detach().clone().contiguous() for k, v in weights.loss.items()}, str(path), metadata=metadata)


def model_card(
    config: OptVQConfig,
    spec: OriginalModelSpec,
    weights: OriginalWeights,
    num_parameters: int,
    name: str,
    loss_file: bool,
    verification: VerificationReport | None,
) -> str:
    """The package's model card (optvq_hf.hub), stating what was converted from what, and what was checked."""
    groups = ", ".join(f"{count} {LOSS_GROUPS[prefix]}" for prefix, count in weights.loss_groups().items() if count)
    stripped = ", ".join(f"`{prefix}`" for prefix in weights.wrapper_prefixes)
    config_source = spec.source if spec.source.startswith("preset") else f"`{Path(spec.source).name}`"
    details = {
        "weights": f"`{Path(weights.source).name}`" + (f" (key prefixes stripped: {stripped})" if stripped else ""),
        "original configuration": config_source,
        "loss-only weights left out of the model": f"{len(weights.loss)}"
        + (f" ({groups})" if groups else "")
        + (f"; saved to `{LOSS_WEIGHTS_FILE}` under their original names" if loss_file else ""),
        "inference_assignment": f'`"{config.inference_assignment}"`: '
        + (
            '"nearest" gives each image the nearest codes, independent of its batch; "sinkhorn" reproduces the '
            "original's batch-level tokens"
            if spec.quantizer_type == "optvq"
            else "the original is a nearest-code quantizer, so both rules agree"
        ),
    }
    summary = (
        "An OptVQ image tokenizer converted from the original implementation "
        "([zbr17/OptVQ](https://github.com/zbr17/OptVQ)). The weights are the original ones, renamed; no training or "
        "fine-tuning was done here, and no quality numbers are claimed."
    )
    card = render_model_card(
        config,
        repo_id=name if "/" in name else None,
        model_name=name,
        summary=summary,
        conversion_details=details,
        num_parameters=num_parameters,
    )
    text = str(card)
    if verification is not None:
        text += "\n## Conversion check\n\n" + verification.table() + "\n"
    return text


def _prepare_output(output_dir: Path, overwrite: bool) -> Path:
    if output_dir.exists() and not overwrite:
        raise ConversionError(f"{output_dir} already exists; pass --overwrite to replace it")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"{output_dir} exists and is not a folder")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Beside the destination (same file system), so that the final rename is atomic.
    return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))


def _apply_umask(folder: Path) -> None:
    # mkdtemp creates the folder private (0700) and safetensors writes files 0600; the result is an ordinary folder.
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _publish(temporary: Path, output_dir: Path) -> None:
    _apply_umask(temporary)
    if output_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        output_dir.rename(old / "previous")
        temporary.rename(output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temporary.rename(output_dir)


def _check_saved_parameters(folder: Path, model: OptVQModel) -> OptVQModel:
    """Reload the written folder; every parameter must equal the converted one bit for bit."""
    loaded = OptVQModel.from_pretrained(folder).eval()
    expected = model.state_dict()
    differing = [k for k, v in loaded.state_dict().items() if not torch.equal(v, expected[k])]
    if differing or set(expected) != set(loaded.state_dict()):
        raise ConversionError(f"the saved folder does not reload the converted weights exactly: {differing[:10]}")
    return loaded


# -- the conversion ---------------------------------------------------------------------------------------------------
def convert(
    original_path: str | Path,
    output_dir: str | Path,
    original_config: str | None = None,
    preset: str | None = None,
    inference_assignment: str = "nearest",
    save_loss_weights: bool = False,
    verify: bool = False,
    reference_outputs: str | None = None,
    verify_batch_size: int = 2,
    verify_image_size: int | None = None,
    tolerance: float = 1e-4,
    overwrite: bool = False,
    hub_model_id: str | None = None,
    log: Callable[[str], None] = print,
) -> ConversionResult:
    """
    Convert an original checkpoint into an optvq-hf folder (see the module docstring); raises `ValueError` subclasses
    naming the problem, and leaves no output folder behind on failure.
    """
    original_path, output_dir = Path(original_path), Path(output_dir)
    if not original_path.exists():
        raise ConversionError(f"--original_path {original_path} does not exist")
    if inference_assignment not in ("nearest", "sinkhorn"):
        raise ConversionError(f"inference_assignment must be 'nearest' or 'sinkhorn', got {inference_assignment!r}")
    if reference_outputs and not verify:
        raise ConversionError("--reference_outputs is used by --verify; pass --verify too")
    spec = resolve_spec(original_path, original_config, preset)
    config = spec.to_optvq_config(inference_assignment)  # fails early on unsupported settings
    state_dict, source = read_state_dict(original_path)
    weights = split_and_check(state_dict, spec, source)
    del state_dict
    model = build_model(spec, weights, inference_assignment)
    num_parameters = model.num_parameters()
    if preset and num_parameters != PRESETS[preset][2]:
        raise ConversionError(f"preset {preset} has {PRESETS[preset][2]:,} parameters, the model {num_parameters:,}")

    temporary = _prepare_output(output_dir, overwrite)
    try:
        model.save_pretrained(temporary)
        OptVQImageProcessor.from_model_config(config).save_pretrained(temporary)
        if save_loss_weights:
            write_loss_weights(temporary / LOSS_WEIGHTS_FILE, weights, spec)
        loaded = _check_saved_parameters(temporary, model)
        report = None
        if verify:
            outputs = load_file(reference_outputs) if reference_outputs else None
            report = verify_conversion(
                loaded, spec, weights.model, outputs, verify_batch_size, verify_image_size, tolerance
            )
            log(report.table())
            if not report.passed:
                failed = "; ".join(f"{c.name}: {c.value} > {c.limit}" for c in report.failures())
                raise ConversionError(f"verification failed ({failed}); nothing was written")
        name = hub_model_id or output_dir.name
        card = model_card(config, spec, weights, num_parameters, name, save_loss_weights, report)
        (temporary / "README.md").write_text(card)
        _publish(temporary, output_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise

    result = ConversionResult(
        output_dir=output_dir,
        config=config,
        num_parameters=num_parameters,
        mapped_keys=len(weights.model),
        dropped_keys=sorted(weights.loss),
        loss_groups=weights.loss_groups(),
        wrapper_prefixes=weights.wrapper_prefixes,
        files=sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*") if p.is_file()),
        verification=report,
    )
    groups = ", ".join(f"{prefix}*: {count}" for prefix, count in result.loss_groups.items() if count)
    log(
        f"Converted {source}\n"
        f"  config: {spec.source} (backbone {config.backbone}, {config.num_heads} heads x {config.num_codes} codes, "
        f"inference_assignment {config.inference_assignment!r})\n"
        f"  keys mapped: {result.mapped_keys}; dropped (loss-only): {len(result.dropped_keys)}"
        + (f" ({groups})" if groups else "")
        + (f"; saved to {LOSS_WEIGHTS_FILE}" if save_loss_weights else "")
        + "\n"
        + (f"  key prefixes stripped: {', '.join(result.wrapper_prefixes)}\n" if result.wrapper_prefixes else "")
        + f"  source dtypes: {', '.join(weights.dtypes)} (written as float32)\n"
        f"  parameters: {num_parameters:,}\n"
        f"  wrote {output_dir}: {', '.join(result.files)}"
    )
    return result


# -- the Hub ----------------------------------------------------------------------------------------------------------
def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ConversionError(f"invalid --hub_model_id {repo_id!r}: {error}") from error


@dataclass
class ConvertOptions:
    """The command line of the conversion (also readable from a YAML or JSON `--config` file)."""

    original_path: str | None = option(
        None,
        "an original Hub-format folder (config.json + model.safetensors, as BorelTHU/optvq-*) or a checkpoint of the "
        "original train.py (a torch pickle with the weights under 'model') (required)",
    )
    original_config: str | None = option(None, "the original YAML config (for a training checkpoint)")
    preset: str | None = option(
        None, f"a released model's configuration, instead of --original_config: {sorted(PRESETS)}"
    )
    output_dir: str | None = option(None, "the folder to write (must not exist, see --overwrite) (required)")
    inference_assignment: str = option(
        "nearest",
        "eval-mode assignment of the converted model: 'nearest' (batch-independent nearest codes) or 'sinkhorn' (the "
        "original's batch Sinkhorn)",
    )
    save_loss_weights: bool = option(
        False, f"also write the loss-only weights (LPIPS, discriminator) to {LOSS_WEIGHTS_FILE}"
    )
    verify: bool = option(
        False,
        "compare the converted model with the original network written from its formulas on a fixed batch, and print "
        "the max abs differences",
    )
    reference_outputs: str | None = option(
        None,
        "with --verify: a safetensors file of the original code's outputs (pixel_values, latents, quantized, indices, "
        "reconstruction, ...) to compare with as well",
    )
    verify_batch_size: int = option(2, "images in the fixed verification batch")
    verify_image_size: int | None = option(None, "side of the verification images (default: the config's resolution)")
    tolerance: float = option(1e-4, "largest accepted max abs difference in the verification")
    overwrite: bool = option(False, "replace an existing --output_dir")
    push_to_hub: bool = option(False, "upload the folder to --hub_model_id")
    hub_model_id: str | None = option(None, "the Hub repo to upload to, e.g. my-org/optvq-16x16x4")
    private: bool = option(False, "create the Hub repo as private")
    dry_run: bool = option(False, "with --push_to_hub: list the files, upload nothing")


DESCRIPTION = "Convert an original OptVQ checkpoint (zbr17/OptVQ) into an optvq-hf save_pretrained folder."


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the summary says what was written
    try:
        args = parse_options(ConvertOptions, argv, description=DESCRIPTION)
        if args.original_path is None or args.output_dir is None:
            raise ConversionError("--original_path and --output_dir are required (see --help)")
        if args.preset is not None and args.preset not in PRESETS:
            raise ConversionError(f"--preset must be one of {sorted(PRESETS)}, got {args.preset!r}")
        if args.verify_batch_size < 1:
            raise ConversionError(f"--verify_batch_size must be >= 1, got {args.verify_batch_size}")
        if args.push_to_hub and not args.hub_model_id:
            raise ConversionError("--push_to_hub needs --hub_model_id")
        if (args.hub_model_id or args.dry_run or args.private) and not args.push_to_hub:
            raise ConversionError("--hub_model_id, --private and --dry_run go with --push_to_hub")
        if args.hub_model_id:
            check_repo_id(args.hub_model_id)
        convert(
            original_path=args.original_path,
            output_dir=args.output_dir,
            original_config=args.original_config,
            preset=args.preset,
            inference_assignment=args.inference_assignment,
            save_loss_weights=args.save_loss_weights,
            verify=args.verify,
            reference_outputs=args.reference_outputs,
            verify_batch_size=args.verify_batch_size,
            verify_image_size=args.verify_image_size,
            tolerance=args.tolerance,
            overwrite=args.overwrite,
            hub_model_id=args.hub_model_id,
        )
        if args.push_to_hub:
            push_folder_to_hub(
                args.output_dir,
                args.hub_model_id,
                dry_run=args.dry_run,
                private=args.private or None,
                commit_message="Upload OptVQ tokenizer converted from the original checkpoint",
            )
    except (ConversionError, OriginalConfigError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
