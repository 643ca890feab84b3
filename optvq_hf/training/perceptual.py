"""LPIPS perceptual distance (Zhang et al., 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), version 0.1, written without torchvision or the `lpips` package.

    d(x, y) = sum_l mean_hw( w_l . (u(f_l(x)) - u(f_l(y)))^2 )

where f_l are the ReLU outputs of a frozen ImageNet classifier at five depths, u normalises every feature vector to
unit length along the channels, and w_l are the non-negative 1x1 "linear heads" calibrated on human judgements.
Inputs are images in [-1, 1]; they first pass the LPIPS "scaling layer", which maps them to the ImageNet
normalisation the backbone was trained with.

Two backbones:

- `"vgg"`: VGG16 features, taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3. The OptVQ training loss
  (`lpips.LPIPS(net="vgg")` in the original).
- `"alex"`: AlexNet features, taps relu1 ... relu5. The LPIPS *metric* of the original evaluation (pyiqa's default
  LPIPS, v0.1).

Weights and key mapping
-----------------------
The module's parameters are `net.features.{i}.{weight,bias}` (the convolutions of the backbone, at the indices of
torchvision's `features` Sequential) and `lins.{k}.weight` (the heads). The published files map onto them as:

=====================================================  ===============================================
published key                                          key here
=====================================================  ===============================================
torchvision `vgg16-397923af.pth` /                     `net.features.{i}.{weight,bias}`
`alexnet-owt-7be5be79.pth`: `features.{i}.*`           (`classifier.*` is dropped)
lpips `weights/v0.1/{vgg,alex}.pth`:                   `lins.{k}.weight`
`lin{k}.model.1.weight`
a whole `lpips.LPIPS` state dict (what the original   `net.slice{s}.{i}.*` -> `net.features.{i}.*`,
OptVQ checkpoints hold under `loss.perceptual_loss.`)  `lin{k}.model.1.weight` -> `lins.{k}.weight`,
                                                       `scaling_layer.*` dropped (fixed constants)
=====================================================  ===============================================

`convert_torchvision_state_dict`, `convert_lpips_heads_state_dict` and `convert_lpips_package_state_dict` implement
the three rows. `LPIPS.from_pretrained` finds the two files (a local path, else the torch hub cache, else a download
from the published URL) and loads them strictly.

The network is frozen: every parameter has `requires_grad=False` (so it never enters an optimiser or a gradient-norm
clipping), and the module stays in eval mode whatever `.train()` is called with. Gradients still flow to the inputs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

# LPIPS v0.1 scaling layer: (x - shift) / scale turns [-1, 1] images into (approximately) the ImageNet mean/std
# normalisation the torchvision backbones expect. Constants of the lpips package.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# Added to the channel norm before dividing, as in lpips' `normalize_tensor` (keeps zero features finite).
UNIT_NORM_EPS = 1e-10

BACKBONES = ("vgg", "alex")


@dataclass(frozen=True)
class _WeightFile:
    filename: str  # name in the cache directory
    url: str
    sha256_prefix: str  # checked on download by torch.hub


# Backbones: torchvision's ImageNet weights (their file names carry the first 8 hex digits of the SHA-256).
# Heads: the lpips package's v0.1 files, as published in the richzhang/PerceptualSimilarity repository.
_LPIPS_WEIGHTS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1"
WEIGHT_FILES: dict[str, dict[str, _WeightFile]] = {
    "vgg": {
        "backbone": _WeightFile(
            "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth", "397923af"
        ),
        "heads": _WeightFile("lpips_v0.1_vgg.pth", f"{_LPIPS_WEIGHTS_URL}/vgg.pth", "a78928a0"),
    },
    "alex": {
        "backbone": _WeightFile(
            "alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "7be5be79"
        ),
        "heads": _WeightFile("lpips_v0.1_alex.pth", f"{_LPIPS_WEIGHTS_URL}/alex.pth", "df73285e"),
    },
}


def _vgg16_features() -> tuple[nn.Sequential, tuple[int, ...], tuple[int, ...]]:
    """VGG16 `features` up to relu5_3, with torchvision's layer indices (so its weights load by index)."""
    layers: list[nn.Module] = []
    in_channels = 3
    # "M" is a 2x2 max-pool; the trailing pool of torchvision's VGG16 (index 30) is not needed for relu5_3.
    for spec in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if spec == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, spec, kernel_size=3, padding=1), nn.ReLU()]
            in_channels = spec
    taps = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    return nn.Sequential(*layers), taps, (64, 128, 256, 512, 512)


