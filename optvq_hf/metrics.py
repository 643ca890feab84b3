"""Reconstruction metrics of an image tokenizer: PSNR, SSIM, LPIPS, rFID, codebook usage and perplexity.

The protocol is the original OptVQ evaluation (its `eval.py`: pyiqa 0.1.x for PSNR, SSIM and LPIPS, pytorch-fid for
rFID), with its defects fixed (FID on a batch of one, duplicated samples of a distributed sampler, codebook usage not
reported). Images enter `ReconstructionMetrics` in [-1, 1]; the metrics see them in [0, 1] with the reconstructions
clamped to [0, 1], as in the original:

- `psnr`: PSNR on the Y channel of YCbCr (ITU-R BT.601, `rgb_to_y(..., "ycbcr")`), data range 1, per image
  `10 * log10(1 / (mse + 1e-8))` (pyiqa's `eps`: identical images score 80 dB), averaged over images.
- `psnr_rgb`: the same over the three RGB channels (what most peers report).
- `ssim`: pyiqa's default `ssim`: Y of YIQ (`0.299 R + 0.587 G + 0.114 B`, not the YCbCr Y of `psnr`) scaled to
  [0, 255] and rounded to integer levels, an 11x11 Gaussian window with sigma 1.5, no padding (the mean runs over the
  "valid" positions only, which is what scikit-image's cropped mean also does), no downsampling, constants
  `(0.01 * 255)^2` and `(0.03 * 255)^2`, and the contrast-structure term clipped at 0 (pyiqa's `relu`, so SSIM >= 0).
- `lpips`: LPIPS AlexNet v0.1 (pyiqa's default `lpips`); `lpips_vgg`: LPIPS VGG v0.1 (the training loss's network).
- `rfid`: Frechet distance between the InceptionV3 pool features (2048-d, pytorch-fid's FID Inception, images in
  [0, 1] resized to 299 inside the network) of all reconstructions and all originals.
- `usage`: fraction of the codebook's codes used at least once over the whole evaluation set (all heads share one
  codebook); `usage_head{j}` per head.
- `perplexity`: `exp(entropy)` of the empirical code frequencies (natural log); K for uniform use of K codes, 1 for
  one code; `perplexity_head{j}` per head.

Every metric is accumulated as sums that add across batches and processes (per-image score sums, an image count,
code histograms, feature sums and sums of outer products), never as per-batch averages.

Distributed evaluation, two ways:

1. Each process calls `update(..., num_valid=...)` on its own shard (`num_valid` drops the duplicated samples that a
   distributed sampler appends to the last batch), then every process calls `sync(accelerator)` once (or
   `sync()` with `torch.distributed`, or `sync(reduce_fn)`), then `compute()`.
2. With `accelerate`: `stats = accelerator.gather_for_metrics(metrics.sample_statistics(x, x_rec, indices))`, then
   `metrics.accumulate(stats)`; `gather_for_metrics` drops the padding duplicates and every process holds all the
   statistics, so no `sync` is needed.

rFID needs pytorch-fid (an optional extra: `pip install pytorch-fid`, which needs a torchvision built for your
torch) and its weights file `pt_inception-2015-12-05-6726825d.pth`; or pass any feature extractor.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

METRIC_NAMES = ("psnr", "psnr_rgb", "ssim", "lpips", "lpips_vgg", "rfid", "usage", "perplexity")
PER_IMAGE_METRICS = ("psnr", "psnr_rgb", "ssim", "lpips", "lpips_vgg")
LPIPS_BACKBONES = {"lpips": "alex", "lpips_vgg": "vgg"}

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILENAME}"
_FID_HELP = (
    "rFID's default feature extractor is pytorch-fid's InceptionV3 (an optional extra): `pip install pytorch-fid` "
    "(it needs torchvision; install the torchvision build that matches your torch first, or pip replaces torch). "
    f"Its weights file {FID_WEIGHTS_FILENAME} is downloaded from {FID_WEIGHTS_URL}; offline, copy it to "
    f"$TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch/hub/checkpoints/) or pass "
    "InceptionFeatureExtractor(weights_path=...) as fid_feature_extractor. Any callable mapping images in [0, 1] "
    "(B, 3, H, W) to features (B, D) can be passed as fid_feature_extractor instead."
)

# ---------------------------------------------------------------------------------------------------------------------
# Functional metrics (images in [0, 1], per-image results)
# ---------------------------------------------------------------------------------------------------------------------
_Y_WEIGHTS = {
    # pyiqa `rgb2ycbcr` (ITU-R BT.601, studio swing): Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255.
    "ycbcr": ((65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0), 16.0 / 255.0),
    # pyiqa `rgb2yiq` (full range): Y = 0.299 R + 0.587 G + 0.114 B.
    "yiq": ((0.299, 0.587, 0.114), 0.0),
}


def rgb_to_y(images: torch.Tensor, standard: str = "ycbcr") -> torch.Tensor:
    """
    Luma of RGB images in [0, 1]: (B, 3, H, W) -> (B, 1, H, W), in the input's floating dtype.

    Args:
        images: RGB images in [0, 1].
        standard: `"ycbcr"`: `(16 + 65.481 R + 128.553 G + 24.966 B) / 255`, in [16/255, 235/255] (pyiqa's
            `rgb2ycbcr`, the Y of the protocol's PSNR); `"yiq"`: `0.299 R + 0.587 G + 0.114 B`, in [0, 1] (pyiqa's
            default colour space, the Y of the protocol's SSIM).
    """
    if standard not in _Y_WEIGHTS:
        raise ValueError(f"standard must be one of {sorted(_Y_WEIGHTS)}, got {standard!r}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
    weights, offset = _Y_WEIGHTS[standard]
    if not images.is_floating_point():
        images = images.float()
    weight = torch.tensor(weights, dtype=images.dtype, device=images.device)
    return (images.permute(0, 2, 3, 1) @ weight).unsqueeze(1) + offset


def _check_pair(images: torch.Tensor, references: torch.Tensor) -> None:
    if images.shape != references.shape or images.ndim != 4:
        raise ValueError(
            f"expected two image batches (B, C, H, W) of one shape, got {tuple(images.shape)} and "
            f"{tuple(references.shape)}"
        )


def psnr(images: torch.Tensor, references: torch.Tensor, *, y_channel: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """
    Per-image PSNR (B,) in dB, float64, of images in [0, 1] (data range 1; pyiqa's `psnr`).

    `10 * log10(1 / (mse + eps))` with the mean squared error over all pixels (and channels); with `y_channel=True`
    (the protocol's `psnr`) on the Y of YCbCr (`rgb_to_y(..., "ycbcr")`, not rounded), otherwise on the given
    channels (`psnr_rgb`). `eps` caps identical images at `10 * log10(1 / eps)` = 80 dB.
    """
    _check_pair(images, references)
    if y_channel:
        images, references = rgb_to_y(images, "ycbcr"), rgb_to_y(references, "ycbcr")
    mse = (images.double() - references.double()).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / (mse + eps))


def _gaussian_window(size: int = 11, sigma: float = 1.5, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """Normalised 2-D Gaussian (size, size), as MATLAB's `fspecial('gaussian')` (an outer product of 1-D ones)."""
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    images: torch.Tensor,
    references: torch.Tensor,
    *,
    y_channel: bool = True,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """
    Per-image SSIM (B,), float64, of images in [0, 1], exactly as pyiqa's default `ssim` metric.

    The images are mapped to 8-bit levels first: with `y_channel=True` `round(255 * Y)` with Y of YIQ
    (`rgb_to_y(..., "yiq")`), otherwise `round(255 * x)` per channel. Local statistics use a normalised Gaussian
    window (11x11, sigma 1.5) without padding ("valid" positions only, so H and W must be >= `window_size`), constants
    `C1 = (0.01 * 255)^2`, `C2 = (0.03 * 255)^2`, population (not sample) variances; the contrast-structure term is
    clipped at 0 before the product with the luminance term, and the SSIM map is averaged over positions and
    channels. No downsampling (pyiqa's `downsample=False`). Equal to scikit-image's
    `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)` on the
    rounded Y channel wherever that term is non-negative.
    """
    _check_pair(images, references)
    if images.shape[-1] < window_size or images.shape[-2] < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size}, got {tuple(images.shape[-2:])}")
    if y_channel:
        images, references = rgb_to_y(images, "yiq"), rgb_to_y(references, "yiq")
    # pyiqa rounds in the input's precision (float32 in the original evaluation) and computes in float64.
    x = torch.round(images.float() * 255.0).double()
    y = torch.round(references.float() * 255.0).double()
    channels = x.shape[1]
    window = _gaussian_window(window_size, sigma, device=x.device).expand(channels, 1, window_size, window_size)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov_xy = filt(x * y) - mu_x * mu_y
    contrast_structure = ((2 * cov_xy + c2) / (var_x + var_y + c2)).clamp(min=0)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * contrast_structure).mean(dim=(1, 2, 3))


def codebook_usage(counts: torch.Tensor) -> torch.Tensor:
    """Fraction of codes used at least once, over the last dim of a histogram `counts` (..., K); float64."""
    return (counts > 0).double().mean(dim=-1)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """
    `exp(entropy)` (natural log, `0 log 0 = 0`) of the code frequencies in a histogram `counts` (..., K); float64.

    K when K codes are used equally often, 1 when one code is used; NaN for an empty histogram.
    """
    counts = counts.double()
    total = counts.sum(dim=-1, keepdim=True)
    p = counts / total
    entropy = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, torch.exp(entropy), torch.full_like(entropy, math.nan))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """
    Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed as pytorch-fid does.

    `||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2))` in float64 with
    `scipy.linalg.sqrtm`; if the square root is not finite (a singular product), `eps` is added to both diagonals
    and it is recomputed (with a warning); an imaginary part from rounding is dropped when the diagonal's imaginary
    part is within 1e-3 of zero, and a larger one raises `ValueError`. Accepts numpy arrays or tensors.
    """
    from scipy import linalg

    def as_array(a, ndmin):
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().double().numpy()
        return np.array(a, dtype=np.float64, ndmin=ndmin)

    mu1, mu2 = as_array(mu1, 1), as_array(mu2, 1)
    sigma1, sigma2 = as_array(sigma1, 2), as_array(sigma2, 2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"mismatched Gaussian parameters: means {mu1.shape}, {mu2.shape}; covariances {sigma1.shape}, "
            f"{sigma2.shape}"
        )

    def sqrtm(a):
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            root = linalg.sqrtm(a)
        return root[0] if isinstance(root, tuple) else root

    diff = mu1 - mu2
    covmean = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonal of both covariances")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 @ sigma2)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------------------------------
