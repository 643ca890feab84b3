"""The original OptVQ network written from its formulas, applied to the original weights under their original names.

This is the reference that `--verify` compares a converted model with: it never touches diffusers or `OptVQModel`, so
it also checks the key mapping (and the 1x1-convolution -> linear reshaping) of checkpoints for which no outputs of the
original code are at hand, such as the released ImageNet models.

- `original_parameter_shapes(spec)`: every weight the original constructors create, with its shape (the key set a
  checkpoint must hold, apart from the loss modules).
- `OriginalReference(spec, state_dict)`: encode / quantize / decode / decode_code with plain `torch.nn.functional`
  calls, in float32, in the original's order of operations (the Sinkhorn scaling included, in place and with its
  `+1e-8` guards, so that its float32 rounding is the original's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .original_config import OriginalModelSpec

Shapes = dict[str, tuple[int, ...]]


# -- the original's weights -------------------------------------------------------------------------------------------
def _conv(shapes: Shapes, name: str, out_channels: int, in_channels: int, kernel: int) -> None:
    shapes[f"{name}.weight"] = (out_channels, in_channels, kernel, kernel)
    shapes[f"{name}.bias"] = (out_channels,)


def _norm(shapes: Shapes, name: str, channels: int) -> None:
    shapes[f"{name}.weight"] = (channels,)
    shapes[f"{name}.bias"] = (channels,)


def _resnet(shapes: Shapes, name: str, in_channels: int, out_channels: int) -> None:
    # The backbones pass temb_channels=0 (no timestep projection) and conv_shortcut=False (a 1x1 `nin_shortcut`).
    _norm(shapes, f"{name}.norm1", in_channels)
    _conv(shapes, f"{name}.conv1", out_channels, in_channels, 3)
    _norm(shapes, f"{name}.norm2", out_channels)
    _conv(shapes, f"{name}.conv2", out_channels, out_channels, 3)
    if in_channels != out_channels:
        _conv(shapes, f"{name}.nin_shortcut", out_channels, in_channels, 1)


def _attention(shapes: Shapes, name: str, channels: int) -> None:
    _norm(shapes, f"{name}.norm", channels)
    for part in ("q", "k", "v", "proj_out"):
        _conv(shapes, f"{name}.{part}", channels, channels, 1)


def _diffusion_encoder_shapes(shapes: Shapes, p: dict) -> int:
    ch, mult = p["ch"], list(p["ch_mult"])
    _conv(shapes, "encoder.conv_in", ch, p["in_channels"], 3)
    resolution, block_in = p["resolution"], ch
    for level, m in enumerate(mult):
        block_in = ch * ([1] + mult)[level]
        for block in range(p["num_res_blocks"]):
            _resnet(shapes, f"encoder.down.{level}.block.{block}", block_in, ch * m)
            block_in = ch * m
            if resolution in p["attn_resolutions"]:
                _attention(shapes, f"encoder.down.{level}.attn.{block}", block_in)
        if level != len(mult) - 1:
            _conv(shapes, f"encoder.down.{level}.downsample.conv", block_in, block_in, 3)
            resolution //= 2
    _resnet(shapes, "encoder.mid.block_1", block_in, block_in)
    _attention(shapes, "encoder.mid.attn_1", block_in)
    _resnet(shapes, "encoder.mid.block_2", block_in, block_in)
    _norm(shapes, "encoder.norm_out", block_in)
    out_channels = 2 * p["z_channels"] if p["double_z"] else p["z_channels"]
    _conv(shapes, "encoder.conv_out", out_channels, block_in, 3)
    return out_channels


def _diffusion_decoder_shapes(shapes: Shapes, p: dict) -> int:
    ch, mult = p["ch"], list(p["ch_mult"])
    block_in = ch * mult[-1]
    resolution = p["resolution"] // 2 ** (len(mult) - 1)
    _conv(shapes, "decoder.conv_in", block_in, p["z_channels"], 3)
    _resnet(shapes, "decoder.mid.block_1", block_in, block_in)
    _attention(shapes, "decoder.mid.attn_1", block_in)
    _resnet(shapes, "decoder.mid.block_2", block_in, block_in)
    for level in reversed(range(len(mult))):
        for block in range(p["num_res_blocks"] + 1):
            _resnet(shapes, f"decoder.up.{level}.block.{block}", block_in, ch * mult[level])
            block_in = ch * mult[level]
            if resolution in p["attn_resolutions"]:
                _attention(shapes, f"decoder.up.{level}.attn.{block}", block_in)
        if level != 0:
            _conv(shapes, f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
            resolution *= 2
    _norm(shapes, "decoder.norm_out", block_in)
    _conv(shapes, "decoder.conv_out", p["out_ch"], block_in, 3)
    return p["z_channels"]


def _simple_cnn_shapes(shapes: Shapes, encoder: dict, decoder: dict) -> tuple[int, int]:
    _conv(shapes, "encoder.in_fc", 16, encoder["in_dim"], 3)
    _conv(shapes, "encoder.down1", 16, 16, 2)
    _conv(shapes, "encoder.conv1", 16, 16, 3)
    _conv(shapes, "encoder.down2", 16, 16, 2)
    _conv(shapes, "encoder.conv2", 32, 16, 3)
    _conv(shapes, "encoder.out_fc", 32, 32, 3)
    _conv(shapes, "decoder.in_fc", 32, 32, 3)
    shapes["decoder.up1.weight"], shapes["decoder.up1.bias"] = (
        (32, 16, 2, 2),
        (16,),
    )  # ConvTranspose2d: (in, out, k, k)
    _conv(shapes, "decoder.conv1", 16, 16, 3)
    shapes["decoder.up2.weight"], shapes["decoder.up2.bias"] = (16, 16, 2, 2), (16,)
    _conv(shapes, "decoder.conv2", 16, 16, 3)
    _conv(shapes, "decoder.out_fc", decoder["out_dim"], 16, 3)
    return 32, 32


def original_parameter_shapes(spec: OriginalModelSpec) -> Shapes:
    """Every weight of the original `VQModel` except the loss modules, by original name, with its shape."""
    shapes: Shapes = {}
    if spec.backbone == "diffusion":
        encoder_dim = _diffusion_encoder_shapes(shapes, spec.encoder)
        decoder_dim = _diffusion_decoder_shapes(shapes, spec.decoder)
    else:
        encoder_dim, decoder_dim = _simple_cnn_shapes(shapes, spec.encoder, spec.decoder)
    q = spec.quantizer
    embed_dim = q["e_dim"]
    code_dim = embed_dim // q["num_head"]
    if spec.use_connector:
        _conv(shapes, "quant_conv", embed_dim, encoder_dim, 1)
        _conv(shapes, "post_quant_conv", decoder_dim, embed_dim, 1)
    shapes["quantize.embedding.weight"] = (q["n_e"], code_dim)
    if q["use_proj"]:
        shapes["quantize.proj.weight"] = (code_dim, code_dim)
        shapes["quantize.proj.bias"] = (code_dim,)
    return shapes


def random_original_state_dict(spec: OriginalModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """
    Random weights in the original layout of `spec` (original names and shapes), scaled like a trained network's
    (convolutions ~ N(0, 1/fan_in), norms near 1, codes ~ N(0, 1)): to check the conversion of an architecture whose
    weights are not at hand, such as the released ImageNet models.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in original_parameter_shapes(spec).items():
        noise = torch.randn(shape, generator=generator)
        if name == "quantize.embedding.weight":
            weights[name] = noise
        elif len(shape) == 1:
            is_norm_scale = name.endswith(".weight")
            weights[name] = 1.0 + 0.1 * noise if is_norm_scale else 0.05 * noise
        else:
            weights[name] = noise / math.sqrt(math.prod(shape[1:]))  # a scale only: exact fan-in does not matter
    return weights


