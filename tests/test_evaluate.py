"""examples/evaluate.py end to end: a tiny saved model on a local imagefolder, its metrics against the same metrics
computed directly on the same reconstructions, the policy for metrics whose weights are missing, bad flags, and a
2-process run that equals the 1-process run (no sample counted twice)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import PooledFeatures, load_example, tiny_config_kwargs
from scipy import linalg

from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel
from optvq_hf.metrics import psnr, ssim
from optvq_hf.training.perceptual import LPIPS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "evaluate.py"
# (height, width) of the test images: landscape, portrait and square, all larger than the 32x32 crop but one.
IMAGE_SIZES = [(40, 48), (48, 40), (32, 32), (50, 64), (36, 36)]
NUM_CODES = 64


evaluate_example = load_example("evaluate")


@pytest.fixture(autouse=True)
def offline_torch_home(monkeypatch, tmp_path, fresh_accelerate_state):
    # No cached LPIPS / Inception weights: the machine state of the tests is "offline, nothing downloaded".
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Smooth colour images (blurred noise) of several sizes, as PNG files in an imagefolder."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate(IMAGE_SIZES):
        coarse = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.Resampling.BILINEAR)
        image.save(folder / f"image_{i}.png")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    OptVQModel(OptVQConfig(**tiny_config_kwargs(num_codes=NUM_CODES))).save_pretrained(folder)
    return folder


def run(model_dir, image_folder, output_dir, *extra):
    argv = ["--model", str(model_dir), "--data_dir", str(image_folder), "--output_dir", str(output_dir)]
    argv += ["--batch_size", "2", "--num_workers", "0", *extra]
    return evaluate_example.main(argv)


def direct_reconstructions(model_dir, image_folder, resample="bicubic"):
    """The images as the processor prepares them, and the saved model's reconstructions and indices, in one batch."""
    paths = sorted(image_folder.glob("*.png"))
    processor = OptVQImageProcessor(resolution=32, resample=resample)
    pixel_values = processor([PIL.Image.open(p) for p in paths])["pixel_values"]
    model = OptVQModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        output = model(pixel_values)
    return pixel_values, output.reconstruction.clamp(-1, 1), output.indices


def test_metrics_equal_the_metrics_of_the_reconstructions(model_dir, image_folder, tmp_path):
    names = "psnr,psnr_rgb,ssim,usage,perplexity"
    results = run(model_dir, image_folder, tmp_path, "--metrics", names)

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == results
    assert list(written) == names.split(",")

    x, rec, indices = direct_reconstructions(model_dir, image_folder)
    x01, rec01 = (x + 1) / 2, (rec + 1) / 2
    # Batches of 2 in the script vs one batch of 5 here: outputs agree to float32 rounding, not bitwise.
    assert written["psnr"] == pytest.approx(psnr(rec01, x01).mean().item(), rel=1e-5)
    assert written["psnr_rgb"] == pytest.approx(psnr(rec01, x01, y_channel=False).mean().item(), rel=1e-5)
    assert written["psnr"] != pytest.approx(written["psnr_rgb"], rel=1e-3)  # Y and RGB really differ
    assert written["ssim"] == pytest.approx(ssim(rec01, x01).mean().item(), abs=1e-4)
    counts = torch.bincount(indices.flatten(), minlength=NUM_CODES).double()
    assert written["usage"] == pytest.approx((counts > 0).double().mean().item(), abs=1e-12)
    assert 0 < written["usage"] <= 1
    p = counts[counts > 0] / counts.sum()
    assert written["perplexity"] == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-6)
    assert 1 <= written["perplexity"] <= NUM_CODES

    report = (tmp_path / "metrics.md").read_text()
    assert f"| psnr | {written['psnr']:.4f} | PSNR (dB) on Y of YCbCr" in report
    assert "5 images" in report and "center crop 32x32" in report
    assert "usage_head0" in report  # per-head values next to the table

    # The grid: originals on top, reconstructions below, as the processor renders them (2-pixel white gaps).
    grid = np.asarray(PIL.Image.open(tmp_path / evaluate_example.GRID_FILENAME))
    assert grid.shape == (2 * 32 + 2, 5 * 32 + 4 * 2, 3)
    processor = OptVQImageProcessor(resolution=32)
    top, bottom = processor.postprocess(x, "np"), processor.postprocess(rec, "np")
    for i in range(5):  # imagefolder keeps the sorted file order
        left = i * 34
        np.testing.assert_array_equal(grid[:32, left : left + 32], top[i])
        assert np.abs(grid[34:, left : left + 32].astype(int) - bottom[i].astype(int)).max() <= 1
    assert (grid[32:34] == 255).all()


def test_default_metrics_skip_missing_weights_with_a_warning(model_dir, image_folder, tmp_path):
    with pytest.warns(UserWarning, match="skipping") as record:
        results = run(model_dir, image_folder, tmp_path, "--max_samples", "3")
    messages = [str(w.message) for w in record]
    skipped = {name for name in ("lpips", "lpips_vgg", "rfid") if any(f"skipping {name} " in m for m in messages)}
    assert skipped == {"lpips", "lpips_vgg", "rfid"}
    assert list(results) == ["psnr", "psnr_rgb", "ssim", "usage", "perplexity"]
    report = (tmp_path / "metrics.md").read_text()
    assert "3 images" in report and "Skipped" in report and "- rfid:" in report


