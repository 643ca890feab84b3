"""LPIPS: the v0.1 formula, its frozen state, and the loading of the published weight files.

The networks here have random weights (`pretrained=False`): the published files are too large for tests and need
the network. The key layouts of those files are written out below from torchvision's and the lpips package's code.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from optvq_hf.training.perceptual import (
    LPIPS,
    WEIGHT_FILES,
    convert_lpips_package_state_dict,
    unit_normalize,
)

# torchvision `features` convolutions: (index, out_channels, in_channels, kernel) and the max-pool positions.
VGG16_CONVS = [
    (0, 64, 3, 3),
    (2, 64, 64, 3),
    (5, 128, 64, 3),
    (7, 128, 128, 3),
    (10, 256, 128, 3),
    (12, 256, 256, 3),
    (14, 256, 256, 3),
    (17, 512, 256, 3),
    (19, 512, 512, 3),
    (21, 512, 512, 3),
    (24, 512, 512, 3),
    (26, 512, 512, 3),
    (28, 512, 512, 3),
]
ALEXNET_CONVS = [(0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3)]
# lpips v0.1 taps: the ReLU right after these convolutions.
VGG16_TAP_CONVS = (2, 7, 14, 21, 28)
ALEXNET_TAP_CONVS = (0, 3, 6, 8, 10)
HEAD_CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}


def images(seed: int, batch: int = 2, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def vgg() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS("vgg", pretrained=False)


@pytest.fixture(scope="module")
def alex() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS("alex", pretrained=False)


@pytest.fixture(params=["vgg", "alex"])
def lpips(request, vgg, alex) -> LPIPS:
    return {"vgg": vgg, "alex": alex}[request.param]


# ------------------------------------------------------------------------------------------------------- the formula


def reference_taps(backbone: str, state_dict: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """The backbone written out with functional ops from the torchvision layer table (independent of the module)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    x = (x - shift) / scale
    taps = []
    if backbone == "vgg":
        for index, _, _, _ in VGG16_CONVS:
            if index in (5, 10, 17, 24):  # a max-pool precedes these
                x = F.max_pool2d(x, 2, 2)
            w, b = state_dict[f"net.features.{index}.weight"], state_dict[f"net.features.{index}.bias"]
            x = F.relu(F.conv2d(x, w, b, padding=1))
            if index in VGG16_TAP_CONVS:
                taps.append(x)
    else:
        for index, _, _, kernel in ALEXNET_CONVS:
            if index in (3, 6):
                x = F.max_pool2d(x, 3, 2)
            stride, padding = (4, 2) if index == 0 else (1, kernel // 2)
            w, b = state_dict[f"net.features.{index}.weight"], state_dict[f"net.features.{index}.bias"]
            x = F.relu(F.conv2d(x, w, b, stride=stride, padding=padding))
            taps.append(x)
    return taps


def test_distance_matches_the_lpips_formula_written_out(lpips):
    x, y = images(1), images(2)
    state_dict = lpips.state_dict()
    taps_x, taps_y = reference_taps(lpips.backbone, state_dict, x), reference_taps(lpips.backbone, state_dict, y)
    # Tap by tap first: with random weights the deep layers add little to the distance, so a wrong tap index would
    # hide in the sum.
    for actual_tap, expected_tap in zip(lpips.features(x), taps_x, strict=True):
        torch.testing.assert_close(actual_tap, expected_tap, rtol=1e-4, atol=1e-5)
    expected = torch.zeros(2, dtype=torch.float64)
    for k, (fx, fy) in enumerate(zip(taps_x, taps_y)):
        ux = fx.double() / (fx.double().pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        uy = fy.double() / (fy.double().pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = state_dict[f"lins.{k}.weight"].double().view(1, -1, 1, 1)
        expected += (w * (ux - uy) ** 2).sum(1).mean(dim=(1, 2))
    actual = lpips(x, y)
    assert actual.shape == (2,) and actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-7)
    assert (actual > 0).all()


def test_unit_normalize_and_scaling_constants_by_hand(vgg):
    features = torch.tensor([3.0, 4.0, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(unit_normalize(features).flatten(), torch.tensor([0.6, 0.8, 0.0]))
    # All-zero features stay finite (the epsilon), as in lpips.
    assert torch.equal(unit_normalize(torch.zeros(1, 4, 2, 2)), torch.zeros(1, 4, 2, 2))

    seen = {}
    hook = vgg.net.features[0].register_forward_pre_hook(lambda module, args: seen.setdefault("input", args[0]))
    try:
        vgg.features(torch.zeros(1, 3, 32, 32))
    finally:
        hook.remove()
    # A black-to-grey image of zeros becomes (0 - shift) / scale: 0.030/0.458, 0.088/0.448, 0.188/0.450.
    torch.testing.assert_close(seen["input"][0, :, 0, 0], torch.tensor([0.030 / 0.458, 0.088 / 0.448, 0.188 / 0.450]))


def test_identical_images_have_distance_zero(lpips):
    x = images(3)
    assert torch.equal(lpips(x, x), torch.zeros(2))


def test_distance_is_symmetric(lpips):
    x, y = images(4), images(5)
    torch.testing.assert_close(lpips(x, y), lpips(y, x), rtol=1e-5, atol=1e-7)


def test_distance_grows_with_the_perturbation(vgg):
    x = images(6)
    noise = images(7)
    small, large = vgg(x, x + 0.05 * noise), vgg(x, x + 0.5 * noise)
    assert (small > 0).all() and (large > small).all()


def test_taps_have_the_published_channels_and_resolutions(lpips):
    taps = lpips.features(images(8, batch=1, size=64))
    assert [t.shape[1] for t in taps] == list(HEAD_CHANNELS[lpips.backbone])
    sides = {"vgg": [64, 32, 16, 8, 4], "alex": [15, 7, 3, 3, 3]}[lpips.backbone]
    assert [t.shape[-1] for t in taps] == sides


def test_rejects_mismatched_inputs(vgg):
    with pytest.raises(ValueError, match="equal shape"):
        vgg(images(0, size=32), images(0, size=64))
    with pytest.raises(ValueError, match="backbone"):
        LPIPS("squeeze", pretrained=False)


# ---------------------------------------------------------------------------------------------------------- frozen


def test_network_is_frozen_but_passes_gradients_to_the_inputs(vgg):
    assert all(not p.requires_grad for p in vgg.parameters())
    vgg.train()
    assert not vgg.training and not any(m.training for m in vgg.modules())

    x = images(9).requires_grad_()
    vgg(x, images(10)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in vgg.parameters())


def test_bfloat16_autocast_computes_in_float32(vgg):
    x, y = images(11), images(12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = vgg(x.bfloat16(), y.bfloat16())
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, vgg(x.bfloat16().float(), y.bfloat16().float()))


# ---------------------------------------------------------------------------------------------------- weight files


def published_files(backbone: str, seed: int) -> tuple[dict, dict]:
    """Random weights in the key layout of torchvision's backbone file and of the lpips heads file."""
    generator = torch.Generator().manual_seed(seed)
    convs = VGG16_CONVS if backbone == "vgg" else ALEXNET_CONVS
    torchvision_sd = {}
    for index, out_c, in_c, kernel in convs:
        weight = torch.randn(out_c, in_c, kernel, kernel, generator=generator) * 0.05
        torchvision_sd[f"features.{index}.weight"] = weight
        torchvision_sd[f"features.{index}.bias"] = torch.randn(out_c, generator=generator) * 0.05
    torchvision_sd["classifier.6.weight"] = torch.randn(10, 4, generator=generator)  # dropped by the mapping
    heads_sd = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) / c
        for k, c in enumerate(HEAD_CHANNELS[backbone])
    }
    return torchvision_sd, heads_sd


@pytest.mark.parametrize("backbone", ["vgg", "alex"])
def test_loads_torchvision_and_lpips_files_from_local_paths(backbone, tmp_path):
    torchvision_sd, heads_sd = published_files(backbone, seed=13)
    torch.save(torchvision_sd, tmp_path / "backbone.pth")
    torch.save(heads_sd, tmp_path / "heads.pth")

    loaded = LPIPS.from_pretrained(
        backbone, backbone_path=tmp_path / "backbone.pth", heads_path=tmp_path / "heads.pth"
    )
    state_dict = loaded.state_dict()
    for key, value in torchvision_sd.items():
        if key.startswith("features."):
            assert torch.equal(state_dict[f"net.{key}"], value)
    for k in range(5):
        assert torch.equal(state_dict[f"lins.{k}.weight"], heads_sd[f"lin{k}.model.1.weight"])
    assert len(state_dict) == len(torchvision_sd) - 1 + len(heads_sd)  # nothing left at its random value
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training

    # Round trip: this module's own state dict reloads into a random one and gives the same distances.
    fresh = LPIPS(backbone, pretrained=False)
    fresh.load_state_dict(state_dict)
    x, y = images(14), images(15)
    torch.testing.assert_close(fresh(x, y), loaded(x, y), rtol=0, atol=0)


def test_converts_a_whole_lpips_package_state_dict():
    # The layout of `lpips.LPIPS(net="vgg").state_dict()`, which the original OptVQ stores under
    # `loss.perceptual_loss.`: the backbone in five slices keeping torchvision's indices, heads twice (lin{k} and
    # the ModuleList lins.{k}), and the scaling-layer constants.
    torchvision_sd, heads_sd = published_files("vgg", seed=16)
    slices = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
    package_sd = {"scaling_layer.shift": torch.zeros(1, 3, 1, 1), "scaling_layer.scale": torch.ones(1, 3, 1, 1)}
    for key, value in torchvision_sd.items():
        if key.startswith("features."):
            index = int(key.split(".")[1])
            s = next(n for n, (lo, hi) in enumerate(slices, start=1) if lo <= index < hi)
            package_sd[f"net.slice{s}.{index}.{key.split('.')[2]}"] = value
    for k in range(5):
        package_sd[f"lin{k}.model.1.weight"] = heads_sd[f"lin{k}.model.1.weight"]
        package_sd[f"lins.{k}.model.1.weight"] = heads_sd[f"lin{k}.model.1.weight"]

    model = LPIPS("vgg", pretrained=False)
    model.load_state_dict(convert_lpips_package_state_dict(package_sd), strict=True)
    assert torch.equal(model.net.features[28].weight, torchvision_sd["features.28.weight"])
    assert torch.equal(model.lins[4].weight, heads_sd["lin4.model.1.weight"])


def test_uses_cached_files_without_downloading(tmp_path, monkeypatch):
    torchvision_sd, heads_sd = published_files("alex", seed=17)
    torch.save(torchvision_sd, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(heads_sd, tmp_path / "lpips_v0.1_alex.pth")

    def no_download(*args, **kwargs):
        raise AssertionError("a cached file must not be downloaded again")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    model = LPIPS.from_pretrained("alex", cache_dir=tmp_path)
    assert torch.equal(model.net.features[10].bias, torchvision_sd["features.10.bias"])


def test_downloads_missing_files_from_the_published_urls_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    torchvision_sd, heads_sd = published_files("vgg", seed=18)
    requests = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        requests.append((url, hash_prefix))
        torch.save(torchvision_sd if "download.pytorch.org" in url else heads_sd, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = LPIPS.from_pretrained("vgg", cache_dir=tmp_path / "cache")
    assert requests == [
        ("https://download.pytorch.org/models/vgg16-397923af.pth", "397923af"),
        ("https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth", "a78928a0"),
    ]
    assert (tmp_path / "cache" / "vgg16-397923af.pth").is_file()
    assert torch.equal(model.lins[0].weight, heads_sd["lin0.model.1.weight"])


def test_offline_missing_file_error_names_file_url_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("offline must not download"))
    with pytest.raises(FileNotFoundError) as error:
        LPIPS.from_pretrained("vgg", cache_dir=tmp_path)
    message = str(error.value)
    assert "vgg16-397923af.pth" in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert "HF_HUB_OFFLINE" in message and "backbone_path=" in message and str(tmp_path) in message


def test_failed_download_error_names_the_heads_file(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    torchvision_sd, _ = published_files("alex", seed=19)
    torch.save(torchvision_sd, tmp_path / "alexnet.pth")

    def unreachable(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(FileNotFoundError) as error:
        LPIPS.from_pretrained("alex", backbone_path=tmp_path / "alexnet.pth", cache_dir=tmp_path)
    message = str(error.value)
    assert WEIGHT_FILES["alex"]["heads"].url in message and "heads_path=" in message
    assert "Name or service not known" in message
    assert isinstance(error.value.__cause__, urllib.error.URLError)


def test_missing_local_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone_path"):
        LPIPS.from_pretrained("vgg", backbone_path=tmp_path / "absent.pth", heads_path=tmp_path / "absent.pth")


def test_original_optvq_checkpoint_perceptual_keys_map_onto_this_module():
    # The official-tiny fixture stores the original's `loss.perceptual_loss.*` in the real lpips layout (with
    # shrunken shapes, so only the names can be checked): they must cover exactly this module's state dict.
    path = Path(__file__).parent / "fixtures" / "official-tiny" / "hub_format" / "model.safetensors"
    prefix = "model.loss.perceptual_loss."
    with safe_open(str(path), "pt") as checkpoint:
        original = {k[len(prefix) :]: torch.zeros(()) for k in checkpoint.keys() if k.startswith(prefix)}
    assert "scaling_layer.shift" in original and "net.slice5.28.weight" in original
    converted = convert_lpips_package_state_dict(original)
    assert set(converted) == set(LPIPS("vgg", pretrained=False).state_dict())
