"""OptVQ: a VQGAN-style image tokenizer whose quantizer assigns features to codes by optimal transport.

    pixels -> encoder -> quant_conv (1x1) -> quantizer -> post_quant_conv (1x1) -> decoder -> reconstruction

The encoder and decoder are diffusers' autoencoder blocks (the taming-transformers / latent-diffusion architecture),
or the small plain CNN of the original MNIST / CIFAR-10 setups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_optvq import NORM_GROUPS, OptVQConfig
from .quantization import SinkhornQuantizer, VectorQuantizer, all_finite, checks_tensor_values

try:  # transformers >= 5: initialisers that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4.x
    init = nn.init


@dataclass
class OptVQEncoderOutput(ModelOutput):
    """
    Args:
        latents (`torch.FloatTensor` of shape `(batch, embed_dim, h, w)`): features before quantization
            (after `quant_conv`).
        quantized (`torch.FloatTensor` of shape `(batch, embed_dim, h, w)`): quantized features (straight-through).
        indices (`torch.LongTensor` of shape `(batch, num_heads, h, w)`): code index of each head at each position.
        quantizer_loss (`torch.FloatTensor`): scalar commitment + codebook loss.
    """

    latents: torch.FloatTensor | None = None
    quantized: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    quantizer_loss: torch.FloatTensor | None = None


@dataclass
class OptVQDecoderOutput(ModelOutput):
    """
    Args:
        sample (`torch.FloatTensor` of shape `(batch, out_channels, height, width)`): decoded images in [-1, 1]
            (not clamped).
    """

    sample: torch.FloatTensor | None = None


@dataclass
class OptVQModelOutput(ModelOutput):
    """
    Args:
        reconstruction (`torch.FloatTensor` of shape `(batch, out_channels, height, width)`): decoded images.
        indices (`torch.LongTensor` of shape `(batch, num_heads, h, w)`): code indices.
        quantizer_loss (`torch.FloatTensor`): scalar commitment + codebook loss.
        quantized (`torch.FloatTensor` of shape `(batch, embed_dim, h, w)`): quantized features.
    """

    reconstruction: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    quantizer_loss: torch.FloatTensor | None = None
    quantized: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------------------------------
def _level_resolutions(config: OptVQConfig) -> list[int]:
    return [config.resolution // 2**level for level in range(len(config.channel_multipliers))]


def build_diffusion_encoder(config: OptVQConfig) -> Encoder:
    """The taming-transformers encoder from diffusers' blocks (attention where `attn_resolutions` says)."""
    block_types = [
        "AttnDownEncoderBlock2D" if res in config.attn_resolutions else "DownEncoderBlock2D"
        for res in _level_resolutions(config)
    ]
    encoder = Encoder(
        in_channels=config.in_channels,
        out_channels=config.latent_channels,
        down_block_types=tuple(block_types),
        block_out_channels=tuple(config.base_channels * m for m in config.channel_multipliers),
        layers_per_block=config.num_res_blocks,
        norm_num_groups=NORM_GROUPS,
        act_fn="silu",
        double_z=False,
        mid_block_add_attention=True,
    )
    _set_resnet_dropout(encoder, config.dropout)
    return encoder


def build_diffusion_decoder(config: OptVQConfig) -> Decoder:
    """The taming-transformers decoder from diffusers' blocks (diffusers orders up blocks from low resolution)."""
    block_types = [
        "AttnUpDecoderBlock2D" if res in config.attn_resolutions else "UpDecoderBlock2D"
        for res in reversed(_level_resolutions(config))
    ]
    decoder = Decoder(
        in_channels=config.latent_channels,
        out_channels=config.out_channels,
        up_block_types=tuple(block_types),
        block_out_channels=tuple(config.base_channels * m for m in config.channel_multipliers),
        layers_per_block=config.num_res_blocks,
        norm_num_groups=NORM_GROUPS,
        act_fn="silu",
        mid_block_add_attention=True,
    )
    _set_resnet_dropout(decoder, config.dropout)
    return decoder


def _set_resnet_dropout(module: nn.Module, probability: float) -> None:
    # diffusers' Encoder/Decoder do not expose the ResNet blocks' dropout; the original taming blocks do.
    for block in module.modules():
        if isinstance(block, ResnetBlock2D):
            block.dropout.p = float(probability)