# -- the original's forward pass --------------------------------------------------------------------------------------
def original_sinkhorn(cost: torch.Tensor, iterations: int, epsilon: float, guard: float = 1e-8) -> torch.Tensor:
    """
    The original `sinkhorn(cost, n_iters, epsilon)` (single process), in the dtype of `cost`: scaling in place, every
    mass divided by `mass + guard` (the original's `+ 1e-8`; `guard=0` gives the guard-free Sinkhorn-Knopp). In
    float32 its rounding is the original's; in float64 it is the exact reference the solver is tested against.
    """
    plan = torch.exp(-cost * epsilon).t()  # (K, N)
    num_codes, num_rows = plan.shape
    plan /= plan.sum() + guard
    for _ in range(iterations):
        plan /= plan.sum(dim=1, keepdim=True) + guard
        plan /= num_codes
        plan /= plan.sum(dim=0, keepdim=True) + guard
        plan /= num_rows
    plan *= num_rows
    return plan.t()


def normalize_cost(distances: torch.Tensor, mode: str, code_dim: int) -> torch.Tensor:
    """The original cost normalisation: "all" standardises by the whole matrix and subtracts the minimum."""
    if mode == "all":
        normalized = (distances - distances.mean()) / (distances.std() + 1e-6)
        return normalized - normalized.min()
    if mode == "dim":
        return distances / math.sqrt(code_dim)
    return distances  # "null" / "none"


