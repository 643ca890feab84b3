"""The OptVQ training objective: pixel + perceptual reconstruction losses, the quantizer loss, and a PatchGAN
adversarial term with taming-transformers' adaptive weight.

Generator (autoencoder) step, with x the images and x' the reconstructions, both in [-1, 1]:

    rec  = l1_weight * |x' - x|_1 + l2_weight * |x' - x|^2 + perceptual_weight * LPIPS_vgg(x, x')   (means)
    g    = -mean(D(x'))
    w    = disc_weight * clamp(||d rec / d W_last|| / (||d g / d W_last|| + 1e-4), 0, 1e4)   (no gradient)
    loss = rec + quantizer_weight * quantizer_loss + [step >= disc_start] * w * g

Discriminator step: `disc_loss_weight * hinge(D(x), D(x'))`, with `hinge = (mean relu(1 - real) + mean relu(1 +
fake)) / 2`. As in the original OptVQ (and unlike taming-transformers), the discriminator trains from step 0 while
the generator only feels it from `disc_start` on (150,000 steps in every ImageNet config); `disc_train_start`
delays its training if wanted.

What this module does differently from the original (defects of its training code), without changing the objective:

- The generator pass evaluates the discriminator with detached parameters and on copies of its BatchNorm buffers
  (`torch.func.functional_call`): the logits are the ones the original computes (train-mode batch statistics), but
  no gradient reaches the discriminator's parameters and its running statistics do not move. So the generator's
  backward cannot leak into the discriminator's `.grad`, however the caller orders its `zero_grad` calls.
- LPIPS is frozen (no parameter requires grad, always eval) and so stays out of optimisers and gradient clipping.
- Before `disc_start` the generator pass skips the discriminator and the two extra gradients the adaptive weight
  needs (the original computes them and multiplies by 0).

Precision: pixel and perceptual losses are computed in float32 (LPIPS with autocast disabled), as the original does;
the discriminator runs under whatever autocast is active and its logits are upcast before the means.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .discriminator import NLayerDiscriminator
from .perceptual import LPIPS

# Adaptive weight of taming-transformers / OptVQ: the epsilon keeps the ratio finite when the adversarial gradient
# vanishes, and the clamp bounds it when the adversarial gradient is tiny.
ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4
DISC_LOSSES = ("hinge", "vanilla")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss: (mean(relu(1 - real)) + mean(relu(1 + fake))) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating (binary cross-entropy) discriminator loss: (mean(softplus(-real)) + mean(softplus(fake))) / 2."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    eps: float = ADAPTIVE_WEIGHT_EPS,
    max_weight: float = ADAPTIVE_WEIGHT_MAX,
) -> torch.Tensor:
    """taming-transformers' balance between reconstruction and adversarial gradients at the decoder's last layer:
    `clamp(||grad rec|| / (||grad g|| + eps), 0, max_weight)`, detached, 0 if NaN.

    The gradients are taken with `torch.autograd.grad` (nothing is accumulated into `.grad`) and keep the graph for
    the caller's backward. A loss that does not depend on `last_layer` counts as a zero gradient.
    """
    rec_grad, g_grad = (
        torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)[0] for loss in (rec_loss, g_loss)
    )
    rec_norm = rec_grad.float().norm() if rec_grad is not None else last_layer.new_zeros((), dtype=torch.float32)
    g_norm = g_grad.float().norm() if g_grad is not None else last_layer.new_zeros((), dtype=torch.float32)
    weight = torch.clamp(rec_norm / (g_norm + eps), 0.0, max_weight)
    return torch.nan_to_num(weight, nan=0.0).detach()


@dataclass
class OptVQLossConfig:
    """Hyperparameters of `OptVQLoss`. Defaults: the original ImageNet configs (`AELossWithDisc`).

    Args:
        l1_weight (`float`, defaults to 1.0): weight of the mean absolute pixel error (`loss_l1_weight`).
        l2_weight (`float`, defaults to 1.0): weight of the mean squared pixel error (`loss_l2_weight`).
        perceptual_weight (`float`, defaults to 3.0): weight of LPIPS (`loss_p_weight`); 0 builds no LPIPS network.
        quantizer_weight (`float`, defaults to 1.0): weight of the quantizer's loss (`loss_q_weight`).
        disc_weight (`float`, defaults to 1.0): factor on the adaptive weight of the generator's adversarial term
            (`loss_g_weight`); 0 turns the adversarial term off.
        disc_loss_weight (`float`, defaults to 1.0): factor on the discriminator's loss (`loss_d_weight`).
        disc_start (`int`, defaults to 150000): first global step at which the generator gets the adversarial term.
        disc_train_start (`int`, defaults to 0): first step at which `discriminator_loss` is not multiplied by 0
            (the original trains the discriminator from step 0; taming-transformers uses `disc_start` here).
        disc_loss (`str`, defaults to `"hinge"`): `"hinge"` or `"vanilla"` (binary cross-entropy).
        disc_in_channels (`int`, defaults to 3), disc_base_channels (`int`, defaults to 64),
        disc_num_layers (`int`, defaults to 3): the `NLayerDiscriminator` (`disc_in_channels`, `ndf`,
            `disc_num_layers`).
        perceptual_backbone (`str`, defaults to `"vgg"`): LPIPS backbone of the loss (the original trains with VGG).
        perceptual_pretrained (`bool`, defaults to `True`): load the published LPIPS weights; `False` keeps random
            weights (tests only).
        perceptual_backbone_path, perceptual_heads_path, perceptual_cache_dir (`str`, *optional*): local weight
            files or cache directory, passed to `LPIPS` (see `LPIPS.from_pretrained`).
    """

    l1_weight: float = field(
        default=1.0, metadata={"help": "weight of the mean absolute pixel error (loss_l1_weight)"}
    )
    l2_weight: float = field(default=1.0, metadata={"help": "weight of the mean squared pixel error (loss_l2_weight)"})
    perceptual_weight: float = field(
        default=3.0, metadata={"help": "weight of LPIPS (loss_p_weight); 0 builds no LPIPS network"}
    )
    quantizer_weight: float = field(default=1.0, metadata={"help": "weight of the quantizer's loss (loss_q_weight)"})
    disc_weight: float = field(
        default=1.0, metadata={"help": "factor on the adaptive weight of the adversarial term (loss_g_weight); 0: off"}
    )
    disc_loss_weight: float = field(
        default=1.0, metadata={"help": "factor on the discriminator's loss (loss_d_weight)"}
    )
    disc_start: int = field(
        default=150_000, metadata={"help": "first step at which the generator gets the adversarial term"}
    )
    disc_train_start: int = field(default=0, metadata={"help": "first step at which the discriminator trains"})
    disc_loss: str = field(default="hinge", metadata={"help": "hinge or vanilla (binary cross-entropy)"})
    disc_in_channels: int = field(
        default=3, metadata={"help": "image channels the discriminator reads (= model.out_channels)"}
    )
    disc_base_channels: int = field(default=64, metadata={"help": "channels of the discriminator's first layer (ndf)"})
    disc_num_layers: int = field(default=3, metadata={"help": "strided layers of the PatchGAN discriminator"})
    perceptual_backbone: str = field(
        default="vgg", metadata={"help": "LPIPS backbone of the loss: vgg (the original) or alex"}
    )
    perceptual_pretrained: bool = field(
        default=True, metadata={"help": "load the published LPIPS weights (false: random weights, tests only)"}
    )
    perceptual_backbone_path: str | None = field(
        default=None, metadata={"help": "a local file of the LPIPS backbone weights"}
    )
    perceptual_heads_path: str | None = field(
        default=None, metadata={"help": "a local file of the LPIPS linear heads"}
    )
    perceptual_cache_dir: str | None = field(
        default=None, metadata={"help": "cache directory of the downloaded LPIPS weights"}
    )

    def __post_init__(self) -> None:
        for name in (
            "l1_weight",
            "l2_weight",
            "perceptual_weight",
            "quantizer_weight",
            "disc_weight",
            "disc_loss_weight",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite non-negative number, got {value}.")
        if self.disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {DISC_LOSSES}, got {self.disc_loss!r}.")
        if self.disc_start < 0 or self.disc_train_start < 0:
            raise ValueError("disc_start and disc_train_start must be non-negative.")

    def to_dict(self) -> dict:
        return asdict(self)


class OptVQLoss(nn.Module):
    """The OptVQ objective with its PatchGAN discriminator (see the module docstring for the formulas).

    Args:
        config (`OptVQLossConfig`, *optional*): hyperparameters; defaults to `OptVQLossConfig()`.
        **overrides: fields of `OptVQLossConfig` that replace those of `config`, e.g.
            `OptVQLoss(disc_start=0, perceptual_pretrained=False)`.

    Submodules: `discriminator` (`NLayerDiscriminator`; its state dict keys are the original's
    `loss.discriminator.*` without the `loss.` prefix) and `perceptual` (frozen `LPIPS`, or `None` when
    `perceptual_weight == 0`). Only the discriminator has trainable parameters.

    Use (one training step; `model`'s decoder ends with the convolution `last_layer` is the weight of):

        loss, logs = loss_fn.generator_loss(x, x_rec, q_loss, step, last_layer=decoder.conv_out.weight)
        loss.backward(); opt_g.step(); opt_g.zero_grad()     # clip model.parameters() only
        d_loss, d_logs = loss_fn.discriminator_loss(x, x_rec, step)   # detaches x_rec itself
        d_loss.backward(); opt_d.step(); opt_d.zero_grad()   # opt_d over loss_fn.discriminator.parameters()

    The generator step leaves the discriminator's `.grad` and BatchNorm statistics untouched, so the two steps can be
    ordered freely. Multi-GPU: wrap this module in DDP (`accelerator.prepare(loss_fn)`) and run the discriminator
    step through the wrapper, `ddp_loss_fn("discriminator", x, x_rec, step)`, so its gradients are all-reduced; run
    the generator step on the unwrapped module (`accelerator.unwrap_model(ddp_loss_fn).generator_loss(...)`), since
    it gives the discriminator's parameters no gradient, which DDP would wait for.
    """

    def __init__(self, config: OptVQLossConfig | None = None, **overrides) -> None:
        super().__init__()
        config = replace(config or OptVQLossConfig(), **overrides)
        self.config = config
        self.discriminator = NLayerDiscriminator(
            in_channels=config.disc_in_channels,
            base_channels=config.disc_base_channels,
            num_layers=config.disc_num_layers,
        )
        self.perceptual: LPIPS | None = None
        if config.perceptual_weight > 0:
            self.perceptual = LPIPS(
                config.perceptual_backbone,
                pretrained=config.perceptual_pretrained,
                backbone_path=config.perceptual_backbone_path,
                heads_path=config.perceptual_heads_path,
                cache_dir=config.perceptual_cache_dir,
            )
        self.d_loss_fn = hinge_d_loss if config.disc_loss == "hinge" else vanilla_d_loss

    def adversarial_active(self, global_step: int) -> bool:
        """Whether `generator_loss` includes the adversarial term at this step."""
        return global_step >= self.config.disc_start and self.config.disc_weight > 0

    def discriminator_trains(self, global_step: int) -> bool:
        """Whether `discriminator_loss` is non-zero at this step (a training loop may skip the step otherwise)."""
        return global_step >= self.config.disc_train_start and self.config.disc_loss_weight > 0

    def reconstruction_losses(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted sum `rec_loss` and its unweighted parts `l1_loss`, `l2_loss`, `perceptual_loss` (float32).

        Parts with weight 0 are not computed (reported as 0). No gradient flows into `inputs`: they are targets.
        """
        config = self.config
        target = inputs.detach().float()
        prediction = reconstructions.float()
        zero = prediction.new_zeros(())
        l1 = (prediction - target).abs().mean() if config.l1_weight > 0 else zero
        l2 = (prediction - target).pow(2).mean() if config.l2_weight > 0 else zero
        perceptual = self.perceptual(target, prediction).mean() if self.perceptual is not None else zero
        rec = config.l1_weight * l1 + config.l2_weight * l2 + config.perceptual_weight * perceptual
        return {"rec_loss": rec, "l1_loss": l1, "l2_loss": l2, "perceptual_loss": perceptual}

    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        quantizer_loss: torch.Tensor,
        global_step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of the autoencoder step.

        Args:
            inputs: images `(B, 3, H, W)` in [-1, 1].
            reconstructions: the autoencoder's output for `inputs`, same shape, attached to the graph.
            quantizer_loss: the quantizer's loss (a scalar, or a tensor that is averaged).
            global_step: optimisation step (number of optimizer updates so far).
            last_layer: weight of the decoder's last layer (e.g. `decoder.conv_out.weight`), for the adaptive
                weight; needed once the adversarial term is on and gradients are enabled.

        Returns:
            `(loss, logs)`: the scalar float32 loss and floats `loss`, `rec_loss`, `l1_loss`, `l2_loss`,
            `perceptual_loss`, `quantizer_loss`, `g_loss`, `g_weight` (the adaptive weight times `disc_weight`)
            and `disc_factor` (1.0 once the adversarial term is on). Under `torch.no_grad()` (validation) the
            adaptive weight cannot be computed and is 0, as in the original.
        """
        parts = self.reconstruction_losses(inputs, reconstructions)
        q_loss = quantizer_loss.float().mean()
        loss = parts["rec_loss"] + self.config.quantizer_weight * q_loss

        zero = loss.new_zeros(())
        g_loss, g_weight, disc_factor = zero, zero, 0.0
        if self.adversarial_active(global_step):
            disc_factor = 1.0
            g_loss = -self._frozen_discriminator(reconstructions).float().mean()
            if torch.is_grad_enabled() and g_loss.requires_grad:
                if last_layer is None:
                    raise ValueError("generator_loss needs `last_layer` (the decoder's last weight) from disc_start.")
                g_weight = self.config.disc_weight * adaptive_weight(parts["rec_loss"], g_loss, last_layer)
            loss = loss + g_weight * g_loss

        logs = {"loss": loss, **parts, "quantizer_loss": q_loss, "g_loss": g_loss, "g_weight": g_weight}
        return loss, {**_to_floats(logs), "disc_factor": disc_factor}

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of the discriminator step (both inputs are detached here).

        Real and fake images go through the discriminator in two separate calls, as in the original, so BatchNorm
        normalises each with its own batch statistics.

        Returns:
            `(loss, logs)`: `disc_factor * disc_loss_weight * d_loss` and floats `d_loss`, `logits_real`,
            `logits_fake` (mean logits) and `disc_factor` (0.0 before `disc_train_start`).
        """
        logits_real = self.discriminator(inputs.detach()).float()
        logits_fake = self.discriminator(reconstructions.detach()).float()
        d_loss = self.d_loss_fn(logits_real, logits_fake)
        disc_factor = 1.0 if global_step >= self.config.disc_train_start else 0.0
        loss = disc_factor * self.config.disc_loss_weight * d_loss
        logs = {"d_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, {**_to_floats(logs), "disc_factor": disc_factor}

    def forward(self, mode: str, *args, **kwargs) -> tuple[torch.Tensor, dict[str, float]]:
        """`loss_fn("generator", ...)` / `loss_fn("discriminator", ...)`: the two entry points through `__call__`,
        so that a DDP wrapper of this module can all-reduce the discriminator's gradients."""
        if mode == "generator":
            return self.generator_loss(*args, **kwargs)
        if mode == "discriminator":
            return self.discriminator_loss(*args, **kwargs)
        raise ValueError(f"mode must be 'generator' or 'discriminator', got {mode!r}.")

    def _frozen_discriminator(self, images: torch.Tensor) -> torch.Tensor:
        """The discriminator's logits for the generator pass: same computation (train or eval mode as set), but on
        detached parameters and on copies of the buffers, so neither `.grad` nor the BatchNorm statistics change."""
        params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        buffers = {name: b.clone() for name, b in self.discriminator.named_buffers()}
        return torch.func.functional_call(self.discriminator, {**params, **buffers}, (images,))


def _to_floats(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    # One device-to-host copy for all logged values instead of one synchronising `.item()` each.
    values = torch.stack([t.detach().float().reshape(()) for t in tensors.values()]).tolist()
    return dict(zip(tensors.keys(), values))


__all__ = [
    "OptVQLoss",
    "OptVQLossConfig",
    "adaptive_weight",
    "hinge_d_loss",
    "vanilla_d_loss",
]
