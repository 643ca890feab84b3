"""Publishing: the model card (validated with huggingface_hub's card classes), the upload helper's dry run, and saved
folders that load through the Auto API both with the package and, with trust_remote_code, without it."""

import json
import math
import os
import site
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_config_kwargs
from huggingface_hub import ModelCard
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModel

import optvq_hf
from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel, hub
from optvq_hf.hub import Evaluation, push_folder_to_hub, render_model_card

METRICS = {"psnr": 21.25, "ssim": 0.625, "lpips": 0.1875, "rfid": None, "usage": 1.0}


def tiny_model() -> OptVQModel:
    torch.manual_seed(0)
    return OptVQModel(OptVQConfig(**tiny_config_kwargs())).eval()


# -- model card -------------------------------------------------------------------------------------------------------
def evaluated_card() -> ModelCard:
    evaluation = Evaluation(
        METRICS, dataset="ILSVRC/imagenet-1k", split="validation", num_images=50000, protocol={"psnr": "Y channel"}
    )
    return render_model_card(
        OptVQConfig(**tiny_config_kwargs()),
        repo_id="someone/optvq-tiny",
        evaluation=evaluation,
        training_details={"steps": 1234, "data": "random 32x32 crops"},
        num_parameters=98765,
        tags=("mnist-free",),
    )


def test_card_metadata_parses_back_with_the_metric_values():
    card = ModelCard(evaluated_card().content)  # a fresh parse of the rendered text, as the Hub would read it
    data = card.data
    assert data.library_name == "transformers" and data.license == "mit" and data.pipeline_tag == "image-to-image"
    assert {"optvq", "vector-quantization", "image-tokenizer", "mnist-free"} <= set(data.tags)
    assert data.datasets == ["ILSVRC/imagenet-1k"]
    assert data.metrics == ["psnr", "ssim", "lpips", "usage"]  # the undefined rFID is left out
    assert data.model_name == "optvq-tiny"
    results = {r.metric_type: r for r in data.eval_results}
    assert {name: r.metric_value for name, r in results.items()} == {
        "psnr": 21.25,
        "ssim": 0.625,
        "lpips": 0.1875,
        "usage": 1.0,
    }
    psnr = results["psnr"]
    assert (psnr.task_type, psnr.dataset_type) == ("image-to-image", "ILSVRC/imagenet-1k")
    assert psnr.dataset_split == "validation"
    assert "model-index" in data.to_dict()


def test_card_text_carries_the_config_and_the_run():
    text = evaluated_card().text
    assert "{{" not in text and "{%" not in text and "{#" not in text
    assert "| PSNR (dB, Y channel) | 21.25 | Y channel |" in text and "| rFID | n/a |" in text
    assert "50000 images" in text and "(validation split)" in text
    assert "4 heads x 64 shared codes of dimension 8" in text and "16 x 16 (downsampling factor 2)" in text
    assert "**1024 tokens**" in text and "[0, 256)" in text and "98,765" in text
    assert '"someone/optvq-tiny", trust_remote_code=True' in text
    assert "- steps: 1234" in text and "## Conversion" not in text


def test_converted_card_without_evaluation():
    card = render_model_card(
        OptVQConfig(**tiny_config_kwargs(num_heads=8, num_codes=128)),
        conversion_details={"source": "BorelTHU/optvq-16x16x4 (hub format)", "max |latents - original|": 2e-6},
        base_model="BorelTHU/optvq-16x16x4",
    )
    parsed = ModelCard(card.content)
    assert parsed.data.base_model == "BorelTHU/optvq-16x16x4" and parsed.data.eval_results is None
    assert parsed.data.datasets is None and parsed.data.metrics is None
    assert "## Conversion" in parsed.text and "- source: BorelTHU/optvq-16x16x4 (hub format)" in parsed.text
    assert "No evaluation numbers" in parsed.text and "8 heads x 128 shared codes of dimension 4" in parsed.text
    assert "**2048 tokens**" in parsed.text and "## Training" not in parsed.text


def test_card_saves_as_the_repo_readme(tmp_path):
    evaluated_card().save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.eval_results[0].metric_value == 21.25


def test_metrics_file_of_the_evaluation_script(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"psnr": 30.5, "rfid": None}))
    evaluation = Evaluation.from_metrics_file(tmp_path / "metrics.json", dataset="local photos", is_hub_dataset=False)
    card = ModelCard(render_model_card(OptVQConfig(**tiny_config_kwargs()), evaluation=evaluation).content)
    assert [r.metric_value for r in card.data.eval_results] == [30.5] and card.data.datasets is None
    with pytest.raises(ValueError, match="cannot read the metrics file"):
        Evaluation.from_metrics_file(tmp_path / "missing.json", dataset="x")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(evaluation_metrics={"psnr": math.nan}), "metric 'psnr' must be a finite number"),
        (dict(evaluation_metrics={"psnr": "30"}), "metric 'psnr' must be a finite number"),
        (dict(evaluation_metrics={}), "non-empty mapping"),
        (dict(repo_id="not a/valid/id"), "invalid repo_id"),
        (dict(template_path="/nonexistent/card.md"), "template .* not found"),
        (dict(config={"resolution": 32}), "config must be an OptVQConfig"),
        (dict(training_details=["steps"]), "training_details must be a mapping"),
    ],
)
def test_bad_card_inputs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        metrics = kwargs.pop("evaluation_metrics", None)
        evaluation = Evaluation(metrics, dataset="d") if metrics is not None else None
        config = kwargs.pop("config", OptVQConfig(**tiny_config_kwargs()))
        render_model_card(config, evaluation=evaluation, **kwargs)


