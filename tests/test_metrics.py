"""Reconstruction metrics: values against hand formulas and independent implementations (numpy, scipy,
scikit-image), accumulation over batches and processes, and the errors a user meets."""

import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import PooledFeatures
from scipy import ndimage
from skimage.metrics import structural_similarity

from optvq_hf.metrics import (
    FID_WEIGHTS_FILENAME,
    InceptionFeatureExtractor,
    ReconstructionMetrics,
    codebook_usage,
    frechet_distance,
    perplexity,
    psnr,
    rgb_to_y,
    ssim,
)


def smooth_images(seed, batch=2, size=32):
    """Images in [0, 1] with spatial structure (blurred noise), so SSIM has something to measure."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)


def noisy(images, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return (images + scale * torch.randn(images.shape, generator=g)).clamp(0, 1)


def y_numpy(images, standard):
    """Independent luma: explicit per-channel formulas in float64."""
    r, g, b = (images.double().numpy()[:, c] for c in range(3))
    if standard == "ycbcr":
        return (16.0 + 65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    return 0.299 * r + 0.587 * g + 0.114 * b


def mean_abs_lpips(x, y):
    """A stand-in for LPIPS with the same interface: per-image distances (B, 1, 1, 1) of images in [-1, 1]."""
    return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)


def fid_numpy(real, fake):
    """FID from raw features: np.mean / np.cov and tr sqrt(S1 S2) as the sum of sqrt of eigenvalues of S1 S2."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    diff = real.mean(0) - fake.mean(0)
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum()


# ---------------------------------------------------------------------------------------------------------------------
# PSNR
# ---------------------------------------------------------------------------------------------------------------------
def test_rgb_to_y_matches_bt601_formulas():
    images = smooth_images(0)
    for standard in ("ycbcr", "yiq"):
        y = rgb_to_y(images, standard)
        assert y.shape == (2, 1, 32, 32)
        np.testing.assert_allclose(y[:, 0].double().numpy(), y_numpy(images, standard), atol=1e-6)
    white, black = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    assert torch.allclose(rgb_to_y(white, "ycbcr"), torch.tensor(235 / 255))
    assert torch.allclose(rgb_to_y(black, "ycbcr"), torch.tensor(16 / 255))
    assert torch.allclose(rgb_to_y(white, "yiq"), torch.tensor(1.0))


def test_psnr_of_a_constant_offset():
    x = 0.2 + 0.6 * torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = x + 0.1
    # RGB: every pixel is off by 0.1, mse = 0.01.
    expected_rgb = 10 * math.log10(1 / (0.01 + 1e-8))
    torch.testing.assert_close(psnr(y, x, y_channel=False), torch.full((3,), expected_rgb, dtype=torch.float64))
    # Y of YCbCr: off by 0.1 * (65.481 + 128.553 + 24.966) / 255 = 0.1 * 219 / 255.
    expected_y = 10 * math.log10(1 / ((0.1 * 219 / 255) ** 2 + 1e-8))
    torch.testing.assert_close(psnr(y, x), torch.full((3,), expected_y, dtype=torch.float64), rtol=1e-6, atol=1e-5)
    # pyiqa's eps caps identical images at 80 dB.
    torch.testing.assert_close(psnr(x, x), torch.full((3,), 80.0, dtype=torch.float64))


def test_y_channel_psnr_matches_hand_formula_per_image():
    x = smooth_images(1, batch=3)
    y = noisy(x, 2, scale=torch.tensor([0.01, 0.05, 0.2]).view(3, 1, 1, 1))
    mse = ((y_numpy(y, "ycbcr") - y_numpy(x, "ycbcr")) ** 2).mean(axis=(1, 2))
    np.testing.assert_allclose(psnr(y, x).numpy(), 10 * np.log10(1 / (mse + 1e-8)), rtol=1e-6)
    assert psnr(y, x)[0] > psnr(y, x)[1] > psnr(y, x)[2]


# ---------------------------------------------------------------------------------------------------------------------
# SSIM
# ---------------------------------------------------------------------------------------------------------------------
def test_ssim_of_identical_images_is_one():
    x = smooth_images(3)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(ssim(x, x, y_channel=False), torch.ones(2, dtype=torch.float64))


