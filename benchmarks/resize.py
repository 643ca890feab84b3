"""How far this package's default resize (PIL bicubic) is from the original OptVQ evaluation resize (OpenCV bilinear).

The original evaluates ImageNet with albumentations `SmallestMaxSize(max_size=256)` (default interpolation
`cv2.INTER_LINEAR`) then `CenterCrop(256, 256)`, on the uint8 RGB array of the photo (src/optvq/data/preprocessor.py
`imagenet_preprocessor(is_train=False)`, src/optvq/data/dataset.py `ImageNetDataset.__getitem__`), then x / 255
normalised with mean 0.5, std 0.5. `OptVQImageProcessor` resizes the shorter side with PIL bicubic by default, which
filters over the scaled support when downscaling (antialiased), while `cv2.INTER_LINEAR` samples 2x2 neighbours at
half-pixel centres whatever the scale (no antialiasing); `OptVQImageProcessor(resample="opencv_bilinear")` uses
`optvq_hf.opencv_resize`, a numpy transcription of OpenCV's fixed-point INTER_LINEAR.

For each scikit-image sample photo at its native size (shorter side 300 - 1024 pixels, close to ImageNet's), the
original protocol is rebuilt here from albumentations' rules (`output_size`, `center_crop` below) with the package's
transcription, or with `cv2.resize` itself given `--cv2-path` to an installed opencv-python(-headless). Columns:
mean and max absolute difference in [0, 255] levels and PSNR (peak 255) between the default processor's 256 x 256
uint8 image and the original protocol's; the max difference of `resample="opencv_bilinear"` (0: the same image);
with `--cv2-path`, the transcription against `cv2.resize` (max difference, share of differing values).

Only input-level differences are measured: what this does to reconstruction PSNR needs a converted released
checkpoint (a random-weight model says nothing about reconstruction quality).

    OMP_NUM_THREADS=1 python benchmarks/resize.py
    pip install --target /tmp/cv2site opencv-python-headless && python benchmarks/resize.py --cv2-path /tmp/cv2site
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

import numpy as np
import PIL.Image

from optvq_hf import OptVQImageProcessor
from optvq_hf.opencv_resize import opencv_bilinear_resize

# Colour photos and grayscale photos of scikit-image that ship in its wheel (no download).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina", "camera", "moon", "page")


def output_size(height: int, width: int, side: int) -> tuple[int, int]:
    """albumentations SmallestMaxSize: both sides scaled by side / shorter, rounded (Python round)."""
    scale = side / min(height, width)
    return round(height * scale), round(width * scale)


def center_crop(array: np.ndarray, side: int) -> np.ndarray:
    """albumentations CenterCrop: offsets (H - side) // 2 and (W - side) // 2."""
    top, left = (array.shape[0] - side) // 2, (array.shape[1] - side) // 2
    return array[top : top + side, left : left + side]


def original_protocol(array: np.ndarray, side: int, cv2=None) -> np.ndarray:
    height, width = output_size(*array.shape[:2], side)
    if cv2 is not None:
        resized = cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)
    else:
        resized = opencv_bilinear_resize(array, height, width)
    return center_crop(resized, side)


def package_protocol(array: np.ndarray, side: int, resample: str = "bicubic") -> np.ndarray:
    processor = OptVQImageProcessor(resolution=side, resample=resample)
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
        help="a folder holding an installed opencv-python(-headless), to check the transcription against it",
    )
    args = parser.parse_args(argv)
    cv2 = None
    if args.cv2_path:
        sys.path.insert(0, args.cv2_path)
        cv2 = importlib.import_module("cv2")
        print(f"OpenCV {cv2.__version__} from {cv2.__file__}")

    header = f"{'photo':<22}{'size':>11}  {'bicubic vs original: mean':>26}{'max':>5}{'PSNR dB':>9}"
    header += f"  {'opencv_bilinear: max':>20}"
    if cv2 is not None:
        header += f"  {'transcription vs cv2: max':>26}{'differing':>11}"
    print(header)
    totals, psnrs, largest_any, option_max, transcription_max = [], [], 0, 0, 0
    for name in args.photos:
        array = load_photo(name)
        reference = original_protocol(array, args.side, cv2)
        mean, largest, psnr = compare(package_protocol(array, args.side), reference)
        totals.append(mean)
        psnrs.append(psnr)
        largest_any = max(largest_any, largest)
        option = compare(package_protocol(array, args.side, "opencv_bilinear"), reference)[1]
        option_max = max(option_max, option)
        line = f"{name:<22}{array.shape[1]:>5}x{array.shape[0]:<5}  {mean:>26.3f}{largest:>5}{psnr:>9.2f}{option:>22}"
        if cv2 is not None:
            transcribed = original_protocol(array, args.side)
            t_max = compare(transcribed, reference)[1]
            transcription_max = max(transcription_max, t_max)
            line += f"  {t_max:>26}{np.mean(transcribed != reference):>10.3%}"
        print(line)
    print(f"{'mean':<22}{'':>11}  {np.mean(totals):>26.3f}{largest_any:>5}{np.mean(psnrs):>9.2f}{option_max:>22}")
    if cv2 is not None:
        print(f"transcription vs cv2.resize INTER_LINEAR: at most {transcription_max} level(s)")


if __name__ == "__main__":
    main()