def _alexnet_features() -> tuple[nn.Sequential, tuple[int, ...], tuple[int, ...]]:
    """AlexNet `features` up to relu5, with torchvision's layer indices (the final max-pool, index 12, is dropped)."""
    layers = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
    )
    taps = (1, 4, 7, 9, 11)  # relu1 ... relu5
    return layers, taps, (64, 192, 384, 256, 256)


class FeatureTaps(nn.Module):
    """A convolutional backbone whose forward returns the activations at a fixed list of layer indices.

    Args:
        backbone (`str`): `"vgg"` or `"alex"`.
    """

    def __init__(self, backbone: str) -> None:
        super().__init__()
        if backbone == "vgg":
            features, taps, channels = _vgg16_features()
        elif backbone == "alex":
            features, taps, channels = _alexnet_features()
        else:
            raise ValueError(f"LPIPS backbone must be one of {BACKBONES}, got {backbone!r}.")
        self.features = features
        self.taps = taps
        self.channels = channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                outputs.append(x)
        return outputs


def unit_normalize(features: torch.Tensor, eps: float = UNIT_NORM_EPS) -> torch.Tensor:
    """Divide each spatial position's feature vector (dim 1) by its Euclidean norm plus `eps`, as lpips does."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS v0.1 distance between two batches of images in [-1, 1].

    Args:
        backbone (`str`, *optional*, defaults to `"vgg"`):
            `"vgg"` (the OptVQ training loss) or `"alex"` (the LPIPS evaluation metric of the original).
        pretrained (`bool`, *optional*, defaults to `True`):
            Load the published weights (see `from_pretrained`). `False` keeps a random initialisation (for tests):
            PyTorch's default for the backbone, and non-negative heads (the published heads are non-negative too,
            which keeps the distance non-negative).
        backbone_path, heads_path (`str`, *optional*):
            Local files of the torchvision backbone and of the lpips heads. Default: the torch hub cache.
        cache_dir (`str`, *optional*):
            Where missing files are downloaded to. Default: `<torch.hub.get_dir()>/checkpoints`, the directory
            torchvision itself uses, so an existing torchvision download is reused.

    Call: `lpips(input, target)` -> `(B,)` float32 distances, one per image pair. The computation runs in the
    dtype of the weights (float32 unless the module was cast) with autocast disabled: the unit normalisation sums
    squares over up to 512 channels and the distance between two close images is a small difference of large
    numbers, both of which bfloat16 resolves poorly.
    """

    def __init__(
        self,
        backbone: str = "vgg",
        pretrained: bool = True,
        backbone_path: str | os.PathLike | None = None,
        heads_path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.net = FeatureTaps(backbone)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in self.net.channels)
        # Fixed constants, not weights: non-persistent so they stay out of state dicts.
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

        for lin in self.lins:
            # Mean weight 1/C per head: every layer contributes on the scale of its mean squared difference.
            nn.init.uniform_(lin.weight, 0.0, 2.0 / lin.in_channels)
        if pretrained:
            self.load_published_weights(backbone_path=backbone_path, heads_path=heads_path, cache_dir=cache_dir)

        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        backbone: str = "vgg",
        backbone_path: str | os.PathLike | None = None,
        heads_path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> LPIPS:
        """Build an LPIPS with the published weights.

        Each of the two files (torchvision backbone, lpips v0.1 heads) is taken from the given local path if one is
        given, else from `cache_dir`, else downloaded there from its published URL (SHA-256 checked). When the
        machine is offline (`HF_HUB_OFFLINE=1`) or the download fails, a `FileNotFoundError` names the file, its
        URL and the argument that takes a local copy.
        """
        return cls(backbone, pretrained=True, backbone_path=backbone_path, heads_path=heads_path, cache_dir=cache_dir)

    def load_published_weights(
        self,
        backbone_path: str | os.PathLike | None = None,
        heads_path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        """Load the torchvision backbone file and the lpips heads file into this module (strict)."""
        files = WEIGHT_FILES[self.backbone]
        backbone_file = resolve_weight_file(
            files["backbone"], backbone_path, cache_dir, "backbone_path", self.backbone
        )
        heads_file = resolve_weight_file(files["heads"], heads_path, cache_dir, "heads_path", self.backbone)
        state_dict = convert_torchvision_state_dict(_load(backbone_file))
        state_dict.update(convert_lpips_heads_state_dict(_load(heads_file)))
        self.load_state_dict(state_dict, strict=True)

    def train(self, mode: bool = True) -> LPIPS:
        # Always eval: a parent module's `.train()` must not switch a frozen metric network into training behaviour.
        return super().train(False)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone activations at the five taps for images in [-1, 1] (after the LPIPS scaling layer)."""
        return self.net((images - self.shift) / self.scale)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape or input.dim() != 4 or input.shape[1] != 3:
            shapes = f"{tuple(input.shape)} and {tuple(target.shape)}"
            raise ValueError(f"LPIPS takes two (B, 3, H, W) batches of equal shape, got {shapes}.")
        dtype = self.lins[0].weight.dtype
        with torch.autocast(device_type=input.device.type, enabled=False):
            # One backbone pass over both batches: the backbone has no batch statistics, so this equals two passes.
            both = torch.cat([input, target]).to(dtype)
            distance = torch.zeros(input.shape[0], device=input.device, dtype=dtype)
            for feats, lin in zip(self.features(both), self.lins):
                feats_input, feats_target = unit_normalize(feats).chunk(2)
                # lin maps (B, C, h, w) -> (B, 1, h, w); the mean over it is the spatial average.
                distance = distance + lin((feats_input - feats_target).pow(2)).mean(dim=(1, 2, 3))
        return distance.float()


# --------------------------------------------------------------------------------------------- weight files and keys


def convert_torchvision_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision VGG16 / AlexNet state dict (`features.{i}.*`, `classifier.*`) -> `net.features.{i}.*`."""
    return {f"net.{key}": value for key, value in state_dict.items() if key.startswith("features.")}


def convert_lpips_heads_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lpips heads (`lin{k}.model.1.weight`, or `lins.{k}.model.1.weight`) -> `lins.{k}.weight`.

    `model.1` is the convolution behind the (training-only) dropout; a head saved without dropout has `model.0`.
    """
    converted = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "lins" and len(parts) == 5:  # lins.{k}.model.{j}.weight
            head = parts[1]
        elif parts[0].startswith("lin") and parts[0][3:].isdigit() and len(parts) == 4:  # lin{k}.model.{j}.weight
            head = parts[0][3:]
        else:
            continue
        converted[f"lins.{head}.weight"] = value
    return converted


def convert_lpips_package_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole `lpips.LPIPS` state dict (e.g. the original OptVQ's `loss.perceptual_loss.*` with the prefix removed)
    -> this module's keys. `net.slice{s}.{i}.*` keeps torchvision's index `i`; the scaling-layer constants are
    dropped (they are fixed here)."""
    converted = convert_lpips_heads_state_dict(state_dict)
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "net" and parts[1].startswith("slice"):
            converted[".".join(["net", "features", *parts[2:]])] = value
    return converted


def _load(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _offline() -> bool:
    # Read at call time (not huggingface_hub's import-time constant) so that setting it later is honoured.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_weight_file(
    spec: _WeightFile,
    local_path: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
    argument: str,
    backbone: str,
) -> str:
    """Path of a weight file: `local_path` if given, else the cached copy, else a fresh download into the cache."""
    if local_path is not None:
        if not os.path.isfile(local_path):
            raise FileNotFoundError(f"LPIPS({backbone!r}): {argument}={str(local_path)!r} is not a file.")
        return os.fspath(local_path)

    cache_dir = os.fspath(cache_dir) if cache_dir is not None else os.path.join(torch.hub.get_dir(), "checkpoints")
    destination = os.path.join(cache_dir, spec.filename)
    if os.path.isfile(destination):
        return destination

    how_to_fix = (
        f"Download {spec.url} on a machine with internet access and either pass its path, e.g. "
        f"LPIPS.from_pretrained(backbone={backbone!r}, {argument}='/path/to/{spec.filename}'), "
        f"or copy it to {destination}."
    )
    if _offline():
        raise FileNotFoundError(
            f"LPIPS({backbone!r}) needs the weight file {spec.filename!r}, which is not in {cache_dir!r}, and the "
            f"machine is offline (HF_HUB_OFFLINE=1). {how_to_fix}"
        )
    try:
        os.makedirs(cache_dir, exist_ok=True)
        # Downloads to a temporary file and renames it at the end: an interrupted download leaves no partial file.
        torch.hub.download_url_to_file(spec.url, destination, hash_prefix=spec.sha256_prefix, progress=True)
    except Exception as error:  # network, permission or checksum failure: all mean "the file is not available"
        raise FileNotFoundError(
            f"LPIPS({backbone!r}) needs the weight file {spec.filename!r}, which is not in {cache_dir!r}, and its "
            f"download failed ({type(error).__name__}: {error}). {how_to_fix}"
        ) from error
    return destination
