"""
An offline generation metric for scikit-learn's handwritten digits: a small CNN classifier trained on real digits,
then for generated images (a) the classifier's accuracy on class-conditional samples (does a "3" look like a 3) and
(b) "digits-FD", the Frechet distance (`optvq_hf.metrics.frechet_distance`) between the classifier's penultimate
features of samples and of held-out real digits. The FD of two disjoint real splits is the metric's floor.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .metrics import frechet_distance


def load_digits_images(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as (N, 1, size, size) float images in [-1, 1] (bilinear upsampling) and labels."""
    from .training.data import load_sklearn_digits

    digits, targets = load_sklearn_digits()
    images = torch.from_numpy(digits.astype(np.float32) / 16.0)[:, None]  # [0, 1]
    if size != 8:
        images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.from_numpy(targets).long()


class DigitsClassifier(nn.Module):
    """Two conv blocks and a 64-feature penultimate layer; `features` returns that layer (the FD's embedding)."""

    def __init__(self, num_classes: int = 10, width: int = 16, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_digits_classifier(
    images: torch.Tensor, labels: torch.Tensor, *, steps: int = 400, batch_size: int = 64, seed: int = 0
) -> DigitsClassifier:
    """Adam on cross-entropy with small random shifts (so slightly off-centre samples are still read)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier(num_classes=int(labels.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        batch = images[pick]
        dy, dx = torch.randint(-1, 2, (2,), generator=generator).tolist()
        batch = torch.roll(batch, shifts=(dy, dx), dims=(2, 3))
        loss = nn.functional.cross_entropy(model(batch), labels[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def classifier_features(model: DigitsClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features (N, feature_dim) of images (N, 1, H, W) in [-1, 1]."""
    model.eval()
    return torch.cat(
        [model.features(images[i : i + batch_size].float()) for i in range(0, images.shape[0], batch_size)]
    )


@torch.no_grad()
def class_accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images the classifier assigns to their intended class."""
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(
            f"need as many labels as images (> 0), got {images.shape[0]} images, {labels.shape[0]} labels"
        )
    predictions = model.head(classifier_features(model, images)).argmax(dim=1)
    return float((predictions == labels.to(predictions.device)).double().mean())


def feature_frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted (mean, unbiased covariance) to two feature sets (N, D)."""
    if features_a.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"need two (N, D) feature sets, got {tuple(features_a.shape)} and {tuple(features_b.shape)}")
    if min(features_a.shape[0], features_b.shape[0]) < 2:
        raise ValueError("each feature set needs at least 2 rows for a covariance")
    a, b = features_a.double().cpu().numpy(), features_b.double().cpu().numpy()
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def digits_fd(model: DigitsClassifier, images: torch.Tensor, references: torch.Tensor) -> float:
    """digits-FD: the Frechet distance of the classifier's penultimate features of `images` and `references`."""
    return feature_frechet_distance(classifier_features(model, images), classifier_features(model, references))


__all__ = [
    "DigitsClassifier",
    "class_accuracy",
    "classifier_features",
    "digits_fd",
    "feature_frechet_distance",
    "load_digits_images",
    "train_digits_classifier",
]
