"""The built wheel is what a user installs: it holds the package data (the model-card template) and renders a card
outside the repository, and it holds no tests, examples or benchmarks."""

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

RENDER = """
import sys
sys.path[:0] = [TARGET]
sys.path.extend(SITE_DIRS)
import optvq_hf, optvq_hf.hub
assert optvq_hf.__file__.startswith(TARGET), optvq_hf.__file__
from optvq_hf import OptVQConfig
card = optvq_hf.hub.render_model_card(OptVQConfig(num_codes=64, embed_dim=32, latent_channels=32))
print(card.data.library_name, len(str(card)))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPOSITORY)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (path,) = out.glob("optvq_hf-*.whl")
    return path


def test_wheel_holds_the_package_and_its_template_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "optvq_hf/templates/model_card.md" in names
    assert "optvq_hf/training/cli.py" in names and "optvq_hf/conversion/convert.py" in names
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"optvq_hf"}, top_level


def test_installed_wheel_renders_a_model_card(wheel, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # -I -S: neither the repository nor the editable install is importable, only the installed wheel and the
    # dependencies' site-packages.
    site_dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    header = f"TARGET = {str(target)!r}\nSITE_DIRS = {site_dirs!r}\n"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", header + RENDER],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    library, length = result.stdout.split()
    assert library == "transformers", result.stdout
    assert int(length) > 500
