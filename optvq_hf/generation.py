"""
Autoregressive generators over OptVQ tokens, with classifier-free guidance (CFG) as in LlamaGen.

`TokenGenerator` is a transformers `LlamaModel` (KV cache, `save_pretrained` / `from_pretrained`) that predicts
`codes_per_step` indices per step from one hidden state, with one output head per index of a step:

- position-level (`codes_per_step = num_heads`): one step per latent position; the step's input embedding is the sum
  of its heads' code embeddings (head j has its own embedding table), so a 16x16x4 image is 256 steps, not 1024;
- flat (`codes_per_step = 1`): one token per step (position-major order, shared vocabulary), num_heads * h * w steps.

Within a position the heads are sampled independently given the hidden state: p(c_1..c_H | past) is modelled as
prod_j p(c_j | past). The loss `nats_per_position` (summed over a position's heads) is comparable between the two
modes: a flat model's is num_heads times its mean per-token loss.

The sequence is `[class] e_1 ... e_{S-1}` -> predictions of steps 1..S; the class embedding has one extra row, the null
class (index `num_classes`), to which labels are dropped with probability `class_dropout` in training; sampling with
`cfg_scale` runs the conditional and the null-class branch in one batched forward per step and samples from
`cond + (cfg_scale - 1) * (cond - uncond)` (= `uncond + cfg_scale * (cond - uncond)`), after which temperature, top-k
and top-p (transformers' logits warpers) apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaModel, PretrainedConfig, PreTrainedModel
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.utils import ModelOutput


class TokenGeneratorConfig(PretrainedConfig):
    """
    Args:
        num_codes (`int`): codes per quantizer head (the size of each output head).
        codes_per_step (`int`): indices predicted per step: the tokenizer's num_heads (position-level) or 1 (flat).
        num_steps (`int`): steps per image: h * w (position-level) or num_heads * h * w (flat).
        num_classes (`int`): classes of the condition (0: unconditional; a null class is always added for CFG).
        class_dropout (`float`): probability of replacing a label by the null class in training.
        hidden_size, num_layers, num_attention_heads, intermediate_size: the Llama decoder.
        heads_per_position (`int`): the tokenizer's num_heads (default codes_per_step); scales `nats_per_position`.
    """

    model_type = "optvq_token_generator"

    def __init__(
        self,
        num_codes: int = 64,
        codes_per_step: int = 1,
        num_steps: int = 16,
        num_classes: int = 10,
        class_dropout: float = 0.1,
        hidden_size: int = 128,
        num_layers: int = 3,
        num_attention_heads: int = 4,
        intermediate_size: int | None = None,
        heads_per_position: int | None = None,
        **kwargs,
    ):
        for name, value in (
            ("num_codes", num_codes),
            ("codes_per_step", codes_per_step),
            ("num_steps", num_steps),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("num_attention_heads", num_attention_heads),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TokenGeneratorConfig.{name} must be a positive int, got {value!r}")
        if num_classes < 0:
            raise ValueError(f"TokenGeneratorConfig.num_classes must be >= 0, got {num_classes}")
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"TokenGeneratorConfig.class_dropout must be in [0, 1), got {class_dropout}")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size {hidden_size} must be divisible by num_attention_heads {num_attention_heads}"
            )
        self.num_codes = num_codes
        self.codes_per_step = codes_per_step
        self.num_steps = num_steps
        self.num_classes = num_classes
        self.class_dropout = class_dropout
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.heads_per_position = heads_per_position or codes_per_step
        super().__init__(**kwargs)

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=1,  # inputs are embeddings built by TokenGenerator; the token table is unused
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=self.num_steps,
            attn_implementation="sdpa",
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )


@dataclass
class TokenGeneratorOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor`): mean cross-entropy per predicted index (the training objective).
        nats_per_position (`torch.FloatTensor`): loss summed over a latent position's heads (comparable across modes).
        logits (`torch.FloatTensor` of shape `(batch, num_steps, codes_per_step, num_codes)`).
    """

    loss: torch.FloatTensor | None = None
    nats_per_position: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


