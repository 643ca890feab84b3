"""How far this package's resize (PIL bicubic) is from the original OptVQ evaluation resize (OpenCV bilinear).

The original evaluates ImageNet with albumentations `SmallestMaxSize(max_size=256)` (default interpolation
`cv2.INTER_LINEAR`) then `CenterCrop(256, 256)`, on the uint8 RGB array of the photo (src/optvq/data/preprocessor.py
`imagenet_preprocessor(is_train=False)`, src/optvq/data/dataset.py `ImageNetDataset.__getitem__`), then x / 255
normalised with mean 0.5, std 0.5. `OptVQImageProcessor` resizes the shorter side with PIL bicubic, which filters
over the scaled support when downscaling (antialiased), while `cv2.INTER_LINEAR` samples 2x2 neighbours at half-pixel
centres whatever the scale (no antialiasing).

For each scikit-image sample photo at its native size (shorter side 300 - 1024 pixels, close to ImageNet's), both
protocols give a 256 x 256 uint8 image (same output size rule, same crop offsets); the table gives their mean and
max absolute difference in [0, 255] levels and the PSNR between them (peak 255). OpenCV INTER_LINEAR is emulated
with `torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)` rounded to uint8; with
`--cv2-path` pointing at an installed opencv-python(-headless), the emulation is compared with `cv2.resize` itself
(OpenCV uses 11-bit fixed-point weights for uint8, so up to 1 level of difference is expected), and so is
`opencv_linear_fixed`, a transcription of OpenCV's integer arithmetic.

Only input-level differences are measured: what this does to reconstruction PSNR needs a converted released
checkpoint (a random-weight model says nothing about reconstruction quality).

    python benchmarks/resize.py
    pip install --target /tmp/cv2site opencv-python-headless && python benchmarks/resize.py --cv2-path /tmp/cv2site
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from optvq_hf import OptVQImageProcessor

# Colour photos and grayscale photos of scikit-image that ship in its wheel (no download).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina", "camera", "moon", "page")


def output_size(height: int, width: int, side: int) -> tuple[int, int]:
    """albumentations SmallestMaxSize: both sides scaled by side / shorter, rounded (Python round)."""
    scale = side / min(height, width)
    return max(side, round(height * scale)), max(side, round(width * scale))


def center_crop(array: np.ndarray, side: int) -> np.ndarray:
    """albumentations CenterCrop: offsets (H - side) // 2 and (W - side) // 2 (the processor uses the same)."""
    top, left = (array.shape[0] - side) // 2, (array.shape[1] - side) // 2
    return array[top : top + side, left : left + side]


def opencv_linear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """`cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)` for uint8 HWC, without OpenCV."""
    pixels = torch.from_numpy(array).permute(2, 0, 1)[None].double()
    resized = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _opencv_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's linear taps: float32 source positions, weights in 11-bit fixed point (INTER_RESIZE_COEF_SCALE)."""
    position = ((np.arange(target) + 0.5) * (source / target) - 0.5).astype(np.float32).astype(np.float64)
    first = np.floor(position).astype(np.int64)
    fraction = (position - first).astype(np.float32)
    fraction[first < 0], first[first < 0] = 0, 0
    beyond = first >= source - 1
    fraction[beyond], first[beyond] = 0, source - 1
    weight0 = np.round((np.float32(1) - fraction) * np.float32(2048)).astype(np.int64)
    return first, np.minimum(first + 1, source - 1), weight0, 2048 - weight0


def opencv_linear_fixed(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """INTER_LINEAR in OpenCV's integer arithmetic (vectorised uint8 vertical pass: >> 4, >> 16, then +2 >> 2)."""
    x0, x1, a0, a1 = _opencv_taps(array.shape[1], width)
    y0, y1, b0, b1 = _opencv_taps(array.shape[0], height)
    pixels = array.astype(np.int64)
    rows = pixels[:, x0] * a0[None, :, None] + pixels[:, x1] * a1[None, :, None]
    b0, b1 = b0[:, None, None], b1[:, None, None]
    out = (((b0 * (rows[y0] >> 4)) >> 16) + ((b1 * (rows[y1] >> 4)) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def original_protocol(array: np.ndarray, side: int, cv2=None, fixed: bool = False) -> np.ndarray:
    height, width = output_size(*array.shape[:2], side)
    if cv2 is not None:
        resized = cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)
    elif fixed:
        resized = opencv_linear_fixed(array, height, width)
    else:
        resized = opencv_linear(array, height, width)
    return center_crop(resized, side)


def package_protocol(array: np.ndarray, side: int) -> np.ndarray:
    processor = OptVQImageProcessor(resolution=side)
    pixels = processor(PIL.Image.fromarray(array), return_tensors="np")["pixel_values"][0]
    return np.round((pixels.transpose(1, 2, 0) + 1.0) * 127.5).astype(np.uint8)


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, int, float]:
    """Mean and max absolute difference (levels) and PSNR (dB, peak 255)."""
    difference = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(difference**2))
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return float(np.abs(difference).mean()), int(np.abs(difference).max()), psnr


def load_photo(name: str) -> np.ndarray:
    from skimage import data

    array = getattr(data, name)()
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3].astype(np.uint8))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=256, help="output side (the released models: 256)")
    parser.add_argument("--photos", nargs="+", default=list(PHOTOS), help="scikit-image sample photo names")
    parser.add_argument(
        "--cv2-path",
        default=None,
        help="a folder holding an installed opencv-python(-headless), to check the emulation",
    )
    args = parser.parse_args(argv)
    cv2 = None
    if args.cv2_path:
        sys.path.insert(0, args.cv2_path)
        cv2 = importlib.import_module("cv2")
        print(f"OpenCV {cv2.__version__} from {cv2.__file__}")

    header = f"{'photo':<22}{'size':>11}  {'bicubic vs cv2-linear: mean':>28}{'max':>5}{'PSNR dB':>9}"
    if cv2 is not None:
        header += (
            f"  {'torch emulation vs cv2: max':>28}{'differing':>11}  {'fixed-point vs cv2: max':>24}{'differing':>11}"
        )
    print(header)
    totals, psnrs, emulation_max = [], [], 0
    for name in args.photos:
        array = load_photo(name)
        reference = original_protocol(array, args.side, cv2)
        ours = package_protocol(array, args.side)
        mean, largest, psnr = compare(ours, reference)
        totals.append(mean)
        psnrs.append(psnr)
        line = f"{name:<22}{array.shape[1]:>5}x{array.shape[0]:<5}  {mean:>28.3f}{largest:>5}{psnr:>9.2f}"
        if cv2 is not None:
            for fixed in (False, True):
                emulated = original_protocol(array, args.side, fixed=fixed)
                e_max = compare(emulated, reference)[1]
                emulation_max = max(emulation_max, e_max)
                line += f"  {e_max:>{24 if fixed else 28}}{np.mean(emulated != reference):>10.3%}"
        print(line)
    print(f"{'mean':<22}{'':>11}  {np.mean(totals):>28.3f}{'':>5}{np.mean(psnrs):>9.2f}")
    if cv2 is not None:
        print(f"emulations vs cv2.resize INTER_LINEAR: at most {emulation_max} level(s)")


if __name__ == "__main__":
    main()
