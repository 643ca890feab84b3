"""Configuration of the OptVQ image tokenizer."""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformers import PretrainedConfig
from transformers.utils import logging

from .assignment import COST_NORMALIZATIONS
from .quantization import INFERENCE_ASSIGNMENTS

logger = logging.get_logger(__name__)

BACKBONES = ("diffusion", "simple_cnn")
QUANTIZER_TYPES = ("optvq", "vq")
NORM_GROUPS = 32  # GroupNorm groups of the taming / diffusers blocks

# Keys that transformers itself may put in any config (its own fields and bookkeeping). Any other key is kept as an
# attribute, as transformers does (a config.json written by a newer version of this package must load), with a
# warning naming it; strict unknown-field errors belong to the training CLI and its YAML files.
_TRANSFORMERS_KEYS = set(PretrainedConfig().to_dict()) | {
    "auto_map",
    "num_labels",
    "torch_dtype",
    "name_or_path",
    "output_attentions",
    "tie_word_embeddings",
    "use_cache",
    "pruned_heads",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "finetuning_task",
}


class OptVQConfig(PretrainedConfig):
    r"""
    Configuration of an [`OptVQModel`]: a VQGAN-style autoencoder whose vector quantizer assigns features to codes by
    optimal transport (Sinkhorn-Knopp) instead of nearest neighbour. The defaults build the original ImageNet 256x256
    16x16x4 model (72,932,291 parameters).

    Args:
        resolution (`int`, *optional*, defaults to 256):
            Side of the square training images. Must be divisible by the downsampling factor.
        in_channels (`int`, *optional*, defaults to 3):
            Channels of the input images.
        out_channels (`int`, *optional*, defaults to 3):
            Channels of the reconstructed images.
        base_channels (`int`, *optional*, defaults to 128):
            Width of the first encoder level (`ch` in the original). With `backbone="simple_cnn"` it is the width of
            the last hidden layer, and the first layers use half of it.
        channel_multipliers (`Sequence[int]`, *optional*, defaults to `(1, 1, 2, 2, 4)`):
            Width multiplier of each level (`ch_mult`); every level but the last halves the resolution.
        num_res_blocks (`int`, *optional*, defaults to 2):
            ResNet blocks per encoder level (the decoder uses one more, as in taming-transformers).
        attn_resolutions (`Sequence[int]`, *optional*, defaults to `(16,)`):
            Feature-map sides at which the levels add self-attention.
        latent_channels (`int`, *optional*, defaults to 256):
            Channels of the encoder output (`z_channels`), before `quant_conv`.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout probability inside the ResNet blocks.
        embed_dim (`int`, *optional*, defaults to 256):
            Channels of the quantized features (`e_dim`), split across the heads.
        num_heads (`int`, *optional*, defaults to 4):
            Quantizer heads: each feature is split into `num_heads` sub-vectors of size `embed_dim / num_heads`, all
            quantized with one shared codebook, so that a position carries `num_heads` indices.
        num_codes (`int`, *optional*, defaults to 16384):
            Codes in the shared codebook (`n_e`).
        use_codebook_projection (`bool`, *optional*, defaults to `True`):
            Pass the codebook through a learned linear layer (`use_proj` in the original).
        quantizer_type (`str`, *optional*, defaults to `"optvq"`):
            `"optvq"` (Sinkhorn assignment during training) or `"vq"` (plain nearest-neighbour baseline).
        sinkhorn_epsilon (`float`, *optional*, defaults to 10.0):
            Inverse temperature of the transport kernel `exp(-epsilon * cost)`.
        sinkhorn_iterations (`int`, *optional*, defaults to 5):
            Sinkhorn-Knopp iterations.
        cost_normalization (`str`, *optional*, defaults to `"all"`):
            How the distance matrix is normalised before Sinkhorn: `"all"` (standardise by the statistics of the
            whole matrix and shift its minimum to 0), `"dim"` (divide by the square root of the code dimension) or
            `"none"`.
        commitment_beta (`float`, *optional*, defaults to 0.25):
            Weight of the codebook term `mean((c - sg[z])^2)`; the commitment term `mean((z - sg[c])^2)` has weight 1,
            as in the original (the reverse of VQ-VAE's convention).
        inference_assignment (`str`, *optional*, defaults to `"nearest"`):
            Assignment in eval mode: `"nearest"` (argmin of the distances, independent of the rest of the batch) or
            `"sinkhorn"` (the original's batch-level assignment, to reproduce its outputs exactly).
        backbone (`str`, *optional*, defaults to `"diffusion"`):
            `"diffusion"` (the taming-transformers / latent-diffusion encoder and decoder) or `"simple_cnn"` (the small
            plain CNN of the original MNIST and CIFAR-10 setups: two stride-2 convolutions, no normalisation).
        sinkhorn_chunk_size (`int`, *optional*, defaults to 4096):
            Rows processed at a time by the quantizer where it works in chunks; changes memory, not results.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Kept for transformers' conventions; the weights use PyTorch's default initialisation, as the original.
    """

    model_type = "optvq"

    def __init__(
        self,
        resolution: int = 256,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 128,
        channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        latent_channels: int = 256,
        dropout: float = 0.0,
        embed_dim: int = 256,
        num_heads: int = 4,
        num_codes: int = 16384,
        use_codebook_projection: bool = True,
        quantizer_type: str = "optvq",
        sinkhorn_epsilon: float = 10.0,
        sinkhorn_iterations: int = 5,
        cost_normalization: str = "all",
        commitment_beta: float = 0.25,
        inference_assignment: str = "nearest",
        backbone: str = "diffusion",
        sinkhorn_chunk_size: int = 4096,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.base_channels = base_channels
        self.channel_multipliers = list(channel_multipliers)
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = list(attn_resolutions)
        self.latent_channels = latent_channels
        self.dropout = dropout
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_codes = num_codes
        self.use_codebook_projection = use_codebook_projection
        self.quantizer_type = quantizer_type
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.cost_normalization = cost_normalization
        self.commitment_beta = commitment_beta
        self.inference_assignment = inference_assignment
        self.backbone = backbone
        self.sinkhorn_chunk_size = sinkhorn_chunk_size
        self.initializer_range = initializer_range
        unknown = sorted(k for k in kwargs if k not in _TRANSFORMERS_KEYS and not k.startswith("_"))
        if unknown:
            logger.warning(
                f"OptVQConfig got field(s) {unknown} that this version does not use; they are kept as attributes "
                f"(see the OptVQConfig docstring for the fields)"
            )
        super().__init__(**kwargs)
        self.validate_architecture()

    # ------------------------------------------------------------------ derived sizes
    @property
    def downsample_factor(self) -> int:
        """Ratio between the image side and the latent side."""
        if self.backbone == "simple_cnn":
            return 4
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def latent_resolution(self) -> int:
        return self.resolution // self.downsample_factor

    @property
    def code_dim(self) -> int:
        """Dimension of one code (= of one head's sub-vector)."""
        return self.embed_dim // self.num_heads

    # ------------------------------------------------------------------ validation
    def validate_architecture(self) -> None:
        """Raise a `ValueError` naming the field for any value that cannot build a model."""
        positive_ints = (
            "resolution",
            "in_channels",
            "out_channels",
            "base_channels",
            "num_res_blocks",
            "latent_channels",
            "embed_dim",
            "num_heads",
            "num_codes",
            "sinkhorn_iterations",
            "sinkhorn_chunk_size",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"OptVQConfig.{name} must be a positive integer, got {value!r}")
        for name, allowed in (
            ("backbone", BACKBONES),
            ("quantizer_type", QUANTIZER_TYPES),
            ("cost_normalization", COST_NORMALIZATIONS),
            ("inference_assignment", INFERENCE_ASSIGNMENTS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"OptVQConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.channel_multipliers or any(
            isinstance(m, bool) or not isinstance(m, int) or m <= 0 for m in self.channel_multipliers
        ):
            raise ValueError(
                f"OptVQConfig.channel_multipliers must be a non-empty list of positive integers, "
                f"got {self.channel_multipliers!r}"
            )
        if any(isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in self.attn_resolutions):
            raise ValueError(
                f"OptVQConfig.attn_resolutions must hold positive integers, got {self.attn_resolutions!r}"
            )
        for name in ("dropout", "sinkhorn_epsilon", "commitment_beta", "initializer_range"):
            _check_finite_number(name, getattr(self, name))
        if not isinstance(self.use_codebook_projection, bool):
            raise ValueError(
                f"OptVQConfig.use_codebook_projection must be a bool (true/false), got "
                f"{self.use_codebook_projection!r}"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"OptVQConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not float(self.sinkhorn_epsilon) > 0.0:
            raise ValueError(f"OptVQConfig.sinkhorn_epsilon must be positive, got {self.sinkhorn_epsilon!r}")
        if float(self.commitment_beta) < 0.0:
            raise ValueError(f"OptVQConfig.commitment_beta must be non-negative, got {self.commitment_beta!r}")
        if float(self.initializer_range) < 0.0:
            raise ValueError(f"OptVQConfig.initializer_range must be non-negative, got {self.initializer_range!r}")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"OptVQConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.backbone == "diffusion":
            # Every level's width is a multiple of base_channels, so this covers all GroupNorms; none acts on the
            # latent channels (original checkpoints have z_channels 16 or 48).
            if self.base_channels % NORM_GROUPS != 0:
                raise ValueError(
                    f"OptVQConfig.base_channels ({self.base_channels}) must be divisible by the {NORM_GROUPS} "
                    f"GroupNorm groups of the diffusion backbone"
                )
        elif self.base_channels % 2 != 0:
            raise ValueError(
                f"OptVQConfig.base_channels must be even for the simple_cnn backbone, got {self.base_channels}"
            )
        if self.resolution % self.downsample_factor != 0:
            raise ValueError(
                f"OptVQConfig.resolution ({self.resolution}) must be divisible by the downsampling factor "
                f"{self.downsample_factor}"
            )


def _check_finite_number(name: str, value) -> None:
    """A real number (int or float, not a bool or a string) that is finite, else a ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"OptVQConfig.{name} must be a number, got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"OptVQConfig.{name} must be finite, got {value!r}")


__all__ = ["OptVQConfig"]
