"""Test-wide settings: offline hub, a private HF cache, one thread per xdist worker, and tiny model configs."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="optvq-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread per test process: xdist workers already use every core, and intra-op threads of tiny models on top of
# them only wait for each other.
torch.set_num_threads(1)

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLES = REPOSITORY / "examples"
FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL_TINY = FIXTURES / "official-tiny"


def tiny_config_kwargs(**overrides) -> dict:
    """A model of ~0.3 M parameters on 32x32 images with a 16x16 latent grid (fast on CPU)."""
    kwargs = dict(
        resolution=32,
        base_channels=32,
        channel_multipliers=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        latent_channels=32,
        embed_dim=32,
        num_heads=4,
        num_codes=64,
    )
    kwargs.update(overrides)
    return kwargs


def official_tiny_config_kwargs(**overrides) -> dict:
    """The architecture of the fixture checkpoint in tests/fixtures/official-tiny."""
    return tiny_config_kwargs(**{"channel_multipliers": (1, 2, 2), "attn_resolutions": (8,), **overrides})


@pytest.fixture
def tiny_config():
    from optvq_hf import OptVQConfig

    return OptVQConfig(**tiny_config_kwargs())


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield


def load_example(name: str):
    """An `examples/<name>.py` script imported as a module (its `main` and helpers callable in-process)."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"optvq_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass resolves its annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fresh_accelerate_state():
    """The Accelerator is a process-wide singleton: each test starts and ends without one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


class PooledFeatures(torch.nn.Module):
    """A stand-in FID feature extractor: 2x2 average pooling and a fixed random projection to `feature_dim` dims."""

    def __init__(self, feature_dim: int = 5, seed: int = 7):
        super().__init__()
        self.feature_dim = feature_dim
        self.register_buffer("projection", torch.randn(12, feature_dim, generator=torch.Generator().manual_seed(seed)))

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1) @ self.projection
