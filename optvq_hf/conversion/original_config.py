"""The original OptVQ configuration (GitHub zbr17/OptVQ) and its translation into an `OptVQConfig`.

The original builds its model from nested `target` / `params` blocks (`optvq.models.vqgan.VQModel` with an encoder,
decoder, quantizer and loss), written either

- in a YAML file, under `autoencoder:` (the small configs) or `model: autoencoder:` (the ImageNet training configs), or
- in the `config.json` that the original `VQModelHF` (a huggingface_hub `PyTorchModelHubMixin`) writes next to its
  weights: the constructor arguments `encoder`, `decoder`, `quantize` (plain parameter dicts), `quantize_type`
  ("optvq" or "basevq"), `loss`, `use_connector`, ...

Both are read into one `OriginalModelSpec`, with the original classes' own defaults filled in for absent fields (a
field missing from the YAML means the class default, which is not always ours: the original encoder defaults to
`double_z=True`, the quantizer to `loss_q_type="ce"` and `use_prob=True`). The translation guesses nothing: a field
this package cannot reproduce, or does not know, is an error that names it.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from optvq_hf import OptVQConfig

# -- the original classes, by `target` --------------------------------------------------------------------------------
VQMODEL_TARGET = "optvq.models.vqgan.VQModel"
ENCODER_TARGETS = {
    "optvq.models.backbone.diffusion.Encoder": "diffusion",
    "optvq.models.backbone.simple_cnn.PlainCNNEncoder": "simple_cnn",
}
DECODER_TARGETS = {
    "optvq.models.backbone.diffusion.Decoder": "diffusion",
    "optvq.models.backbone.simple_cnn.PlainCNNDecoder": "simple_cnn",
}
QUANTIZER_TARGETS = {
    "optvq.models.quantizer.VectorQuantizerSinkhorn": "optvq",
    "optvq.models.quantizer.VectorQuantizer": "basevq",
}
# `VQModelHF` builds the diffusion encoder / decoder and picks the quantizer class by `quantize_type`.
HUB_QUANTIZE_TYPES = {"optvq": "optvq", "basevq": "basevq"}

# The constructors' defaults (REQUIRED: a keyword argument without default).
REQUIRED = object()
_DIFFUSION_ENCODER_FIELDS: dict[str, Any] = {
    "ch": REQUIRED,
    "ch_mult": [1, 2, 4, 8],
    "num_res_blocks": REQUIRED,
    "attn_resolutions": REQUIRED,
    "dropout": 0.0,
    "resamp_with_conv": True,
    "in_channels": REQUIRED,
    "resolution": REQUIRED,
    "z_channels": REQUIRED,
    "double_z": True,
}
_DIFFUSION_DECODER_FIELDS: dict[str, Any] = {
    "ch": REQUIRED,
    "ch_mult": [1, 2, 4, 8],
    "num_res_blocks": REQUIRED,
    "attn_resolutions": REQUIRED,
    "dropout": 0.0,
    "resamp_with_conv": True,
    "out_ch": REQUIRED,
    "resolution": REQUIRED,
    "z_channels": REQUIRED,
    "give_pre_end": False,
}
# Fields the original accepts but that change nothing in the network (absorbed by `**ignore_kwargs`, or stored only).
_DIFFUSION_ENCODER_INERT = {"out_ch"}
_DIFFUSION_DECODER_INERT = {"in_channels", "double_z"}
_SIMPLE_ENCODER_FIELDS: dict[str, Any] = {"in_dim": 3}
_SIMPLE_DECODER_FIELDS: dict[str, Any] = {"out_dim": 3}
_QUANTIZER_FIELDS: dict[str, Any] = {
    "n_e": 1024,
    "e_dim": 128,
    "beta": 1.0,
    "use_norm": False,
    "use_proj": True,
    "fix_codes": False,
    "loss_q_type": "ce",
    "num_head": 1,
    "start_quantize_steps": None,
}
_SINKHORN_FIELDS: dict[str, Any] = {"epsilon": 10.0, "n_iters": 5, "normalize_mode": "all", "use_prob": True}
# VQModel arguments that do not shape the network: a weights file loaded at construction (its weights are in the state
# dict anyway), the batch key, the metric to monitor.
_VQMODEL_INERT = {"ckpt_path", "ignore_keys", "image_key", "monitor"}
_VQMODEL_FIELDS = {"encoder", "decoder", "quantize", "loss", "use_connector", "colorize_nlabels"} | _VQMODEL_INERT
_HUB_FIELDS = _VQMODEL_FIELDS | {"quantize_type"}
# The encoder and decoder of this package share one set of these hyperparameters.
_SHARED_BACKBONE_FIELDS = (
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "z_channels",
    "resolution",
    "dropout",
    "resamp_with_conv",
)
NORMALIZE_MODES = {"all": "all", "dim": "dim", "null": "none"}
# The plain CNN of the original MNIST / CIFAR-10 setups has fixed widths: 16 then 32 channels, 32 latent channels.
SIMPLE_CNN_WIDTH = 32


class OriginalConfigError(ValueError):
    """An original configuration that cannot be read, or that this package cannot reproduce exactly."""


@dataclass(frozen=True)
class OriginalModelSpec:
    """
    The original model's constructor arguments, with the original classes' defaults filled in.

    Attributes:
        backbone: "diffusion" (taming encoder / decoder) or "simple_cnn".
        encoder, decoder: the backbone constructors' arguments.
        quantizer_type: "optvq" (`VectorQuantizerSinkhorn`) or "basevq" (`VectorQuantizer`).
        quantizer: the quantizer constructor's arguments.
        use_connector: whether the 1x1 `quant_conv` / `post_quant_conv` exist.
        colorize_nlabels: the VQModel's segmentation-colouring buffer size (None: no buffer).
        loss: the loss block (`target`, `params`) as written, for the record; it does not shape the tokenizer.
        resolution: the image side the model was trained at (for `simple_cnn`, from the data config).
        source: where the spec came from, for messages.
    """

    backbone: str
    encoder: dict[str, Any]
    decoder: dict[str, Any]
    quantizer_type: str
    quantizer: dict[str, Any]
    use_connector: bool = True
    colorize_nlabels: int | None = None
    loss: dict[str, Any] | None = None
    resolution: int | None = None
    source: str = "original config"

    @property
    def num_levels(self) -> int:
        """Resolution levels of the diffusion encoder (`len(ch_mult)`); the decoder indexes them in reverse."""
        return len(self.encoder["ch_mult"]) if self.backbone == "diffusion" else 0

    # -- translation --------------------------------------------------------------------------------------------------
    def unsupported_fields(self) -> list[str]:
        """One line for each original setting that this package cannot reproduce."""
        problems: list[str] = []
        if not self.use_connector:
            problems.append(
                "use_connector: false (no quant_conv / post_quant_conv) is not supported; OptVQModel always has them"
            )
        if self.colorize_nlabels is not None:
            problems.append("colorize_nlabels (a segmentation-colouring buffer) is not supported")
        if self.backbone == "diffusion":
            enc, dec = self.encoder, self.decoder
            if enc["double_z"]:
                problems.append(
                    "encoder double_z: true (2 * z_channels encoder outputs) is not supported; OptVQModel's encoder "
                    "has z_channels outputs (the original encoder's default is double_z: true, so write "
                    "double_z: false explicitly if that is what the model used)"
                )
            for name in _SHARED_BACKBONE_FIELDS:
                if _normalized(enc[name]) != _normalized(dec[name]):
                    problems.append(
                        f"encoder and decoder differ in {name} ({enc[name]!r} vs {dec[name]!r}); OptVQConfig has one "
                        f"value for both"
                    )
            if not enc["resamp_with_conv"]:
                problems.append("resamp_with_conv: false (pooling instead of strided convolutions) is not supported")
            if dec["give_pre_end"]:
                problems.append("decoder give_pre_end: true (no output layer) is not supported")
        q = self.quantizer
        if q["use_norm"]:
            problems.append("quantizer use_norm: true is not supported (the original itself rejects it)")
        if self.quantizer_type == "optvq":
            if q["use_prob"]:
                problems.append(
                    "quantizer use_prob: true (indices sampled at random from the transport plan, also at "
                    "inference) is not supported; the released models use use_prob: false (argmax), and an absent "
                    "use_prob means the class default true"
                )
            if q["normalize_mode"] not in NORMALIZE_MODES:
                problems.append(
                    f"quantizer normalize_mode {q['normalize_mode']!r} is not one of {sorted(NORMALIZE_MODES)}"
                )
        return problems

    def training_only_fields(self) -> list[str]:
        """One line per original setting that shapes only training (the conversion does not carry it over)."""
        notes: list[str] = []
        q = self.quantizer
        if q["loss_q_type"] != "l2":
            notes.append(
                f"quantizer loss_q_type {q['loss_q_type']!r} (a training loss; this package trains with 'l2', and an "
                f"absent loss_q_type means the class default 'ce')"
            )
        if q["fix_codes"]:
            notes.append("quantizer fix_codes: true (a frozen codebook during training)")
        if q["start_quantize_steps"] is not None:
            notes.append(
                f"quantizer start_quantize_steps {q['start_quantize_steps']!r} (a warm-up without quantization)"
            )
        if self.loss is not None:
            notes.append(f"the loss block ({self.loss.get('target')}: its weights and discriminator)")
        return notes

    def to_optvq_config(self, inference_assignment: str = "nearest") -> OptVQConfig:
        """
        The `OptVQConfig` of the same network.

        Args:
            inference_assignment: "nearest" (this package's default: batch-independent tokens) or "sinkhorn" (the
                original's batch-level assignment in eval mode).

        Settings that shape only training (`training_only_fields`) convert with a warning naming them.

        Raises:
            OriginalConfigError: listing every original setting that changes the forward pass and cannot be reproduced.
        """
        notes = self.training_only_fields()
        if notes:
            warnings.warn(
                f"{self.source}: training-only setting(s) not carried over (the converted model's forward pass is "
                f"unaffected):\n  - " + "\n  - ".join(notes),
                stacklevel=2,
            )
        problems = self.unsupported_fields()
        if problems:
            raise OriginalConfigError(
                f"{self.source}: {len(problems)} setting(s) cannot be converted:\n  - " + "\n  - ".join(problems)
            )
        q = self.quantizer
        fields: dict[str, Any] = dict(
            embed_dim=int(q["e_dim"]),
            num_heads=int(q["num_head"]),
            num_codes=int(q["n_e"]),
            use_codebook_projection=bool(q["use_proj"]),
            commitment_beta=float(q["beta"]),
            quantizer_type="optvq" if self.quantizer_type == "optvq" else "vq",
            inference_assignment=inference_assignment,
            backbone=self.backbone,
        )
        if self.quantizer_type == "optvq":
            fields.update(
                sinkhorn_epsilon=float(q["epsilon"]),
                sinkhorn_iterations=int(q["n_iters"]),
                cost_normalization=NORMALIZE_MODES[q["normalize_mode"]],
            )
        if self.backbone == "diffusion":
            enc, dec = self.encoder, self.decoder
            fields.update(
                resolution=int(enc["resolution"]),
                in_channels=int(enc["in_channels"]),
                out_channels=int(dec["out_ch"]),
                base_channels=int(enc["ch"]),
                channel_multipliers=[int(m) for m in enc["ch_mult"]],
                num_res_blocks=int(enc["num_res_blocks"]),
                attn_resolutions=[int(r) for r in enc["attn_resolutions"]],
                latent_channels=int(enc["z_channels"]),
                dropout=float(enc["dropout"]),
            )
        else:
            if self.resolution is None:
                raise OriginalConfigError(
                    f"{self.source}: the simple_cnn backbone does not record the image size; the YAML needs the data "
                    f"transform's `resize` (data.val.params.transform.params.resize, as in the original configs)"
                )
            fields.update(
                resolution=int(self.resolution),
                in_channels=int(self.encoder["in_dim"]),
                out_channels=int(self.decoder["out_dim"]),
                base_channels=SIMPLE_CNN_WIDTH,
                latent_channels=SIMPLE_CNN_WIDTH,
            )
        try:
            return OptVQConfig(**fields)
        except ValueError as error:
            raise OriginalConfigError(f"{self.source}: translates to an invalid OptVQConfig: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record of the spec (for the model card and the loss-weights metadata)."""
        return {
            "backbone": self.backbone,
            "encoder": self.encoder,
            "decoder": self.decoder,
            "quantizer_type": self.quantizer_type,
            "quantizer": self.quantizer,
            "use_connector": self.use_connector,
            "loss": self.loss,
            "resolution": self.resolution,
        }


def _normalized(value: Any) -> Any:
    return [_normalized(v) for v in value] if isinstance(value, (list, tuple)) else value


def _resolve(params: Any, defaults: dict[str, Any], inert: set[str], what: str, source: str) -> dict[str, Any]:
    """Fill the class defaults into `params`; unknown fields and missing required ones are errors."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise OriginalConfigError(f"{source}: {what} parameters must be a mapping, got {type(params).__name__}")
    unknown = sorted(set(params) - set(defaults) - inert)
    if unknown:
        raise OriginalConfigError(
            f"{source}: unknown {what} field(s) {unknown}; known: {sorted(set(defaults) | inert)}"
        )
    resolved = {name: copy.deepcopy(params[name]) if name in params else default for name, default in defaults.items()}
    missing = sorted(name for name, value in resolved.items() if value is REQUIRED)
    if missing:
        raise OriginalConfigError(f"{source}: {what} lacks the required field(s) {missing}")
    return resolved


def _target_block(block: Any, what: str, source: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(block, dict) or "target" not in block:
        raise OriginalConfigError(f"{source}: {what} must be a mapping with `target` and `params`, got {block!r}")
    unknown = sorted(set(block) - {"target", "params"})
    if unknown:
        raise OriginalConfigError(f"{source}: {what} has unknown key(s) {unknown} beside `target` and `params`")
    return str(block["target"]), dict(block.get("params") or {})


def _spec(
    encoder_target: str,
    encoder: dict,
    decoder_target: str,
    decoder: dict,
    quantizer_kind: str,
    quantizer: dict,
    vqmodel: dict,
    allowed: set[str],
    loss: dict | None,
    resolution: int | None,
    source: str,
) -> OriginalModelSpec:
    backbone = ENCODER_TARGETS.get(encoder_target)
    if backbone is None:
        raise OriginalConfigError(
            f"{source}: unsupported encoder target {encoder_target!r}; supported: {sorted(ENCODER_TARGETS)}"
        )
    if DECODER_TARGETS.get(decoder_target) != backbone:
        raise OriginalConfigError(
            f"{source}: decoder target {decoder_target!r} does not pair with encoder target {encoder_target!r}"
        )
    if backbone == "diffusion":
        encoder = _resolve(encoder, _DIFFUSION_ENCODER_FIELDS, _DIFFUSION_ENCODER_INERT, "encoder", source)
        decoder = _resolve(decoder, _DIFFUSION_DECODER_FIELDS, _DIFFUSION_DECODER_INERT, "decoder", source)
    else:
        encoder = _resolve(encoder, _SIMPLE_ENCODER_FIELDS, set(), "encoder", source)
        decoder = _resolve(decoder, _SIMPLE_DECODER_FIELDS, set(), "decoder", source)
    quantizer_fields = dict(_QUANTIZER_FIELDS, **(_SINKHORN_FIELDS if quantizer_kind == "optvq" else {}))
    quantizer = _resolve(quantizer, quantizer_fields, set(), "quantizer", source)
    unknown = sorted(set(vqmodel) - allowed)
    if unknown:
        raise OriginalConfigError(f"{source}: unknown model field(s) {unknown}; known: {sorted(allowed)}")
    return OriginalModelSpec(
        backbone=backbone,
        encoder=encoder,
        decoder=decoder,
        quantizer_type=quantizer_kind,
        quantizer=quantizer,
        use_connector=bool(vqmodel.get("use_connector", True)),
        colorize_nlabels=vqmodel.get("colorize_nlabels"),
        loss=loss,
        resolution=int(encoder["resolution"]) if backbone == "diffusion" else resolution,
        source=source,
    )


# -- readers ----------------------------------------------------------------------------------------------------------
def spec_from_autoencoder_block(block: Any, source: str, resolution: int | None = None) -> OriginalModelSpec:
    """The spec of an `autoencoder:` block (`target: optvq.models.vqgan.VQModel`, `params: {...}`)."""
    target, params = _target_block(block, "autoencoder", source)
    if target != VQMODEL_TARGET:
        raise OriginalConfigError(f"{source}: autoencoder target {target!r} is not {VQMODEL_TARGET!r}")
    for part in ("encoder", "decoder", "quantize"):
        if part not in params:
            raise OriginalConfigError(f"{source}: autoencoder params lack `{part}`")
    encoder_target, encoder = _target_block(params["encoder"], "encoder", source)
    decoder_target, decoder = _target_block(params["decoder"], "decoder", source)
    quantizer_target, quantizer = _target_block(params["quantize"], "quantize", source)
    kind = QUANTIZER_TARGETS.get(quantizer_target)
    if kind is None:
        raise OriginalConfigError(
            f"{source}: unsupported quantizer target {quantizer_target!r}; supported: {sorted(QUANTIZER_TARGETS)}"
        )
    loss = params.get("loss")
    if loss is not None:
        loss_target, loss_params = _target_block(loss, "loss", source)
        loss = {"target": loss_target, "params": loss_params}
    return _spec(
        encoder_target,
        encoder,
        decoder_target,
        decoder,
        kind,
        quantizer,
        params,
        _VQMODEL_FIELDS,
        loss,
        resolution,
        source,
    )


def _data_resolution(document: dict) -> int | None:
    """The image side of a full training YAML's data transform (used by the simple_cnn setups)."""
    data = document.get("data")
    if not isinstance(data, dict):
        return None
    for split in ("val", "train"):
        try:
            value = data[split]["params"]["transform"]["params"]["resize"]
        except (KeyError, TypeError):
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def spec_from_yaml(path: str | Path) -> OriginalModelSpec:
    """The spec of an original YAML config: `autoencoder:` at the top, or under `model:`."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise OriginalConfigError(f"cannot read the original config {str(path)!r}: {error}") from error
    if not isinstance(document, dict):
        raise OriginalConfigError(f"{path}: expected a YAML mapping, got {type(document).__name__}")
    if "autoencoder" in document:
        block = document["autoencoder"]
    elif isinstance(document.get("model"), dict) and "autoencoder" in document["model"]:
        block = document["model"]["autoencoder"]
    else:
        raise OriginalConfigError(
            f"{path}: no `autoencoder:` block (looked at the top level and under `model:`); is this an original "
            f"OptVQ config?"
        )
    return spec_from_autoencoder_block(block, source=str(path), resolution=_data_resolution(document))


def spec_from_hub_config(config: dict[str, Any], source: str = "config.json") -> OriginalModelSpec:
    """The spec of the `config.json` that the original `VQModelHF.save_pretrained` writes."""
    if not isinstance(config, dict):
        raise OriginalConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
    if config.get("model_type") == "optvq":
        raise OriginalConfigError(
            f"{source}: this is already an optvq-hf config (model_type 'optvq'), not an original"
        )
    for part in ("encoder", "decoder", "quantize"):
        if not isinstance(config.get(part), dict):
            raise OriginalConfigError(
                f"{source}: not an original OptVQ Hub config (no `{part}` parameter mapping); its keys are "
                f"{sorted(config)[:12]}"
            )
    quantize_type = config.get("quantize_type", "optvq")
    kind = HUB_QUANTIZE_TYPES.get(quantize_type)
    if kind is None:
        raise OriginalConfigError(
            f"{source}: unknown quantize_type {quantize_type!r}; known: {sorted(HUB_QUANTIZE_TYPES)}"
        )
    diffusion_encoder, diffusion_decoder = (
        next(t for t, b in table.items() if b == "diffusion") for table in (ENCODER_TARGETS, DECODER_TARGETS)
    )
    loss = config.get("loss")
    loss = {"target": "optvq.losses.aeloss_disc.AELossWithDisc", "params": loss} if loss is not None else None
    return _spec(
        diffusion_encoder,
        config["encoder"],
        diffusion_decoder,
        config["decoder"],
        kind,
        config["quantize"],
        config,
        _HUB_FIELDS,
        loss,
        None,
        source,
    )


def spec_from_hub_config_file(path: str | Path) -> OriginalModelSpec:
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OriginalConfigError(f"cannot read the original Hub config {str(path)!r}: {error}") from error
    return spec_from_hub_config(config, source=str(path))


# -- presets: the released ImageNet 256x256 models --------------------------------------------------------------------
def _imagenet_f16_block(num_head: int) -> dict[str, Any]:
    """The `model: autoencoder:` block of the original configs/imagenet/optvq_256_f16_h{4,8}.yaml."""
    backbone = dict(
        double_z=False,
        z_channels=256,
        resolution=256,
        in_channels=3,
        out_ch=3,
        ch=128,
        ch_mult=[1, 1, 2, 2, 4],
        num_res_blocks=2,
        attn_resolutions=[16],
        dropout=0.0,
    )
    return {
        "target": VQMODEL_TARGET,
        "params": {
            "use_connector": True,
            "encoder": {"target": "optvq.models.backbone.diffusion.Encoder", "params": dict(backbone)},
            "decoder": {"target": "optvq.models.backbone.diffusion.Decoder", "params": dict(backbone)},
            "quantize": {
                "target": "optvq.models.quantizer.VectorQuantizerSinkhorn",
                "params": dict(
                    n_e=16384,
                    e_dim=256,
                    beta=0.25,
                    use_proj=True,
                    fix_codes=False,
                    epsilon=10,
                    n_iters=5,
                    normalize_mode="all",
                    use_prob=False,
                    start_quantize_steps=None,
                    num_head=num_head,
                    loss_q_type="l2",
                ),
            },
            "loss": {
                "target": "optvq.losses.aeloss_disc.AELossWithDisc",
                "params": dict(
                    loss_l1_weight=1.0,
                    loss_l2_weight=1.0,
                    loss_p_weight=3.0,
                    loss_q_weight=1.0,
                    loss_g_weight=1.0,
                    loss_d_weight=1.0,
                    disc_in_channels=3,
                    disc_num_layers=3,
                    disc_start=150000,
                ),
            },
        },
    }


# name -> (autoencoder block, Hub repo of the released weights, parameters without the loss modules)
PRESETS: dict[str, tuple[dict[str, Any], str, int]] = {
    "optvq-16x16x4": (_imagenet_f16_block(4), "BorelTHU/optvq-16x16x4", 72_932_291),
    "optvq-16x16x8": (_imagenet_f16_block(8), "BorelTHU/optvq-16x16x8", 72_404_899),
}


def spec_from_preset(name: str) -> OriginalModelSpec:
    """The spec of a released model: "optvq-16x16x4" or "optvq-16x16x8" (ImageNet 256x256, 16x16 latents)."""
    if name not in PRESETS:
        raise OriginalConfigError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return spec_from_autoencoder_block(copy.deepcopy(PRESETS[name][0]), source=f"preset {name}")


__all__ = [
    "OriginalConfigError",
    "OriginalModelSpec",
    "PRESETS",
    "spec_from_autoencoder_block",
    "spec_from_hub_config",
    "spec_from_hub_config_file",
    "spec_from_preset",
    "spec_from_yaml",
]