# -- upload -----------------------------------------------------------------------------------------------------------
@pytest.fixture
def output_folder(tmp_path):
    """A training output folder: the model files plus what must not be uploaded."""
    folder = tmp_path / "run"
    files = {
        "config.json": "{}",
        "model.safetensors": "x" * 1000,
        "README.md": "---\nlicense: mit\n---\n",
        "samples/grid.png": "p" * 10,
        "checkpoint-10/optimizer.bin": "o",
        "logs/events.out.tfevents.123": "e",
        "events.out.tfevents.456": "e",
        ".git/HEAD": "ref",
        "__pycache__/modeling_optvq.cpython-311.pyc": "c",
    }
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content)
    return folder


class ForbiddenApi:
    def __init__(self, *args, **kwargs):
        raise AssertionError("the dry run must not touch the network")


def test_dry_run_lists_the_model_files_only(output_folder, monkeypatch, capsys):
    monkeypatch.setattr(hub, "HfApi", ForbiddenApi)
    summary = push_folder_to_hub(output_folder, "someone/optvq-tiny", dry_run=True)
    expected = [("README.md", 21), ("config.json", 2), ("model.safetensors", 1000), ("samples/grid.png", 10)]
    assert summary.files == expected
    assert summary.total_bytes == 1033 and summary.dry_run and summary.commit_url is None
    printed = capsys.readouterr().out
    assert "would upload 4 files" in printed and "someone/optvq-tiny" in printed and "model.safetensors" in printed
    only_weights = push_folder_to_hub(output_folder, "someone/x", dry_run=True, allow_patterns=["*.safetensors"])
    assert [name for name, _ in only_weights.files] == ["model.safetensors"]