def test_ssim_matches_scikit_image_on_rounded_yiq_luma():
    x = smooth_images(4, batch=3, size=40)
    # moderate noise: the contrast-structure term stays >= 0, where pyiqa's clipping changes nothing
    y = noisy(x, 5, scale=torch.tensor([0.02, 0.05, 0.1]).view(3, 1, 1, 1))
    y255, x255 = np.round(255 * y_numpy(y, "yiq")), np.round(255 * y_numpy(x, "yiq"))
    expected = [
        structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
        for a, b in zip(y255, x255)
    ]
    np.testing.assert_allclose(ssim(y, x).numpy(), expected, atol=1e-6)
    # pyiqa uses the rounded full-range YIQ luma, not the YCbCr Y of PSNR: both changes move the score.
    y_ycbcr = np.round(255 * y_numpy(y, "ycbcr"))[0]
    x_ycbcr = np.round(255 * y_numpy(x, "ycbcr"))[0]
    other = structural_similarity(
        y_ycbcr, x_ycbcr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert abs(other - expected[0]) > 1e-4


def test_ssim_clips_negative_contrast_structure_like_pyiqa():
    x = smooth_images(6, batch=1)
    y = 1 - x  # anti-correlated: the contrast-structure term is negative almost everywhere
    a, b = np.round(255 * y_numpy(y, "yiq"))[0], np.round(255 * y_numpy(x, "yiq"))[0]
    blur = lambda t: ndimage.gaussian_filter(t, 1.5, truncate=3.5)[5:-5, 5:-5]  # noqa: E731  11x11, valid part
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    lum = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    assert (cs < 0).mean() > 0.5
    np.testing.assert_allclose(ssim(y, x).numpy(), [(lum * np.maximum(cs, 0)).mean()], atol=1e-9)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 10, 10), torch.rand(1, 3, 10, 10))


# ---------------------------------------------------------------------------------------------------------------------
# Codebook usage and perplexity
# ---------------------------------------------------------------------------------------------------------------------
def test_usage_and_perplexity_of_known_histograms():
    k = 8
    uniform = torch.full((k,), 5)
    one_code = torch.zeros(k, dtype=torch.int64).index_fill_(0, torch.tensor([3]), 40)
    skewed = torch.tensor([3, 1, 0, 0, 0, 0, 0, 0])
    counts = torch.stack([uniform, one_code, skewed])
    torch.testing.assert_close(codebook_usage(counts), torch.tensor([1.0, 1 / k, 2 / k], dtype=torch.float64))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(perplexity(counts), torch.tensor([k, 1.0, math.exp(h)], dtype=torch.float64))
    assert math.isnan(perplexity(torch.zeros(k)))