# Default models (loaded lazily: pytorch-fid and the LPIPS weights are only needed for the metrics that use them)
# ---------------------------------------------------------------------------------------------------------------------
class InceptionFeatureExtractor(torch.nn.Module):
    """
    pytorch-fid's FID InceptionV3: images in [0, 1] (B, 3, H, W) -> 2048-d pool features (B, 2048).

    Needs the `pytorch_fid` package (an optional extra). `weights_path`: a local copy of
    `pt_inception-2015-12-05-6726825d.pth` to use instead of pytorch-fid's download/cache lookup.
    """

    feature_dim = 2048

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        try:
            from pytorch_fid import inception as fid_inception
        except ImportError as error:
            raise ImportError(f"rFID: the `pytorch_fid` package is not installed. {_FID_HELP}") from error
        patch = contextlib.nullcontext()
        if weights_path is not None:
            # pytorch-fid fetches its weights through this module-level name; serve the local file instead.
            def load_local(*args, **kwargs):
                return torch.load(weights_path, map_location="cpu", weights_only=True)

            patch = _patched_attribute(fid_inception, "load_state_dict_from_url", load_local)
        try:
            with patch:
                self.model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        except OSError as error:  # includes urllib's URLError when offline
            raise RuntimeError(f"rFID: could not load the Inception weights ({error}). {_FID_HELP}") from error
        self.model.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model(images)[0]
        if features.shape[-2:] != (1, 1):
            features = F.adaptive_avg_pool2d(features, (1, 1))
        return features.flatten(1)