class SimpleCNNEncoder(nn.Module):
    """The plain CNN encoder of the original MNIST / CIFAR-10 setups: two stride-2 convolutions, ReLU, no norm."""

    def __init__(self, config: OptVQConfig):
        super().__init__()
        narrow, wide = config.base_channels // 2, config.base_channels
        self.in_fc = nn.Conv2d(config.in_channels, narrow, 3, padding=1)
        self.down1 = nn.Conv2d(narrow, narrow, 2, stride=2)
        self.conv1 = nn.Conv2d(narrow, narrow, 3, padding=1)
        self.down2 = nn.Conv2d(narrow, narrow, 2, stride=2)
        self.conv2 = nn.Conv2d(narrow, wide, 3, padding=1)
        self.out_fc = nn.Conv2d(wide, config.latent_channels, 3, padding=1)
        self.act = nn.ReLU()
        self.gradient_checkpointing = (
            False  # set by `activation_checkpointing_enable` / `gradient_checkpointing_enable`
        )

    def _level1(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv1(self.down1(self.act(self.in_fc(x)))))

    def _level2(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_fc(self.act(self.conv2(self.down2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(self._level2, self._gradient_checkpointing_func(self._level1, x))
        return self._level2(self._level1(x))


class SimpleCNNDecoder(nn.Module):
    """The plain CNN decoder of the original MNIST / CIFAR-10 setups (transposed convolutions)."""

    def __init__(self, config: OptVQConfig):
        super().__init__()
        narrow, wide = config.base_channels // 2, config.base_channels
        self.in_fc = nn.Conv2d(config.latent_channels, wide, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(wide, narrow, 2, stride=2)
        self.conv1 = nn.Conv2d(narrow, narrow, 3, padding=1)
        self.up2 = nn.ConvTranspose2d(narrow, narrow, 2, stride=2)
        self.conv2 = nn.Conv2d(narrow, narrow, 3, padding=1)
        self.out_fc = nn.Conv2d(narrow, config.out_channels, 3, padding=1)
        self.act = nn.ReLU()
        self.gradient_checkpointing = (
            False  # set by `activation_checkpointing_enable` / `gradient_checkpointing_enable`
        )

    @property
    def conv_out(self) -> nn.Conv2d:
        """The last layer, under the name diffusers' decoder uses (the adaptive GAN weight reads its gradient)."""
        return self.out_fc

    def _level1(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.up1(self.act(self.in_fc(z))))

    def _level2(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_fc(self.act(self.conv2(self.up2(self.act(x)))))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(self._level2, self._gradient_checkpointing_func(self._level1, z))
        return self._level2(self._level1(z))


def build_quantizer(config: OptVQConfig) -> VectorQuantizer:
    common = dict(
        num_codes=config.num_codes,
        embed_dim=config.embed_dim,
        num_heads=config.num_heads,
        use_projection=config.use_codebook_projection,
        beta=config.commitment_beta,
        chunk_size=config.sinkhorn_chunk_size,
    )
    if config.quantizer_type == "vq":
        return VectorQuantizer(**common)
    return SinkhornQuantizer(
        epsilon=config.sinkhorn_epsilon,
        iterations=config.sinkhorn_iterations,
        cost_normalization=config.cost_normalization,
        inference_assignment=config.inference_assignment,
        **common,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------
class OptVQPreTrainedModel(PreTrainedModel):
    config_class = OptVQConfig
    base_model_prefix = "optvq"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    # Sinkhorn under- and overflows in half precision: the codebook and the assignment stay float32.
    _keep_in_fp32_modules_strict = ["quantizer"]
    _no_split_modules = ["ResnetBlock2D", "Attention"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default initialisation, which the original uses, and the original's codebook initialisation.

        Decided per leaf module: transformers skips a container whose own (non-recursive) parameters are all loaded,
        which for a parameter-less container like the quantizer would skip its missing codebook.
        """
        quantizer = getattr(self, "quantizer", None)
        if isinstance(module, nn.Embedding):  # the codebook: N(0, 1), as nn.Embedding and the original
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif quantizer is not None and module is getattr(quantizer, "proj", None):
            init.normal_(module.weight, mean=0.0, std=quantizer.code_dim**-0.5)
            _uniform_fan_in(module.bias, quantizer.code_dim)
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                _uniform_fan_in(module.bias, module.weight[0].numel())  # fan-in as torch computes it for all three
        elif isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


def _uniform_fan_in(tensor: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    init.uniform_(tensor, -bound, bound)


class OptVQModel(OptVQPreTrainedModel):
    """
    The OptVQ autoencoder. Images are float tensors in [-1, 1] of shape (B, in_channels, H, W) with H and W multiples
    of `config.downsample_factor`; each latent position carries `config.num_heads` indices in [0, num_codes).

    Example:

    ```python
    >>> import torch
    >>> from optvq_hf import OptVQConfig, OptVQModel
    >>> model = OptVQModel(OptVQConfig(resolution=32, base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
    ...                                attn_resolutions=(), latent_channels=32, embed_dim=32, num_codes=64)).eval()
    >>> images = torch.rand(2, 3, 32, 32) * 2 - 1
    >>> encoded = model.encode(images)
    >>> encoded.indices.shape
    torch.Size([2, 4, 16, 16])
    >>> model.decode_indices(encoded.indices).sample.shape
    torch.Size([2, 3, 32, 32])
    ```
    """

    def __init__(self, config: OptVQConfig):
        super().__init__(config)
        if config.backbone == "simple_cnn":
            self.encoder = SimpleCNNEncoder(config)
            self.decoder = SimpleCNNDecoder(config)
        else:
            self.encoder = build_diffusion_encoder(config)
            self.decoder = build_diffusion_decoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        self.quantizer = build_quantizer(config)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.post_init()

    # -- input checks -------------------------------------------------------------------------------------------------
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must have shape (batch, channels, height, width), got shape {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels, the model expects {self.config.in_channels} "
                f"(shape {tuple(pixel_values.shape)}; channels come first)"
            )
        factor = self.config.downsample_factor
        height, width = pixel_values.shape[-2:]
        if pixel_values.shape[0] == 0 or height == 0 or width == 0:
            raise ValueError(
                f"pixel_values is empty (shape {tuple(pixel_values.shape)}): pass at least one image of at least "
                f"{factor}x{factor} pixels"
            )
        if height % factor or width % factor:
            raise ValueError(
                f"pixel_values height and width ({height}x{width}) must be multiples of the downsampling factor "
                f"{factor}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a floating-point tensor in [-1, 1], got dtype {pixel_values.dtype} "
                f"(use OptVQImageProcessor to convert images)"
            )
        if not checks_tensor_values():  # value checks stay out of compiled, exported and traced graphs
            return
        low, high = (float(v) for v in torch.aminmax(pixel_values.detach()))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("pixel_values contains NaN or Inf")
        if low < -1.001 or high > 1.001:
            raise ValueError(
                f"pixel_values must lie in [-1, 1], got values in [{low:.4g}, {high:.4g}] "
                f"(use OptVQImageProcessor, or map [0, 1] images with x * 2 - 1)"
            )

    def _check_quantized(self, quantized: torch.Tensor) -> None:
        if not isinstance(quantized, torch.Tensor) or quantized.ndim != 4:
            shape = tuple(quantized.shape) if isinstance(quantized, torch.Tensor) else type(quantized).__name__
            raise ValueError(f"quantized must have shape (batch, embed_dim, h, w), got {shape}")
        if quantized.shape[1] != self.config.embed_dim:
            raise ValueError(
                f"quantized has {quantized.shape[1]} channels, the model expects embed_dim={self.config.embed_dim}"
            )
        if not quantized.is_floating_point():
            raise ValueError(f"quantized must be a floating-point tensor, got dtype {quantized.dtype}")
        if quantized.numel() == 0:
            raise ValueError(f"quantized is empty (shape {tuple(quantized.shape)}): pass at least one 1x1 latent")
        # Eager-only value check (a host sync): compile, tracing and export skip it.
        if checks_tensor_values() and not all_finite(quantized):
            raise ValueError("quantized contains NaN or Inf: decode finite latents (e.g. from encode)")

    # -- public API ---------------------------------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int]:
        """(h, w) of the latent grid for images of the configured resolution."""
        return (self.config.latent_resolution, self.config.latent_resolution)

    def get_last_layer(self) -> torch.Tensor:
        """Weight of the decoder's last convolution (the adaptive GAN weight compares gradient norms there)."""
        return self.decoder.conv_out.weight

    def encode(self, pixel_values: torch.Tensor, return_dict: bool = True) -> OptVQEncoderOutput | tuple:
        """Encode images in [-1, 1] to latents, quantized latents and code indices."""
        self._check_pixel_values(pixel_values)
        hidden = self.encoder(pixel_values.to(self.quant_conv.weight.dtype))
        latents = self.quant_conv(hidden)
        quantizer_output = self.quantizer(latents)
        output = OptVQEncoderOutput(
            latents=latents,
            quantized=quantizer_output.quantized,
            indices=quantizer_output.indices,
            quantizer_loss=quantizer_output.loss,
        )
        return output if return_dict else output.to_tuple()

    def decode(self, quantized: torch.Tensor, return_dict: bool = True) -> OptVQDecoderOutput | tuple:
        """Decode quantized latents (B, embed_dim, h, w) to images."""
        self._check_quantized(quantized)
        hidden = self.post_quant_conv(quantized.to(self.post_quant_conv.weight.dtype))
        sample = self.decoder(hidden)
        return OptVQDecoderOutput(sample=sample) if return_dict else (sample,)

    def decode_indices(self, indices: torch.Tensor, return_dict: bool = True) -> OptVQDecoderOutput | tuple:
        """Decode code indices (B, num_heads, h, w), as returned by `encode`, to images."""
        if not isinstance(indices, torch.Tensor) or indices.ndim != 4 or indices.shape[1] != self.config.num_heads:
            shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(f"indices must have shape (batch, num_heads={self.config.num_heads}, h, w), got {shape}")
        quantized = self.quantizer.lookup(indices)  # on the codebook's device (under offload, the execution device)
        return self.decode(quantized, return_dict=return_dict)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True) -> OptVQModelOutput | tuple:
        """Encode, quantize and decode; returns the reconstruction, the indices and the quantizer loss."""
        encoded = self.encode(pixel_values)
        reconstruction = self.decode(encoded.quantized).sample
        output = OptVQModelOutput(
            reconstruction=reconstruction,
            indices=encoded.indices,
            quantizer_loss=encoded.quantizer_loss,
            quantized=encoded.quantized,
        )
        return output if return_dict else output.to_tuple()

    # -- tokens for sequence models (layouts documented in optvq_hf/tokens.py) ----------------------------------------
    def token_layout(
        self, order: str = "position-major", vocabulary: str = "shared", latent_shape: tuple[int, int] | None = None
    ) -> TokenLayout:  # noqa: F821 - imported in the body (a module-level import would do as well)
        """The `TokenLayout` of this model's indices (`latent_shape` defaults to the configured resolution's grid)."""
        from .tokens import TokenLayout  # relative: copied into saved folders for trust_remote_code

        shape = self.latent_shape if latent_shape is None else latent_shape
        return TokenLayout(self.config.num_codes, self.config.num_heads, shape, order=order, vocabulary=vocabulary)

    @property
    def vocab_size(self) -> int:
        """Token ids of the default `"shared"` vocabulary (= num_codes); see `get_vocab_size` for per-head offsets."""
        return self.get_vocab_size("shared")

    def get_vocab_size(self, vocabulary: str = "shared") -> int:
        """Token ids of a vocabulary: num_codes (`"shared"`) or num_heads * num_codes (`"per-head"`)."""
        return self.token_layout(vocabulary=vocabulary).vocab_size

    @property
    def tokens_per_image(self) -> int:
        """Tokens of one image at the configured resolution: num_heads * h * w (either order, either vocabulary)."""
        return self.token_layout().sequence_length

    @torch.no_grad()
    def tokenize(
        self, pixel_values: torch.Tensor, order: str = "position-major", vocabulary: str = "shared"
    ) -> torch.LongTensor:
        """
        Images in [-1, 1] (B, C, H, W) -> token ids (B, num_heads * h * w). Always tokenizes in eval mode (the model is
        switched to eval for the call and back): in training mode the quantizer assigns by Sinkhorn over the batch, so
        the tokens of an image would depend on the other images of the batch.
        """
        was_training = self.training
        self.eval()
        try:
            indices = self.encode(pixel_values).indices
        finally:
            self.train(was_training)
        return self.token_layout(order, vocabulary, tuple(indices.shape[-2:])).to_tokens(indices)

    def detokenize(
        self,
        token_ids: torch.Tensor,
        order: str = "position-major",
        vocabulary: str = "shared",
        latent_shape: tuple[int, int] | None = None,
    ) -> torch.FloatTensor:
        """
        Token ids (B, L) from `tokenize` (same order and vocabulary) -> images (B, out_channels, H, W), in [-1, 1] up
        to the decoder's overshoot (not clamped). `latent_shape` (h, w) is needed only for images whose size differs
        from `config.resolution`.
        """
        indices = self.token_layout(order, vocabulary, latent_shape).to_indices(token_ids)
        return self.decode_indices(indices).sample


__all__ = [
    "OptVQDecoderOutput",
    "OptVQEncoderOutput",
    "OptVQModel",
    "OptVQModelOutput",
    "OptVQPreTrainedModel",
]