def test_upload_sends_what_the_dry_run_listed(output_folder, monkeypatch):
    calls = {}

    class RecordingApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = (repo_id, kwargs)

        def upload_folder(self, *, folder_path, ignore_patterns, allow_patterns, **kwargs):
            # The selection huggingface_hub's upload_folder makes with these arguments.
            names = sorted(p.relative_to(folder_path).as_posix() for p in folder_path.glob("**/*") if p.is_file())
            ignore = list(ignore_patterns or []) + list(DEFAULT_IGNORE_PATTERNS)
            calls["uploaded"] = list(filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore))
            calls["upload_kwargs"] = kwargs
            return type("Commit", (), {"commit_url": "https://huggingface.co/someone/optvq-tiny/commit/abc"})()

    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    dry = push_folder_to_hub(output_folder, "someone/optvq-tiny", dry_run=True, verbose=False)
    summary = push_folder_to_hub(output_folder, "someone/optvq-tiny", private=True, token="t", verbose=False)
    assert calls["uploaded"] == [name for name, _ in dry.files] == [name for name, _ in summary.files]
    assert calls["create_repo"] == ("someone/optvq-tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls["token"] == "t" and calls["upload_kwargs"]["repo_id"] == "someone/optvq-tiny"
    assert summary.commit_url.endswith("/commit/abc") and not summary.dry_run


def test_bad_uploads_raise(output_folder, tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        push_folder_to_hub(tmp_path / "nope", "someone/x", dry_run=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        push_folder_to_hub(tmp_path / "empty", "someone/x", dry_run=True)
    with pytest.raises(ValueError, match="invalid repo_id"):
        push_folder_to_hub(output_folder, "a/b/c", dry_run=True)
    with pytest.raises(ValueError, match="nothing to upload"):
        push_folder_to_hub(output_folder, "someone/x", dry_run=True, allow_patterns=["*.bin"], ignore_patterns=["*"])


# -- saved folders and the Auto API -----------------------------------------------------------------------------------
REMOTE_CODE_FILES = {
    "configuration_optvq.py",
    "modeling_optvq.py",
    "quantization.py",
    "tokens.py",
    "image_processing_optvq.py",
}


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    model = tiny_model()
    model.save_pretrained(folder)
    OptVQImageProcessor(resolution=32).save_pretrained(folder)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    image = (torch.rand(40, 48, 3, generator=generator) * 255).to(torch.uint8).numpy()
    with torch.no_grad():
        out = model(pixels)
        tokens = model.tokenize(pixels, order="head-major", vocabulary="per-head")
    reference = {
        "pixels": pixels,
        "image": torch.from_numpy(image),
        "indices": out.indices,
        "reconstruction": out.reconstruction,
        "tokens": tokens,
        "detokenized": model.detokenize(tokens, order="head-major", vocabulary="per-head").detach(),
        "processed": OptVQImageProcessor(resolution=32)(image)["pixel_values"],
    }
    reference = {name: tensor.contiguous() for name, tensor in reference.items()}
    reference_file = tmp_path_factory.mktemp("reference") / "reference.safetensors"
    save_file(reference, reference_file)
    return folder, model, reference, reference_file


def test_saved_folder_carries_the_code_and_auto_map(saved_folder):
    folder, _, _, _ = saved_folder
    assert REMOTE_CODE_FILES <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_optvq.OptVQConfig",
        "AutoModel": "modeling_optvq.OptVQModel",
    }
    assert config["model_type"] == "optvq"
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["auto_map"] == {"AutoImageProcessor": "image_processing_optvq.OptVQImageProcessor"}
    # The copies are this package's sources, so the remote path runs the same code.
    package = os.path.dirname(optvq_hf.__file__)
    for name in REMOTE_CODE_FILES:
        assert (folder / name).read_text() == open(os.path.join(package, name)).read(), name


def test_auto_classes_load_the_folder_with_the_package(saved_folder):
    folder, model, reference, _ = saved_folder
    loaded = AutoModel.from_pretrained(folder).eval()
    assert type(loaded) is OptVQModel
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        out = loaded(reference["pixels"])
    assert torch.equal(out.indices, reference["indices"])
    assert (out.reconstruction - reference["reconstruction"]).abs().max() < 1e-5
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(processor) is OptVQImageProcessor
    assert torch.equal(processor(reference["image"].numpy())["pixel_values"], reference["processed"])


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.extend(SITE_DIRS)  # the installed dependencies, without the .pth files that install optvq_hf's finder


    class HidePackage:  # a regular (non-editable) install puts optvq_hf into site-packages itself: hide it too
        def find_spec(self, name, path=None, target=None):
            if name == "optvq_hf" or name.startswith("optvq_hf."):
                raise ImportError(f"{name} is hidden in this check")


    sys.meta_path.insert(0, HidePackage())
    try:
        import optvq_hf
    except ImportError:
        pass
    else:
        raise SystemExit("optvq_hf is importable: the remote-code check would prove nothing")
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoImageProcessor, AutoModel

    reference = load_file(REFERENCE)
    model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(FOLDER, trust_remote_code=True)
    assert "optvq_hf" not in sys.modules and type(model).__module__.startswith("transformers_modules"), type(model)
    with torch.no_grad():
        out = model(reference["pixels"])
        tokens = model.tokenize(reference["pixels"], order="head-major", vocabulary="per-head")
        detokenized = model.detokenize(tokens, order="head-major", vocabulary="per-head")
    outputs = {
        "indices": out.indices, "reconstruction": out.reconstruction, "tokens": tokens, "detokenized": detokenized,
        "processed": processor(reference["image"].numpy())["pixel_values"],
    }
    save_file({name: tensor.contiguous() for name, tensor in outputs.items()}, OUTPUT)
    print(type(model).__module__, type(processor).__module__)
    """
)


@pytest.mark.slow
def test_trust_remote_code_loads_the_folder_without_the_package(saved_folder, tmp_path):
    folder, _, reference, reference_file = saved_folder
    site_dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    header = f"SITE_DIRS = {site_dirs!r}\nFOLDER = {str(folder)!r}\nREFERENCE = {str(reference_file)!r}\n"
    header += f"OUTPUT = {str(tmp_path / 'remote.safetensors')!r}\n"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    # -I: no PYTHONPATH, no user site, no script or working directory on sys.path; -S: no site-packages .pth files
    # (the editable install is one), so that only the saved folder's code can provide the model.
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", header + REMOTE_SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout and "modeling_optvq" in result.stdout
    remote = load_file(tmp_path / "remote.safetensors")
    assert torch.equal(remote["indices"], reference["indices"])
    assert torch.equal(remote["tokens"], reference["tokens"])
    assert (remote["reconstruction"] - reference["reconstruction"]).abs().max() < 1e-5
    assert (remote["detokenized"] - reference["detokenized"]).abs().max() < 1e-5
    assert torch.equal(remote["processed"], reference["processed"])
    assert np.unique(reference["indices"].numpy()).size > 10  # a real mix of codes


def test_saved_folder_carries_only_the_inference_files(tmp_path):
    """trust_remote_code copies what the model imports: the inference surface, never the training kit."""
    tiny_model().save_pretrained(tmp_path / "model")
    OptVQImageProcessor(resolution=32).save_pretrained(tmp_path / "model")
    code = sorted(path.name for path in (tmp_path / "model").glob("*.py"))
    assert code == [
        "assignment.py",
        "configuration_optvq.py",
        "image_modes.py",
        "image_processing_optvq.py",
        "modeling_optvq.py",
        "opencv_resize.py",
        "quantization.py",
        "tokens.py",
    ]