def test_usage_and_perplexity_per_head_and_overall_from_indices():
    k, heads = 6, 2
    metrics = ReconstructionMetrics(("usage", "perplexity"), num_codes=k, num_heads=heads)
    images = torch.zeros(3, 3, 4, 4)
    # head 0 cycles through all 6 codes (uniform), head 1 always uses code 5; 3 images of 2x2 positions = 12 each.
    head0 = (torch.arange(12) % k).view(3, 1, 2, 2)
    head1 = torch.full((3, 1, 2, 2), 5)
    indices = torch.cat([head0, head1], dim=1)
    metrics.update(images[:2], images[:2], indices[:2])  # unequal batches: nothing may be averaged per batch
    metrics.update(images[2:], images[2:], indices[2:])
    result = metrics.compute()
    overall = np.array([2, 2, 2, 2, 2, 14]) / 24  # the shared codebook's histogram over both heads
    assert result["usage_head0"] == pytest.approx(1.0) and result["usage_head1"] == pytest.approx(1 / k)
    assert result["usage"] == pytest.approx(1.0)
    assert result["perplexity_head0"] == pytest.approx(k) and result["perplexity_head1"] == pytest.approx(1.0)
    assert result["perplexity"] == pytest.approx(math.exp(-(overall * np.log(overall)).sum()))
    with pytest.raises(ValueError, match="outside"):
        metrics.update(images[:1], images[:1], torch.full((1, 2, 2, 2), k))
    with pytest.raises(ValueError, match="num_heads=2"):
        metrics.update(images[:1], images[:1], torch.zeros(1, 1, 2, 2, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------------------------------
def test_frechet_distance_of_gaussians_in_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(v1) - sqrt(v2))^2 = 5 + (4 + 1 + 0).
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(10.0, abs=1e-9)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-9)
    # Full covariances, torch inputs: against the eigenvalue formula.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(5), b @ b.T + 0.1 * torch.eye(5)
    m1, m2 = torch.randn(5, generator=g, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    eig = np.linalg.eigvals((s1 @ s2).numpy()).real
    expected = float((m1 @ m1) + s1.trace() + s2.trace()) - 2 * np.sqrt(eig).sum()
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(mu1, np.diag(var1), mu2[:2], np.diag(var2[:2]))


def test_rfid_accumulates_features_over_batches_of_one():
    g = torch.Generator().manual_seed(1)
    originals = 0.8 * torch.rand(9, 3, 4, 4, generator=g) - 0.4
    reconstructions = originals + 0.2 * torch.randn(originals.shape, generator=g)
    reconstructions[0, 0, 0, 0] = 3.0  # out of range: clamped to 1 before the metrics, as in the original
    extractor = PooledFeatures()
    expected = fid_numpy(
        extractor((originals + 1) / 2).numpy(), extractor((reconstructions.clamp(-1, 1) + 1) / 2).numpy()
    )
    whole = ReconstructionMetrics(("rfid",), fid_feature_extractor=extractor)
    whole.update(originals, reconstructions)
    singles = ReconstructionMetrics(("rfid",), fid_feature_extractor=extractor)
    for i in range(9):
        singles.update(originals[i : i + 1], reconstructions[i : i + 1])
    assert whole.compute()["rfid"] == pytest.approx(expected, rel=1e-7)
    assert singles.compute()["rfid"] == pytest.approx(expected, rel=1e-7)
    assert singles.num_images == 9
    under_autocast = ReconstructionMetrics(("rfid",), fid_feature_extractor=extractor)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the metrics' networks run in float32 anyway
        under_autocast.update(originals, reconstructions)
    assert under_autocast.compute()["rfid"] == pytest.approx(expected, rel=1e-7)

    lonely = ReconstructionMetrics(("rfid",), fid_feature_extractor=extractor)
    lonely.update(originals[:1], reconstructions[:1])
    with pytest.warns(UserWarning, match="at least 2 images"):
        assert math.isnan(lonely.compute()["rfid"])


def test_missing_pytorch_fid_raises_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # makes `import pytorch_fid` fail even if installed
    for build in (InceptionFeatureExtractor, lambda: ReconstructionMetrics(("rfid",))):
        with pytest.raises(ImportError, match="pip install pytorch-fid") as error:
            build()
        assert FID_WEIGHTS_FILENAME in str(error.value) and "weights_path" in str(error.value)


def test_inception_extractor_loads_a_local_weights_file(monkeypatch, tmp_path):
    """The default extractor's plumbing, on a stand-in for pytorch_fid.inception with the real module's shape."""
    module = types.ModuleType("pytorch_fid.inception")

    def load_from_url(url, **kwargs):
        raise OSError("no network")

    class InceptionV3(torch.nn.Module):
        BLOCK_INDEX_BY_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}

        def __init__(self, output_blocks):
            super().__init__()
            assert output_blocks == [3]
            self.pool = torch.nn.Conv2d(3, 2048, 1)
            self.pool.load_state_dict(module.load_state_dict_from_url("https://.../" + FID_WEIGHTS_FILENAME))

        def forward(self, x):
            return [self.pool(x).mean(dim=(2, 3), keepdim=True)]

    module.InceptionV3, module.load_state_dict_from_url = InceptionV3, load_from_url
    package = types.ModuleType("pytorch_fid")
    package.inception = module
    monkeypatch.setitem(sys.modules, "pytorch_fid", package)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", module)

    with pytest.raises(RuntimeError, match="could not load the Inception weights"):
        InceptionFeatureExtractor()
    weights = torch.nn.Conv2d(3, 2048, 1).state_dict()
    torch.save(weights, tmp_path / FID_WEIGHTS_FILENAME)
    extractor = InceptionFeatureExtractor(weights_path=tmp_path / FID_WEIGHTS_FILENAME)
    assert module.load_state_dict_from_url is load_from_url  # the patch does not outlive the constructor
    images = torch.rand(2, 3, 5, 5)
    expected = images.mean(dim=(2, 3)) @ weights["weight"].flatten(1).T + weights["bias"]
    torch.testing.assert_close(extractor(images), expected)
    assert not any(p.requires_grad for p in extractor.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# The accumulating class
# ---------------------------------------------------------------------------------------------------------------------
def test_per_image_metrics_average_over_images_not_batches():
    x = smooth_images(8, batch=4) * 2 - 1
    rec = noisy(x, 9, scale=torch.tensor([0.02, 0.05, 0.1, 0.3]).view(4, 1, 1, 1)) * 2 - 1
    rec = torch.where(rec > 0.9, torch.full_like(rec, 1.5), rec)  # out-of-range values are clamped
    metrics = ReconstructionMetrics(("psnr", "psnr_rgb", "ssim", "lpips"), lpips_models={"lpips": mean_abs_lpips})
    metrics.update(x[:3], rec[:3])
    metrics.update(x[3:], rec[3:])
    x01, rec01 = (x + 1) / 2, (rec.clamp(-1, 1) + 1) / 2
    result = metrics.compute()
    assert set(result) == {"psnr", "psnr_rgb", "ssim", "lpips"}
    assert result["psnr"] == pytest.approx(psnr(rec01, x01).mean().item(), rel=1e-12)
    assert result["psnr_rgb"] == pytest.approx(psnr(rec01, x01, y_channel=False).mean().item(), rel=1e-12)
    assert result["ssim"] == pytest.approx(ssim(rec01, x01).mean().item(), rel=1e-12)
    assert result["lpips"] == pytest.approx(mean_abs_lpips(rec.clamp(-1, 1), x).mean().item(), rel=1e-6)
    per_batch = (psnr(rec01[:3], x01[:3]).mean() + psnr(rec01[3:], x01[3:]).mean()) / 2
    assert abs(result["psnr"] - per_batch.item()) > 1e-3  # the test can tell the two apart
    metrics.reset()
    with pytest.raises(RuntimeError, match="no images"):
        metrics.compute()


def test_num_valid_drops_padding_duplicates():
    x = smooth_images(10, batch=3) * 2 - 1
    rec = noisy(x, 11, scale=0.1) * 2 - 1
    indices = torch.randint(0, 5, (3, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    kwargs = dict(
        metrics=("psnr", "ssim", "rfid", "usage", "perplexity"),
        num_codes=5,
        num_heads=2,
        fid_feature_extractor=PooledFeatures(),
    )
    reference, padded = ReconstructionMetrics(**kwargs), ReconstructionMetrics(**kwargs)
    reference.update(x, rec, indices)
    padded.update(x[:2], rec[:2], indices[:2])
    pad = torch.tensor([2, 0])  # the sampler's padding repeats image 0 after the last real one
    padded.update(x[pad], rec[pad], indices[pad], num_valid=1)
    padded.update(x[:1], rec[:1], indices[:1], num_valid=0)
    assert padded.num_images == 3
    for key, value in reference.compute().items():
        assert padded.compute()[key] == pytest.approx(value, rel=1e-9), key


def test_sync_with_an_accelerator_reduce():
    class TwoIdenticalRanks:
        """Stands in for accelerate.Accelerator: `reduce(t, reduction="sum")` over two ranks holding equal data."""

        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            return tensor * 2

    x = smooth_images(12, batch=3) * 2 - 1
    rec, indices = noisy(x, 13) * 2 - 1, torch.randint(0, 4, (3, 1, 2, 2), generator=torch.Generator().manual_seed(1))
    kwargs = dict(metrics=("psnr", "rfid", "perplexity"), num_codes=4, fid_feature_extractor=PooledFeatures())
    single, doubled = ReconstructionMetrics(**kwargs), ReconstructionMetrics(**kwargs)
    single.update(x, rec, indices)
    doubled.update(x, rec, indices)
    doubled.sync(TwoIdenticalRanks())
    doubled.sync(TwoIdenticalRanks())  # a second sync is a no-op
    assert doubled.num_images == 6
    assert torch.equal(doubled.state["code_counts"], 2 * single.state["code_counts"])
    expected = single.compute()
    assert doubled.compute()["psnr"] == pytest.approx(expected["psnr"], rel=1e-12)
    assert doubled.compute()["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-12)
    # the same features twice: the means agree, the covariance differs only by the (n - 1) normalisation
    assert doubled.compute()["rfid"] == pytest.approx(
        fid_numpy(*[np.repeat(f.numpy(), 2, axis=0) for f in _features(x, rec)]), rel=1e-7
    )
    with pytest.raises(RuntimeError, match="synced"):
        doubled.update(x, rec, indices)

    from accelerate import Accelerator

    one_process = ReconstructionMetrics(**kwargs)
    one_process.update(x, rec, indices)
    one_process.sync(Accelerator(cpu=True))
    assert one_process.compute() == pytest.approx(expected, rel=1e-12)


def _features(x, rec):
    extractor = PooledFeatures()
    return extractor((x + 1) / 2), extractor((rec.clamp(-1, 1) + 1) / 2)


def test_unknown_metric_and_missing_codebook_size():
    with pytest.raises(ValueError, match="unknown metrics"):
        ReconstructionMetrics(("psnr", "fid"))
    with pytest.raises(ValueError, match="num_codes"):
        ReconstructionMetrics(("usage",))


def test_lpips_metrics_use_the_package_lpips(monkeypatch):
    perceptual = pytest.importorskip("optvq_hf.training.perceptual")
    torch.manual_seed(0)
    models = {
        "lpips": perceptual.LPIPS(backbone="alex", pretrained=False),
        "lpips_vgg": perceptual.LPIPS(backbone="vgg", pretrained=False),
    }
    x = smooth_images(14, batch=2) * 2 - 1
    rec = noisy(x, 15, scale=0.1) * 2 - 1
    metrics = ReconstructionMetrics(("lpips", "lpips_vgg"), lpips_models=models)
    metrics.update(x, rec)
    result = metrics.compute()
    for name, model in models.items():
        with torch.no_grad():
            assert result[name] == pytest.approx(model(rec, x).mean().item(), rel=1e-5)

    # Without models, the defaults are LPIPS.from_pretrained with the AlexNet (pyiqa's default) and VGG backbones.
    requested = []
    monkeypatch.setattr(
        perceptual.LPIPS,
        "from_pretrained",
        classmethod(lambda cls, backbone, **kw: requested.append(backbone) or models["lpips"]),
    )
    ReconstructionMetrics(("lpips", "lpips_vgg"))
    assert requested == ["alex", "vgg"]


# ---------------------------------------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------------------------------------
METRICS_FOR_PROCESSES = ("psnr", "psnr_rgb", "ssim", "lpips", "rfid", "usage", "perplexity")


def _dataset():
    x = smooth_images(20, batch=7, size=16) * 2 - 1
    rec = noisy(x, 21, scale=0.1) * 2 - 1
    indices = torch.randint(0, 6, (7, 2, 4, 4), generator=torch.Generator().manual_seed(22))
    return x, rec, indices


def _new_metrics():
    return ReconstructionMetrics(
        METRICS_FOR_PROCESSES,
        num_codes=6,
        num_heads=2,
        fid_feature_extractor=PooledFeatures(),
        lpips_models={"lpips": mean_abs_lpips},
    )


def _worker(rank, world_size, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    x, rec, indices = _dataset()
    # DistributedSampler layout for 7 images on 2 ranks: padded to 8 by repeating image 0; rank r takes r, r+2, ...
    shard = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])[rank::world_size]
    valid = 4 if rank == 0 else 3

    # Way 1: update the local shard with num_valid, then sum the state over ranks.
    by_sync = _new_metrics()
    for start in range(0, 4, 2):  # batches of 2; rank 1's last batch is [5, 0 (padding)]
        batch = shard[start : start + 2]
        by_sync.update(x[batch], rec[batch], indices[batch], num_valid=min(2, valid - start))
    by_sync.sync()

    # Way 2: gather per-sample statistics from all ranks (as accelerator.gather_for_metrics does) and accumulate.
    by_gather = _new_metrics()
    for start in range(0, 4, 2):
        batch = shard[start : start + 2]
        stats = by_gather.sample_statistics(x[batch], rec[batch], indices[batch])
        gathered = {}
        for key, value in stats.items():
            parts = [torch.empty_like(value) for _ in range(world_size)]
            dist.all_gather(parts, value)
            gathered[key] = torch.cat(parts)[: 7 - 2 * start]  # drop the padding duplicate at the end
        by_gather.accumulate(gathered)

    if rank == 1:
        torch.save({"sync": by_sync.compute(), "gather": by_gather.compute()}, out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_several_processes_equal_one_process(tmp_path):
    out_file = tmp_path / "results.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    results = torch.load(out_file)

    x, rec, indices = _dataset()
    single = _new_metrics()
    single.update(x[:3], rec[:3], indices[:3])
    single.update(x[3:], rec[3:], indices[3:])
    expected = single.compute()
    assert single.num_images == 7
    for way in ("sync", "gather"):
        assert set(results[way]) == set(expected)
        for key, value in expected.items():
            assert results[way][key] == pytest.approx(value, rel=1e-9), (way, key)