@contextlib.contextmanager
def _patched_attribute(obj, name, value):
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


def _default_lpips(backbone: str) -> torch.nn.Module:
    try:
        from .training.perceptual import LPIPS
    except ImportError as error:
        raise ImportError(
            "The LPIPS metrics need optvq_hf.training.perceptual.LPIPS; "
            "pass lpips_models={'lpips': ..., 'lpips_vgg': ...} "
            "to use other models."
        ) from error
    return LPIPS.from_pretrained(backbone=backbone)


# ---------------------------------------------------------------------------------------------------------------------
# Accumulating metrics
# ---------------------------------------------------------------------------------------------------------------------
class ReconstructionMetrics:
    """
    Accumulates reconstruction metrics of a tokenizer over an evaluation set, in one or several processes.

    Args:
        metrics: names among `METRIC_NAMES` ("psnr", "psnr_rgb", "ssim", "lpips", "lpips_vgg", "rfid", "usage",
            "perplexity"); the module docstring states the protocol of each.
        num_codes: codebook size K (needed for "usage" and "perplexity").
        num_heads: code indices per latent position.
        device: where the models run and the statistics live (the accelerator's device in distributed runs).
        fid_feature_extractor: callable mapping images in [0, 1] (B, 3, H, W) to features (B, D); default
            `InceptionFeatureExtractor()` (pytorch-fid, an optional extra; a clear error says what to install).
        fid_feature_dim: D; default the extractor's `feature_dim` attribute, else 2048.
        lpips_models: optional `{"lpips": model, "lpips_vgg": model}`, callables mapping two image batches in
            [-1, 1] to per-image distances (B,) or (B, 1, 1, 1); missing ones are
            `optvq_hf.training.perceptual.LPIPS.from_pretrained(backbone="alex" | "vgg")`.

    Example (one process; see the module docstring for several)::

        metrics = ReconstructionMetrics(num_codes=16384, num_heads=4, device=device)
        for pixel_values in loader:
            out = model(pixel_values)
            metrics.update(pixel_values, out.reconstruction, out.indices)
        print(metrics.compute())  # {"psnr": ..., ..., "usage_head0": ..., "perplexity_head0": ...}
    """

    def __init__(
        self,
        metrics: Sequence[str] = METRIC_NAMES,
        *,
        num_codes: int | None = None,
        num_heads: int = 1,
        device: torch.device | str = "cpu",
        fid_feature_extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
        fid_feature_dim: int | None = None,
        lpips_models: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
    ):
        if isinstance(metrics, str):
            metrics = (metrics,)
        unknown = sorted(set(metrics) - set(METRIC_NAMES))
        if unknown or not metrics:
            raise ValueError(f"unknown metrics {unknown}; choose among {METRIC_NAMES}")
        self.metrics = tuple(name for name in METRIC_NAMES if name in metrics)
        self.uses_codes = "usage" in self.metrics or "perplexity" in self.metrics
        if self.uses_codes and (num_codes is None or num_codes < 1 or num_heads < 1):
            raise ValueError("'usage' and 'perplexity' need num_codes >= 1 and num_heads >= 1")
        self.num_codes, self.num_heads = num_codes, num_heads
        self.device = torch.device(device)

        self.lpips_models = {}
        for name in ("lpips", "lpips_vgg"):
            if name in self.metrics:
                model = (lpips_models or {}).get(name)
                if model is None:
                    model = _default_lpips(LPIPS_BACKBONES[name])
                self.lpips_models[name] = _to_eval(model, self.device)
        self.fid_feature_extractor = None
        if "rfid" in self.metrics:
            extractor = fid_feature_extractor if fid_feature_extractor is not None else InceptionFeatureExtractor()
            self.fid_feature_extractor = _to_eval(extractor, self.device)
            self.fid_feature_dim = fid_feature_dim or getattr(extractor, "feature_dim", None) or 2048
        self.reset()

    # -- state --------------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything accumulated."""
        zeros = lambda *shape, dtype=torch.float64: torch.zeros(shape, dtype=dtype, device=self.device)  # noqa: E731
        state = {"num_images": zeros(dtype=torch.int64)}
        for name in PER_IMAGE_METRICS:
            if name in self.metrics:
                state[f"{name}_sum"] = zeros()
        if "rfid" in self.metrics:
            d = self.fid_feature_dim
            for side in ("real", "fake"):
                state[f"rfid_{side}_sum"], state[f"rfid_{side}_outer"] = zeros(d), zeros(d, d)
        if self.uses_codes:
            state["code_counts"] = zeros(self.num_heads, self.num_codes, dtype=torch.int64)
        self.state: dict[str, torch.Tensor] = state
        self._synced = False

    @property
    def num_images(self) -> int:
        return int(self.state["num_images"])

    # -- accumulation -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_statistics(
        self, originals: torch.Tensor, reconstructions: torch.Tensor, indices: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """
        Per-sample statistics of a batch, each with the batch as first dimension (ready for
        `accelerator.gather_for_metrics`): per-image scores (B,), `rfid_real` / `rfid_fake` features (B, D), and
        `indices` (B, num_heads, ...).

        Args:
            originals, reconstructions: images (B, 3, H, W) in [-1, 1]; reconstructions are clamped to [-1, 1].
            indices: code indices (B, num_heads, h, w) (any trailing layout), needed for "usage" / "perplexity".
        """
        _check_pair(originals, reconstructions)
        if self.uses_codes and (indices is None or indices.shape[:2] != (originals.shape[0], self.num_heads)):
            raise ValueError(
                f"'usage' and 'perplexity' need indices (B={originals.shape[0]}, num_heads={self.num_heads}, ...), "
                f"got {None if indices is None else tuple(indices.shape)}"
            )
        with torch.autocast(device_type=self.device.type, enabled=False):  # float32 networks, as the original
            return self._sample_statistics(originals, reconstructions, indices)

    def _sample_statistics(self, originals, reconstructions, indices):
        originals = originals.to(self.device, torch.float32)
        reconstructions = reconstructions.to(self.device, torch.float32).clamp(-1.0, 1.0)
        x, x_rec = (originals + 1) / 2, (reconstructions + 1) / 2
        stats = {}
        if "psnr" in self.metrics:
            stats["psnr"] = psnr(x_rec, x, y_channel=True)
        if "psnr_rgb" in self.metrics:
            stats["psnr_rgb"] = psnr(x_rec, x, y_channel=False)
        if "ssim" in self.metrics:
            stats["ssim"] = ssim(x_rec, x)
        for name, model in self.lpips_models.items():
            stats[name] = model(reconstructions, originals).reshape(originals.shape[0]).double()
        if self.fid_feature_extractor is not None:
            stats["rfid_real"] = self._features(x)
            stats["rfid_fake"] = self._features(x_rec)
        if self.uses_codes:
            stats["indices"] = indices.to(self.device, torch.int64)
        return stats

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        features = self.fid_feature_extractor(images)
        features = features.reshape(images.shape[0], -1)  # pool features arrive as (B, D, 1, 1) from some nets
        if features.shape[1] != self.fid_feature_dim:
            raise ValueError(
                f"rFID features have {features.shape[1]} dims, expected fid_feature_dim={self.fid_feature_dim}"
            )
        return features

    @torch.no_grad()
    def accumulate(self, stats: Mapping[str, torch.Tensor]) -> None:
        """Add the output of `sample_statistics` (possibly gathered from all processes) to the state."""
        if self._synced:
            raise RuntimeError("these metrics were synced across processes; call reset() before accumulating again")
        required = [n for n in PER_IMAGE_METRICS if n in self.metrics]
        required += ["rfid_real", "rfid_fake"] if "rfid" in self.metrics else []
        required += ["indices"] if self.uses_codes else []
        batch = None
        for name in required:
            if name not in stats:
                raise KeyError(f"statistics for {name!r} missing; pass the output of sample_statistics()")
            if batch is None:
                batch = stats[name].shape[0]
            elif stats[name].shape[0] != batch:
                raise ValueError("sample statistics with different batch sizes")
        state = self.state
        state["num_images"] += batch
        for name in PER_IMAGE_METRICS:
            if name in self.metrics:
                state[f"{name}_sum"] += stats[name].to(self.device, torch.float64).sum()
        if "rfid" in self.metrics:
            for side in ("real", "fake"):
                features = stats[f"rfid_{side}"].to(self.device, torch.float64).reshape(batch, -1)
                state[f"rfid_{side}_sum"] += features.sum(dim=0)
                state[f"rfid_{side}_outer"] += features.T @ features
        if self.uses_codes:
            indices = stats["indices"].to(self.device, torch.int64).reshape(batch, self.num_heads, -1)
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
                raise ValueError(f"code indices outside [0, {self.num_codes})")
            head_offset = torch.arange(self.num_heads, device=self.device).view(1, -1, 1) * self.num_codes
            flat = (indices + head_offset).reshape(-1)
            state["code_counts"] += torch.bincount(flat, minlength=self.num_heads * self.num_codes).view(
                self.num_heads, self.num_codes
            )

    def update(
        self,
        originals: torch.Tensor,
        reconstructions: torch.Tensor,
        indices: torch.Tensor | None = None,
        num_valid: int | None = None,
    ) -> None:
        """
        Accumulate a batch: images (B, 3, H, W) in [-1, 1], code indices (B, num_heads, h, w).

        `num_valid`: count only the first `num_valid` samples (the rest are a distributed sampler's padding
        duplicates); default all.
        """
        if num_valid is not None:
            if not 0 <= num_valid <= originals.shape[0]:
                raise ValueError(f"num_valid={num_valid} outside [0, {originals.shape[0]}]")
            if num_valid == 0:
                return
            originals, reconstructions = originals[:num_valid], reconstructions[:num_valid]
            indices = None if indices is None else indices[:num_valid]
        self.accumulate(self.sample_statistics(originals, reconstructions, indices))

    # -- distributed --------------------------------------------------------------------------------------------------
    def sync(self, reduce=None) -> None:
        """
        Sum the state over all processes (a collective: every process must call it, once, after its last update).

        Args:
            reduce: an `accelerate.Accelerator` (uses `accelerator.reduce(t, reduction="sum")`), or a callable
                returning the sum of a tensor over processes, or None: `torch.distributed.all_reduce` when a
                process group is initialised, else nothing (one process).
        """
        if self._synced:
            return
        if reduce is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                self._synced = True
                return

            def reduce(tensor):
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
                return tensor
        elif not callable(reduce):  # an accelerate.Accelerator (or anything with its `reduce` method)
            accelerator = reduce
            reduce = lambda tensor: accelerator.reduce(tensor, reduction="sum")  # noqa: E731
        for name in sorted(self.state):  # one fixed order on every process
            self.state[name] = reduce(self.state[name].contiguous())
        self._synced = True

    # -- results ------------------------------------------------------------------------------------------------------
    def compute(self) -> dict[str, float]:
        """
        The metrics as floats, keyed by metric name, plus `usage_head{j}` and `perplexity_head{j}` per head.

        rFID is NaN (with a warning) with fewer than 2 images, where a covariance is undefined.
        """
        n = self.num_images
        if n == 0:
            raise RuntimeError("no images accumulated")
        state, results = self.state, {}
        for name in PER_IMAGE_METRICS:
            if name in self.metrics:
                results[name] = float(state[f"{name}_sum"] / n)
        if "rfid" in self.metrics:
            if n < 2:
                warnings.warn(f"rFID needs at least 2 images, got {n}; reporting NaN")
                results["rfid"] = math.nan
            else:
                gaussians = []
                for side in ("real", "fake"):
                    mean = state[f"rfid_{side}_sum"] / n
                    cov = (state[f"rfid_{side}_outer"] - n * torch.outer(mean, mean)) / (n - 1)  # as np.cov (ddof=1)
                    gaussians += [mean, cov]
                results["rfid"] = frechet_distance(*gaussians)
        if self.uses_codes:
            counts = state["code_counts"]
            for name, fn in (("usage", codebook_usage), ("perplexity", perplexity)):
                if name in self.metrics:
                    results[name] = float(fn(counts.sum(dim=0)))
                    results.update({f"{name}_head{j}": float(v) for j, v in enumerate(fn(counts).tolist())})
        return results


def _to_eval(model, device):
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval().requires_grad_(False)
    return model