def original_indices(
    rows: torch.Tensor,
    codes: torch.Tensor,
    epsilon: float = 10.0,
    iterations: int = 5,
    mode: str = "all",
    guard: float = 1e-8,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """
    Argmax of the original plan for (N, d) rows and (K, d) codes: float32 `cdist` distances (as the original and the
    quantizer compute them), everything after them in `dtype` (float64: the exact reference; float32: the original's
    own arithmetic).
    """
    distances = torch.cdist(rows.float(), codes.float()).to(dtype)
    cost = normalize_cost(distances, mode, codes.shape[1])
    return original_sinkhorn(cost, iterations, epsilon, guard).argmax(dim=1)


class OriginalReference:
    """
    The original `VQModel` in eval mode, as plain functions of its state dict (original key names, no wrappers).

    Args:
        spec: the original configuration.
        state_dict: the model weights (loss weights may be present; they are not used).
    """

    def __init__(self, spec: OriginalModelSpec, state_dict: dict[str, torch.Tensor]):
        self.spec = spec
        self.w = {k: v.float() for k, v in state_dict.items() if not k.startswith("loss.")}
        q = spec.quantizer
        self.num_heads, self.code_dim = q["num_head"], q["e_dim"] // q["num_head"]

    # -- building blocks (taming-transformers) ------------------------------------------------------------------------
    def _conv(self, name: str, x: torch.Tensor, stride: int = 1, padding: int | None = None) -> torch.Tensor:
        weight = self.w[f"{name}.weight"]
        pad = weight.shape[-1] // 2 if padding is None else padding
        return F.conv2d(x, weight, self.w[f"{name}.bias"], stride=stride, padding=pad)

    def _norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, 32, self.w[f"{name}.weight"], self.w[f"{name}.bias"], eps=1e-6)

    @staticmethod
    def _swish(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)

    def _resnet(self, name: str, x: torch.Tensor) -> torch.Tensor:
        h = self._conv(f"{name}.conv1", self._swish(self._norm(f"{name}.norm1", x)))
        h = self._conv(f"{name}.conv2", self._swish(self._norm(f"{name}.norm2", h)))  # dropout: identity in eval
        if f"{name}.nin_shortcut.weight" in self.w:
            x = self._conv(f"{name}.nin_shortcut", x)
        return x + h

    def _attention(self, name: str, x: torch.Tensor) -> torch.Tensor:
        h = self._norm(f"{name}.norm", x)
        q, k, v = (self._conv(f"{name}.{part}", h) for part in ("q", "k", "v"))
        batch, channels, height, width = q.shape
        q = q.reshape(batch, channels, height * width).permute(0, 2, 1)  # (b, hw, c)
        weights = torch.bmm(q, k.reshape(batch, channels, height * width)) * channels**-0.5
        weights = torch.softmax(weights, dim=2)  # (b, hw of q, hw of k)
        h = torch.bmm(v.reshape(batch, channels, height * width), weights.permute(0, 2, 1))
        return x + self._conv(f"{name}.proj_out", h.reshape(batch, channels, height, width))

    def _middle(self, module: str, h: torch.Tensor) -> torch.Tensor:
        h = self._resnet(f"{module}.mid.block_1", h)
        return self._resnet(f"{module}.mid.block_2", self._attention(f"{module}.mid.attn_1", h))

    @staticmethod
    def _attends(params: dict, level: int) -> bool:
        """Whether a level has attention: its feature side (the same in the encoder and decoder) is listed."""
        return params["resolution"] // 2**level in params["attn_resolutions"]

    # -- backbones ----------------------------------------------------------------------------------------------------
    def _diffusion_encoder(self, x: torch.Tensor) -> torch.Tensor:
        p = self.spec.encoder
        levels = len(p["ch_mult"])
        h = self._conv("encoder.conv_in", x)
        for level in range(levels):
            prefix = f"encoder.down.{level}"
            for block in range(p["num_res_blocks"]):
                h = self._resnet(f"{prefix}.block.{block}", h)
                if self._attends(p, level):
                    h = self._attention(f"{prefix}.attn.{block}", h)
            if level != levels - 1:
                h = self._conv(f"{prefix}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
        h = self._middle("encoder", h)
        return self._conv("encoder.conv_out", self._swish(self._norm("encoder.norm_out", h)))

    def _diffusion_decoder(self, z: torch.Tensor) -> torch.Tensor:
        p = self.spec.decoder
        h = self._conv("decoder.conv_in", z)
        h = self._middle("decoder", h)
        for level in reversed(range(len(p["ch_mult"]))):
            prefix = f"decoder.up.{level}"
            for block in range(p["num_res_blocks"] + 1):
                h = self._resnet(f"{prefix}.block.{block}", h)
                if self._attends(p, level):
                    h = self._attention(f"{prefix}.attn.{block}", h)
            if level != 0:
                h = self._conv(f"{prefix}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self._conv("decoder.conv_out", self._swish(self._norm("decoder.norm_out", h)))

    def _simple_encoder(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self._conv("encoder.in_fc", x))
        h = F.relu(self._conv("encoder.conv1", self._conv("encoder.down1", h, stride=2, padding=0)))
        h = F.relu(self._conv("encoder.conv2", self._conv("encoder.down2", h, stride=2, padding=0)))
        return self._conv("encoder.out_fc", h)

    def _simple_decoder(self, z: torch.Tensor) -> torch.Tensor:
        def up(name: str, x: torch.Tensor) -> torch.Tensor:
            return F.conv_transpose2d(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"], stride=2)

        h = self._conv("decoder.in_fc", z)
        h = self._conv("decoder.conv1", up("decoder.up1", F.relu(h)))
        h = self._conv("decoder.conv2", up("decoder.up2", F.relu(h)))
        return self._conv("decoder.out_fc", F.relu(h))

    # -- the model ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`quant_conv(encoder(x))`."""
        encoder = self._diffusion_encoder if self.spec.backbone == "diffusion" else self._simple_encoder
        return self._conv("quant_conv", encoder(pixel_values.float()))

    def codebook(self) -> torch.Tensor:
        embedding = self.w["quantize.embedding.weight"]
        if "quantize.proj.weight" in self.w:
            return F.linear(embedding, self.w["quantize.proj.weight"], self.w["quantize.proj.bias"])
        return embedding

    @torch.no_grad()
    def quantize(self, latents: torch.Tensor, assignment: str) -> tuple[torch.Tensor, torch.Tensor]:
        """
        (quantized (B, C, H, W), indices (B, num_heads, H, W)) with `assignment` "sinkhorn" (the original
        `VectorQuantizerSinkhorn` with use_prob false: argmax of the plan over the batch) or "nearest" (the original
        `VectorQuantizer`: argmin of the distances).
        """
        batch, channels, height, width = latents.shape
        rows = latents.permute(0, 2, 3, 1).reshape(-1, self.code_dim)  # heads of a position are adjacent
        codes = self.codebook()
        distances = torch.cdist(rows, codes, p=2.0)
        if assignment == "sinkhorn":
            q = self.spec.quantizer
            cost = normalize_cost(distances, q["normalize_mode"], codes.shape[1])
            indices = original_sinkhorn(cost, q["n_iters"], q["epsilon"]).argmax(dim=-1)
        elif assignment == "nearest":
            indices = distances.argmin(dim=-1)
        else:
            raise ValueError(f"assignment must be 'sinkhorn' or 'nearest', got {assignment!r}")
        quantized = codes[indices].reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        indices = indices.reshape(batch, height, width, self.num_heads).permute(0, 3, 1, 2)
        return quantized.contiguous(), indices.contiguous()

    @torch.no_grad()
    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """`decoder(post_quant_conv(quantized))`."""
        decoder = self._diffusion_decoder if self.spec.backbone == "diffusion" else self._simple_decoder
        return decoder(self._conv("post_quant_conv", quantized.float()))

    @torch.no_grad()
    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        """The original `decode_code`: indices (B, num_heads, H, W) -> codes -> decoder."""
        batch, heads, height, width = indices.shape
        codes = self.codebook()[indices.reshape(batch, -1)]  # (B, nH * H * W, d), head-major as the original flattens
        codes = codes.reshape(batch, heads, height * width, -1).permute(0, 2, 1, 3).reshape(batch, height * width, -1)
        quantized = codes.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        return self.decode(quantized)


__all__ = [
    "OriginalReference",
    "normalize_cost",
    "original_indices",
    "original_parameter_shapes",
    "original_sinkhorn",
    "random_original_state_dict",
]