def test_named_metrics_with_missing_weights_raise(model_dir, image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="offline"):
        run(model_dir, image_folder, tmp_path, "--metrics", "psnr,lpips")
    if importlib.util.find_spec("pytorch_fid") is None:
        with pytest.raises(ImportError, match="pip install pytorch-fid"):
            run(model_dir, image_folder, tmp_path, "--metrics", "rfid")


def random_lpips(backbone="vgg", **kwargs):
    torch.manual_seed({"alex": 1, "vgg": 2}[backbone])
    return LPIPS(backbone, pretrained=False)


def test_lpips_and_rfid_use_the_given_networks(model_dir, image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_example.LPIPS, "from_pretrained", staticmethod(random_lpips))
    monkeypatch.setattr(evaluate_example, "InceptionFeatureExtractor", lambda *a, **k: PooledFeatures(3, seed=3))
    results = run(model_dir, image_folder, tmp_path, "--metrics", "lpips,lpips_vgg,rfid")
    assert list(results) == ["lpips", "lpips_vgg", "rfid"]

    x, rec, _ = direct_reconstructions(model_dir, image_folder)
    for name, backbone in (("lpips", "alex"), ("lpips_vgg", "vgg")):
        expected = random_lpips(backbone)(rec, x).mean().item()
        assert results[name] == pytest.approx(expected, rel=1e-4), name
    assert results["lpips"] != pytest.approx(results["lpips_vgg"], rel=1e-2)

    with torch.no_grad():
        real, fake = (PooledFeatures(3, seed=3)((t + 1) / 2).double().numpy() for t in (x, rec))
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    diff = real.mean(0) - fake.mean(0)
    expected_fid = diff @ diff + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert results["rfid"] == pytest.approx(expected_fid, rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("resample", ["opencv_bilinear", "nearest"])
def test_the_resample_flag_sets_the_resizing_filter(model_dir, image_folder, tmp_path, resample):
    written = run(model_dir, image_folder, tmp_path, "--metrics", "psnr", "--resample", resample)
    x, rec, _ = direct_reconstructions(model_dir, image_folder, resample)
    expected = psnr((rec + 1) / 2, (x + 1) / 2).mean().item()
    assert written["psnr"] == pytest.approx(expected, rel=1e-5)
    x_default, rec_default, _ = direct_reconstructions(model_dir, image_folder)
    assert not torch.equal(x, x_default)  # the filter changed the pixels the metrics saw
    assert written["psnr"] != pytest.approx(psnr((rec_default + 1) / 2, (x_default + 1) / 2).mean().item(), rel=1e-6)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--metrics", "psnr,psnrr"], r"unknown metric name\(s\) \['psnrr'\]"),
        (["--metrics", ","], "unknown metric"),
        (["--split", "test"], r"--split 'test' not in the splits .*\['train'\]"),
        (["--image_column", "picture"], "--image_column 'picture' not in the dataset's columns"),
        (["--batch_size", "0"], "--batch_size must be >= 1"),
        (["--max_samples", "0"], "--max_samples must be >= 1"),
        (["--dataset_name", "some/dataset"], "exactly one of --dataset_name"),
        (["--resample", "cubic"], r"--resample 'cubic': resample must be one of"),
    ],
)
def test_bad_flags_raise_a_clear_error(model_dir, image_folder, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        run(model_dir, image_folder, tmp_path, *flags)


def test_an_unreadable_image_is_named(model_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    PIL.Image.new("RGB", (32, 32), (10, 200, 30)).save(folder / "good.png")
    (folder / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="unreadable image .*truncated.png"):
        run(model_dir, folder, tmp_path / "out", "--metrics", "psnr")


def test_missing_data_source_and_folder(model_dir, tmp_path):
    with pytest.raises(ValueError, match="exactly one of --dataset_name"):
        evaluate_example.main(["--model", str(model_dir)])
    with pytest.raises(ValueError, match="is not a directory"):
        evaluate_example.main(["--model", str(model_dir), "--data_dir", str(tmp_path / "nowhere")])


# A fresh interpreter that forks two ranks before any tensor work: forking a process whose OpenMP threads have run
# (this one, after earlier tests) can hang the children, and spawning re-imports everything in each rank.
TWO_RANKS = """
import importlib.util, sys, warnings
warnings.simplefilter("ignore")
spec = importlib.util.spec_from_file_location("optvq_evaluate_example", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module  # a dataclass resolves its annotations through sys.modules
spec.loader.exec_module(module)
from accelerate import debug_launcher
debug_launcher(module.main, args=(sys.argv[2:],), num_processes=2)
"""


@pytest.mark.slow
def test_two_processes_equal_one_process(model_dir, image_folder, tmp_path):
    names = "psnr,psnr_rgb,ssim,usage,perplexity"
    one = run(model_dir, image_folder, tmp_path / "one", "--metrics", names)
    # 5 images in batches of 2 over 2 processes: the last round pads with duplicates that must not be counted.
    argv = ["--model", str(model_dir), "--data_dir", str(image_folder), "--output_dir", str(tmp_path / "two")]
    argv += ["--batch_size", "2", "--num_workers", "0", "--metrics", names]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", TWO_RANKS, str(EXAMPLE), *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert list(two) == list(one)
    for name in one:
        assert two[name] == pytest.approx(one[name], rel=1e-6), name
    report = (tmp_path / "two" / "metrics.md").read_text()
    assert "5 images (each counted once over 2 process(es))" in report