class TokenGenerator(PreTrainedModel):
    config_class = TokenGeneratorConfig
    base_model_prefix = "generator"
    _supports_sdpa = True

    def __init__(self, config: TokenGeneratorConfig):
        super().__init__(config)
        self.backbone = LlamaModel(config.llama_config())
        self.class_embedding = nn.Embedding(config.num_classes + 1, config.hidden_size)  # last row: the null class
        # one table per index of a step, stored as one table with offsets head * num_codes
        self.code_embedding = nn.Embedding(config.codes_per_step * config.num_codes, config.hidden_size)
        self.position_embedding = nn.Embedding(config.num_steps, config.hidden_size)
        self.output_heads = nn.Linear(config.hidden_size, config.codes_per_step * config.num_codes, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
        elif hasattr(module, "weight") and module.weight is not None:  # RMSNorm
            module.weight.data.fill_(1.0)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def embed_codes(self, codes: torch.LongTensor) -> torch.FloatTensor:
        """(B, S, codes_per_step) indices -> (B, S, hidden): the sum of the step's code embeddings."""
        offsets = torch.arange(self.config.codes_per_step, device=codes.device) * self.config.num_codes
        return self.code_embedding(codes + offsets).sum(dim=2)

    def head_logits(self, hidden: torch.FloatTensor) -> torch.FloatTensor:
        return self.output_heads(hidden).unflatten(-1, (self.config.codes_per_step, self.config.num_codes))

    def forward(self, codes: torch.LongTensor, labels: torch.LongTensor | None = None) -> TokenGeneratorOutput:
        """Teacher-forced logits and losses for `codes` (B, num_steps, codes_per_step) and class `labels` (B,)."""
        batch, steps, per_step = codes.shape
        if steps != self.config.num_steps or per_step != self.config.codes_per_step:
            raise ValueError(
                f"codes must be (batch, {self.config.num_steps}, {self.config.codes_per_step}), "
                f"got {tuple(codes.shape)}"
            )
        if labels is None:
            labels = torch.full((batch,), self.null_class, dtype=torch.long, device=codes.device)
        elif self.training and self.config.class_dropout > 0:
            drop = torch.rand(batch, device=codes.device) < self.config.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        inputs = torch.cat([self.class_embedding(labels)[:, None], self.embed_codes(codes[:, :-1])], dim=1)
        inputs = inputs + self.position_embedding.weight[:steps]
        hidden = self.backbone(inputs_embeds=inputs, use_cache=False).last_hidden_state
        logits = self.head_logits(hidden)
        per_index = nn.functional.cross_entropy(logits.flatten(0, 2), codes.flatten(), reduction="none")
        loss = per_index.mean()
        return TokenGeneratorOutput(loss=loss, nats_per_position=self.nats_per_position(loss), logits=logits)

    def nats_per_position(self, loss: torch.Tensor) -> torch.Tensor:
        """Mean loss per index -> nats per latent position (`heads_per_position` indices per position)."""
        return loss * self.config.heads_per_position


def process_logits(logits: torch.FloatTensor, temperature: float, top_k: int, top_p: float) -> torch.FloatTensor:
    """Temperature, then top-k (0: off), then top-p (1.0: off) with transformers' warpers; logits (N, V)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got top_k={top_k}, top_p={top_p}")
    if temperature != 1.0:
        logits = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p)(None, logits)
    return logits


@torch.no_grad()
def sample_codes(
    model: TokenGenerator,
    labels: torch.LongTensor | None,
    num_samples: int | None = None,
    *,
    cfg_scale: float | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    """
    Sample (B, num_steps, codes_per_step) indices step by step with the KV cache.

    `labels` (B,) classes (None: unconditional, the null class, `num_samples` images). `cfg_scale` None samples the
    conditional model alone; a float runs the null-class branch in the same forward (batch 2B) and combines the
    logits as `cond + (cfg_scale - 1) * (cond - uncond)`, so `cfg_scale=1` gives exactly the conditional logits.
    The heads of a step are sampled independently from their own distributions.
    """
    config = model.config
    device = model.device
    if labels is None:
        if num_samples is None:
            raise ValueError("pass labels or num_samples")
        labels = torch.full((num_samples,), model.null_class, dtype=torch.long)
    labels = labels.to(device).long()
    batch = labels.shape[0]
    guided = cfg_scale is not None
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, model.null_class)])
    cache = DynamicCache()
    inputs = model.class_embedding(labels)[:, None] + model.position_embedding.weight[:1]
    steps = []
    for step in range(config.num_steps):
        hidden = model.backbone(inputs_embeds=inputs, cache=cache, use_cache=True).last_hidden_state
        logits = model.head_logits(hidden[:, -1]).float()  # (B or 2B, codes_per_step, num_codes)
        if guided:
            cond, uncond = logits[:batch], logits[batch:]
            logits = cond + (cfg_scale - 1.0) * (cond - uncond)
        logits = process_logits(logits.flatten(0, 1), temperature, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        codes = torch.multinomial(probs, 1, generator=generator).view(batch, config.codes_per_step)
        steps.append(codes)
        if step + 1 < config.num_steps:
            fed = torch.cat([codes, codes]) if guided else codes
            inputs = model.embed_codes(fed[:, None]) + model.position_embedding.weight[step + 1 : step + 2]
    return torch.stack(steps, dim=1)


def indices_to_steps(indices: torch.LongTensor, codes_per_step: int) -> torch.LongTensor:
    """Tokenizer indices (B, H, h, w) -> generator codes: (B, h*w, H) position-level or (B, h*w*H, 1) flat."""
    batch, heads = indices.shape[:2]
    by_position = indices.flatten(2).transpose(1, 2)  # (B, h*w, H): position-major, raster order
    if codes_per_step == heads:
        return by_position.contiguous()
    if codes_per_step == 1:
        return by_position.reshape(batch, -1, 1)
    raise ValueError(f"codes_per_step must be 1 (flat) or the tokenizer's num_heads {heads}, got {codes_per_step}")


def steps_to_indices(codes: torch.LongTensor, num_heads: int, latent_shape: tuple[int, int]) -> torch.LongTensor:
    """Inverse of `indices_to_steps`: (B, S, codes_per_step) -> (B, H, h, w)."""
    batch = codes.shape[0]
    height, width = latent_shape
    return codes.reshape(batch, height * width, num_heads).transpose(1, 2).reshape(batch, num_heads, height, width)


__all__ = [
    "TokenGenerator",
    "TokenGeneratorConfig",
    "TokenGeneratorOutput",
    "indices_to_steps",
    "process_logits",
    "sample_codes",
    "steps_to_indices",
]
