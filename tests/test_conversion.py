"""Conversion of original OptVQ checkpoints (conversion/): config translation, key checks, outputs, CLI, errors.

The fixture (tests/fixtures/official-tiny) is a small model with random weights saved by the original code in both of
its formats, with the original code's outputs on a fixed batch.
"""

import copy
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import OFFICIAL_TINY, official_tiny_config_kwargs
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from optvq_hf import OptVQConfig, OptVQModel
from optvq_hf.conversion.convert import LOSS_WEIGHTS_FILE, ConversionError, convert, main
from optvq_hf.conversion.original_checkpoint import CheckpointError, read_state_dict, split_and_check
from optvq_hf.conversion.original_config import (
    PRESETS,
    OriginalConfigError,
    spec_from_autoencoder_block,
    spec_from_hub_config,
    spec_from_preset,
    spec_from_yaml,
)
from optvq_hf.conversion.original_keys import map_original_state_dict
from optvq_hf.conversion.original_reference import (
    original_indices,
    original_parameter_shapes,
    random_original_state_dict,
)
from optvq_hf.conversion.verification import verify_conversion

ROOT = Path(__file__).resolve().parent.parent
HUB_FOLDER = OFFICIAL_TINY / "hub_format"
CHECKPOINT = OFFICIAL_TINY / "training_checkpoint.pth"
YAML_CONFIG = OFFICIAL_TINY / "original_config.yaml"
REFERENCE = OFFICIAL_TINY / "reference_outputs.safetensors"
TOLERANCE = 1e-5
CONFIG_FIELDS = [name for name in inspect.signature(OptVQConfig.__init__).parameters if name not in ("self", "kwargs")]


def quiet(_: str) -> None:
    """A `log` that prints nothing (the CLI test checks the printed summary)."""


@pytest.fixture(scope="module")
def reference():
    return load_file(REFERENCE)


@pytest.fixture(scope="module")
def hub_conversion(tmp_path_factory):
    """The fixture's Hub folder converted once, with loss weights and verification against the original outputs."""
    output = tmp_path_factory.mktemp("converted") / "optvq-tiny"
    result = convert(
        HUB_FOLDER,
        output,
        save_loss_weights=True,
        verify=True,
        reference_outputs=str(REFERENCE),
        tolerance=TOLERANCE,
        log=quiet,
    )
    return result, output


def autoencoder_block() -> dict:
    return copy.deepcopy(yaml.safe_load(YAML_CONFIG.read_text())["autoencoder"])


# -- outputs of the converted model -----------------------------------------------------------------------------------
def test_converted_folder_reproduces_the_original_reconstructions(hub_conversion, reference):
    result, output = hub_conversion
    model = OptVQModel.from_pretrained(output).eval()
    expected = OptVQConfig(**official_tiny_config_kwargs())
    assert all(getattr(model.config, name) == getattr(expected, name) for name in CONFIG_FIELDS)
    assert model.num_parameters() == result.num_parameters == 1_037_451
    with torch.no_grad():
        encoded = model.encode(reference["pixel_values"])
        from_quantized = model.decode(reference["quantized"]).sample
        from_indices = model.decode_indices(reference["indices"]).sample
    assert (encoded.latents - reference["latents"]).abs().max() < TOLERANCE
    assert (from_quantized - reference["reconstruction"]).abs().max() < TOLERANCE
    assert (from_indices - reference["reconstruction_from_indices"]).abs().max() < TOLERANCE
    # Default inference: the nearest code, equal to the original's argmin everywhere.
    assert torch.equal(encoded.indices, reference["indices_nearest"])


def test_converted_parameters_are_the_original_weights_bit_for_bit(hub_conversion):
    _, output = hub_conversion
    original = load_file(HUB_FOLDER / "model.safetensors")
    mapped, dropped = map_original_state_dict(original, num_levels=3)
    converted = load_file(output / "model.safetensors")
    assert set(converted) == set(mapped) and len(dropped) == 55
    for key, value in mapped.items():
        assert torch.equal(converted[key], value), key
    # The same parameters after from_pretrained, and its outputs agree with the in-memory model's to 1e-5.
    loaded = OptVQModel.from_pretrained(output).eval()
    fresh = OptVQModel(loaded.config).eval()
    fresh.load_state_dict(mapped)
    for key, value in fresh.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    pixels = load_file(REFERENCE)["pixel_values"]
    with torch.no_grad():
        assert (loaded(pixels).reconstruction - fresh(pixels).reconstruction).abs().max() < TOLERANCE


def test_sinkhorn_inference_reproduces_the_original_assignment(hub_conversion, reference):
    _, output = hub_conversion
    model = OptVQModel.from_pretrained(output, inference_assignment="sinkhorn").eval()
    assert model.quantizer.inference_assignment == "sinkhorn"
    with torch.no_grad():
        encoded = model.encode(reference["pixel_values"])
        rows = encoded.latents.permute(0, 2, 3, 1).reshape(-1, model.config.code_dim)
        exact = original_indices(rows, model.quantizer.codebook())
    exact = exact.reshape(8, 8, 8, 4).permute(0, 3, 1, 2)
    # Equal to the original formulas (guards included) computed in float64, and to the original's float32 output;
    # without the guards 8 of the 2048 indices differ (the fixture README's "8 of 2048").
    assert torch.equal(encoded.indices, exact)
    assert torch.equal(encoded.indices, reference["indices"])
    guard_free = original_indices(rows, model.quantizer.codebook(), guard=0.0).reshape(8, 8, 8, 4).permute(0, 3, 1, 2)
    assert int((guard_free != reference["indices"]).sum()) == 8


def test_verification_report_against_the_fixture(hub_conversion):
    result, output = hub_conversion
    report = result.verification
    assert report is not None and report.passed
    checks = {check.name: check for check in report.checks}
    for name in (
        "latents vs original outputs",
        "decode(original quantized) vs original reconstruction",
        "decode_indices(original indices) vs original reconstruction",
        "latents vs original formulas",
        "decode(original quantized) vs original formulas",
        "decode_indices(original indices) vs original decode_code",
    ):
        assert 0.0 <= checks[name].value < TOLERANCE, name
    # The independent reference reproduces the original code: latents up to float32 rounding (convolution kernels
    # round differently with the thread count), and its Sinkhorn indices exactly.
    assert checks["(original formulas' latents vs original outputs)"].value < 2e-6
    assert checks["(original formulas' Sinkhorn indices vs original outputs)"].value == 0
    assert checks["indices, nearest, vs original argmin"].value == 0
    assert checks["indices, sinkhorn, vs original outputs"].value == 0
    assert checks["indices, sinkhorn, vs original float32 Sinkhorn"].value == 0
    assert "Conversion check" in (output / "README.md").read_text()


def test_loss_weights_are_saved_under_their_original_names(hub_conversion):
    result, output = hub_conversion
    original = load_file(HUB_FOLDER / "model.safetensors")
    expected = {k[len("model.") :]: v for k, v in original.items() if k.startswith("model.loss.")}
    saved = load_file(output / LOSS_WEIGHTS_FILE)
    assert set(saved) == set(expected) and len(saved) == 55
    assert result.dropped_keys == sorted(saved)  # every dropped weight is listed
    assert result.loss_groups == {"loss.perceptual_loss.": 33, "loss.discriminator.": 22}
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert {k.split(".")[1] for k in saved} == {"perceptual_loss", "discriminator"}
    with safe_open(output / LOSS_WEIGHTS_FILE, "pt") as handle:
        metadata = handle.metadata()
    assert "loss.discriminator." in metadata["description"]
    assert json.loads(metadata["original_loss_config"])["params"]["disc_num_layers"] == 3


def test_output_folder_contents(hub_conversion):
    result, output = hub_conversion
    files = set(result.files)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", LOSS_WEIGHTS_FILE} <= files
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert processor["resolution"] == 32 and processor["num_channels"] == 3
    card = (output / "README.md").read_text()
    assert "1,037,451" in card and "model.safetensors" in card and "inference_assignment" in card
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


# -- the two input formats --------------------------------------------------------------------------------------------
def test_training_checkpoint_with_yaml_gives_the_same_folder(hub_conversion, tmp_path):
    _, hub_output = hub_conversion
    output = tmp_path / "from-checkpoint"
    result = convert(CHECKPOINT, output, original_config=str(YAML_CONFIG), inference_assignment="sinkhorn", log=quiet)
    assert result.mapped_keys == 185 and len(result.dropped_keys) == 55 and result.wrapper_prefixes == []
    converted, from_hub = load_file(output / "model.safetensors"), load_file(hub_output / "model.safetensors")
    assert set(converted) == set(from_hub) and all(torch.equal(converted[k], from_hub[k]) for k in converted)
    config = json.loads((output / "config.json").read_text())
    assert config["inference_assignment"] == "sinkhorn" and config["num_heads"] == 4 and config["num_codes"] == 64


def test_compiled_training_checkpoint_and_nested_yaml(hub_conversion, tmp_path):
    """A checkpoint of a torch.compile run (`_orig_mod.` prefixes) with optimizer state, and `model: autoencoder:`."""
    _, hub_output = hub_conversion
    checkpoint = torch.load(CHECKPOINT, weights_only=True)
    compiled = {
        "model": {f"_orig_mod.{k}": v for k, v in checkpoint["model"].items()},
        "epoch": 3,
        "step": 1234,
        "optimizer_ae": {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
    }
    torch.save(compiled, tmp_path / "compiled.pth")
    nested = {"mode": "train", "model": {"autoencoder": autoencoder_block()}, "train": {"epochs": 1}}
    (tmp_path / "nested.yaml").write_text(yaml.safe_dump(nested))
    result = convert(
        tmp_path / "compiled.pth", tmp_path / "out", original_config=str(tmp_path / "nested.yaml"), log=quiet
    )
    assert result.wrapper_prefixes == ["_orig_mod."] and result.mapped_keys == 185
    converted, from_hub = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(hub_output / "model.safetensors"),
    )
    assert all(torch.equal(converted[k], from_hub[k]) for k in from_hub)


def test_hub_folder_with_a_pickled_state_dict(hub_conversion, tmp_path):
    """Older huggingface_hub mixins wrote `pytorch_model.bin` (a bare state dict) instead of model.safetensors."""
    _, hub_output = hub_conversion
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "config.json").write_bytes((HUB_FOLDER / "config.json").read_bytes())
    torch.save(load_file(HUB_FOLDER / "model.safetensors"), folder / "pytorch_model.bin")
    convert(folder, tmp_path / "out", log=quiet)
    converted, from_hub = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(hub_output / "model.safetensors"),
    )
    assert set(converted) == set(from_hub) and all(torch.equal(converted[k], from_hub[k]) for k in from_hub)


# -- configuration ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset, heads, parameters", [("optvq-16x16x4", 4, 72_932_291), ("optvq-16x16x8", 8, 72_404_899)]
)
def test_presets_are_the_released_models(preset, heads, parameters):
    config = spec_from_preset(preset).to_optvq_config()
    assert config.to_dict() == OptVQConfig(num_heads=heads).to_dict()
    assert PRESETS[preset][2] == parameters
    with torch.device("meta"):
        assert OptVQModel(config).num_parameters() == parameters
    shapes = original_parameter_shapes(spec_from_preset(preset))  # the original constructor's weights, counted
    assert sum(torch.Size(shape).numel() for shape in shapes.values()) == parameters


def test_hub_config_and_yaml_translate_to_the_same_config():
    from_hub = spec_from_hub_config(json.loads((HUB_FOLDER / "config.json").read_text())).to_optvq_config()
    from_yaml = spec_from_yaml(YAML_CONFIG).to_optvq_config()
    assert from_hub.to_dict() == from_yaml.to_dict() == OptVQConfig(**official_tiny_config_kwargs()).to_dict()


def test_translation_of_other_original_settings():
    block = autoencoder_block()
    block["params"]["quantize"]["params"]["normalize_mode"] = "null"
    block["params"]["quantize"]["params"]["epsilon"] = 5
    config = spec_from_autoencoder_block(block, "test").to_optvq_config()
    assert config.cost_normalization == "none" and config.sinkhorn_epsilon == 5.0
    hub = json.loads((HUB_FOLDER / "config.json").read_text())
    hub["quantize_type"] = "basevq"
    for field in ("epsilon", "n_iters", "normalize_mode", "use_prob"):
        del hub["quantize"][field]
    assert spec_from_hub_config(hub).to_optvq_config().quantizer_type == "vq"
    # The MNIST / CIFAR-10 setups: plain CNN, image size from the data transform.
    simple = {
        "data": {"val": {"params": {"transform": {"params": {"resize": 32}}}}},
        "model": {
            "autoencoder": {
                "target": "optvq.models.vqgan.VQModel",
                "params": {
                    "use_connector": True,
                    "encoder": {"target": "optvq.models.backbone.simple_cnn.PlainCNNEncoder", "params": {"in_dim": 1}},
                    "decoder": {
                        "target": "optvq.models.backbone.simple_cnn.PlainCNNDecoder",
                        "params": {"out_dim": 1},
                    },
                    "quantize": {
                        "target": "optvq.models.quantizer.VectorQuantizerSinkhorn",
                        "params": {
                            "n_e": 1024,
                            "e_dim": 8,
                            "beta": 0.25,
                            "num_head": 4,
                            "use_prob": False,
                            "loss_q_type": "l2",
                        },
                    },
                },
            }
        },
    }
    spec = spec_from_autoencoder_block(simple["model"]["autoencoder"], "mnist", resolution=32)
    config = spec.to_optvq_config()
    assert (config.backbone, config.in_channels, config.resolution, config.embed_dim) == ("simple_cnn", 1, 32, 8)
    with torch.device("meta"):
        assert OptVQModel(config).num_parameters() == sum(
            torch.Size(s).numel() for s in original_parameter_shapes(spec).values()
        )


def _set(block: dict, path: str, value) -> dict:
    node = block["params"]
    *parents, last = path.split(".")
    for name in parents:
        node = node[name]["params"] if isinstance(node[name], dict) and "params" in node[name] else node[name]
    if value is KeyError:
        node.pop(last)
    else:
        node[last] = value
    return block


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("quantize.use_prob", True, "use_prob"),
        ("quantize.use_prob", KeyError, "use_prob"),  # absent: the original class default, true
        ("quantize.use_norm", True, "use_norm"),
        ("quantize.normalize_mode", "sphere", "normalize_mode"),
        ("quantize.temperature", 1.0, "temperature"),
        ("use_connector", False, "use_connector"),
        ("encoder.double_z", True, "double_z"),
        ("encoder.double_z", KeyError, "double_z"),  # absent: the original encoder's default, true
        ("encoder.resamp_with_conv", False, "resamp_with_conv"),
        ("decoder.ch", 64, "encoder and decoder differ in ch"),
        ("decoder.give_pre_end", True, "give_pre_end"),
        ("encoder.z_channels", KeyError, "z_channels"),
        ("encoder.use_linear_attn", True, "use_linear_attn"),
        ("colorize_nlabels", 3, "colorize_nlabels"),
        ("quantize.target", "optvq.models.quantizer.Identity", "unsupported quantizer target"),
    ],
)
def test_unsupported_or_unknown_original_settings_are_errors(path, value, message):
    block = autoencoder_block()
    if path == "quantize.target":
        block["params"]["quantize"]["target"] = value
    else:
        _set(block, path, value)
    with pytest.raises(OriginalConfigError, match=message):
        spec_from_autoencoder_block(block, "test").to_optvq_config()


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("quantize.loss_q_type", "ce", "loss_q_type 'ce'"),
        ("quantize.loss_q_type", "l1", "loss_q_type 'l1'"),
        ("quantize.loss_q_type", KeyError, "loss_q_type 'ce'"),  # absent: the original class default, 'ce'
        ("quantize.fix_codes", True, "fix_codes"),
        ("quantize.start_quantize_steps", 100, "start_quantize_steps 100"),
    ],
)
def test_training_only_settings_convert_with_a_warning(path, value, message):
    reference = spec_from_autoencoder_block(autoencoder_block(), "test").to_optvq_config()
    block = _set(autoencoder_block(), path, value)
    with pytest.warns(UserWarning, match=message):
        config = spec_from_autoencoder_block(block, "test").to_optvq_config()
    assert config.to_dict() == reference.to_dict()  # nothing of the forward pass changes


def test_config_file_errors(tmp_path):
    (tmp_path / "other.yaml").write_text("model:\n  generator: {}\n")
    with pytest.raises(OriginalConfigError, match="no `autoencoder:` block"):
        spec_from_yaml(tmp_path / "other.yaml")
    (tmp_path / "broken.yaml").write_text("autoencoder: [unclosed\n")
    with pytest.raises(OriginalConfigError, match="cannot read"):
        spec_from_yaml(tmp_path / "broken.yaml")
    hub = json.loads((HUB_FOLDER / "config.json").read_text())
    with pytest.raises(OriginalConfigError, match="unknown model field"):
        spec_from_hub_config(dict(hub, extra_field=1))
    with pytest.raises(OriginalConfigError, match="already an optvq-hf config"):
        spec_from_hub_config(OptVQConfig().to_dict())
    with pytest.raises(OriginalConfigError, match="unknown preset"):
        spec_from_preset("optvq-32x32x8")


# -- the released architecture, with random weights in the original layout --------------------------------------------
def test_released_architecture_maps_and_matches_the_original_formulas():
    """The 16x16x8 model (5 levels, 2 ResNet blocks, attention at 16): every original weight placed, same outputs."""
    from optvq_hf.conversion.convert import build_model

    spec = spec_from_preset("optvq-16x16x8")
    weights = split_and_check(random_original_state_dict(spec, seed=0), spec, "random")
    model = build_model(spec, weights, "nearest")
    assert model.num_parameters() == 72_404_899 and len(weights.model) == 345
    # Small images keep it fast: attention sits at the level the config says, whatever the input size.
    report = verify_conversion(model, spec, weights.model, batch_size=1, image_size=16, tolerance=1e-4)
    assert report.passed, report.table()
    assert all(check.value < 1e-4 for check in report.checks if isinstance(check.value, float))


# -- errors -----------------------------------------------------------------------------------------------------------
def hub_copy(tmp_path: Path, weights: dict | None = None, raw: bytes | None = None) -> Path:
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "config.json").write_bytes((HUB_FOLDER / "config.json").read_bytes())
    if raw is not None:
        (folder / "model.safetensors").write_bytes(raw)
    else:
        save_file(weights, str(folder / "model.safetensors"))
    return folder


def fixture_weights() -> dict:
    return {k: v.clone() for k, v in load_file(HUB_FOLDER / "model.safetensors").items()}


def assert_nothing_written(output: Path) -> None:
    assert not output.exists()
    assert not [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: os.urandom(4096), "corrupt or truncated"),
        (lambda raw: raw[: len(raw) // 2], "corrupt or truncated"),
        (lambda raw: b"", "corrupt or truncated"),
    ],
)
def test_corrupt_or_truncated_safetensors(tmp_path, damage, message):
    raw = (HUB_FOLDER / "model.safetensors").read_bytes()
    folder = hub_copy(tmp_path, raw=damage(raw))
    with pytest.raises(CheckpointError, match=message):
        convert(folder, tmp_path / "out", log=quiet)
    assert_nothing_written(tmp_path / "out")


def test_truncated_or_unsafe_training_checkpoints(tmp_path):
    raw = CHECKPOINT.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_state_dict(tmp_path / "truncated.pth")
    # An object that is not tensors / containers / numbers: weights_only refuses it, so no code can run.
    torch.save({"model": {}, "callback": Path("x")}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(tmp_path / "unsafe.pth")
    torch.save({"epoch": 1, "optimizer": {"lr": 1.0}}, tmp_path / "no_model.pth")
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        read_state_dict(tmp_path / "no_model.pth")


def test_a_file_of_another_model(tmp_path):
    other = {"bert.embeddings.word_embeddings.weight": torch.zeros(10, 4), "bert.pooler.dense.bias": torch.zeros(4)}
    with pytest.raises(CheckpointError, match="does not look like an original OptVQ checkpoint.*bert.embeddings"):
        convert(hub_copy(tmp_path, other), tmp_path / "out", log=quiet)
    assert_nothing_written(tmp_path / "out")


def test_unknown_missing_and_misshapen_keys_are_named(tmp_path):
    weights = fixture_weights()
    del weights["model.decoder.conv_out.bias"]
    weights["model.encoder.extra.weight"] = torch.zeros(3)
    weights["model.loss.other_module.weight"] = torch.zeros(3)  # only the perceptual and discriminator groups drop
    weights["model.quant_conv.weight"] = torch.zeros(32, 32, 3, 3)
    with pytest.raises(CheckpointError) as error:
        convert(hub_copy(tmp_path, weights), tmp_path / "out", log=quiet)
    text = str(error.value)
    assert "missing key(s): decoder.conv_out.bias" in text
    assert "encoder.extra.weight" in text and "loss.other_module.weight" in text
    assert "quant_conv.weight: checkpoint (32, 32, 3, 3) vs config (32, 32, 1, 1)" in text
    assert_nothing_written(tmp_path / "out")


def test_config_that_does_not_match_the_weights(tmp_path):
    block = autoencoder_block()
    block["params"]["quantize"]["params"]["n_e"] = 128
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump({"autoencoder": block}))
    mismatch = r"quantize\.embedding\.weight: checkpoint \(64, 8\) vs config \(128, 8\)"
    with pytest.raises(CheckpointError, match=mismatch):
        convert(CHECKPOINT, tmp_path / "out", original_config=str(tmp_path / "wrong.yaml"), log=quiet)
    assert_nothing_written(tmp_path / "out")
    # A preset of another model than the Hub folder's own config.json.
    with pytest.raises(ConversionError, match="describe different models"):
        convert(HUB_FOLDER, tmp_path / "out", preset="optvq-16x16x4", log=quiet)
    with pytest.raises(ConversionError, match="--original_config.*--preset"):
        convert(CHECKPOINT, tmp_path / "out", log=quiet)
    with pytest.raises(ConversionError, match="not both"):
        convert(CHECKPOINT, tmp_path / "out", original_config=str(YAML_CONFIG), preset="optvq-16x16x4", log=quiet)


def test_failed_verification_and_existing_output_leave_nothing_behind(tmp_path):
    with pytest.raises(ConversionError, match="verification failed"):
        convert(HUB_FOLDER, tmp_path / "out", verify=True, reference_outputs=str(REFERENCE), tolerance=0.0, log=quiet)
    assert_nothing_written(tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert(HUB_FOLDER, tmp_path / "out", log=quiet)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    convert(HUB_FOLDER, tmp_path / "out", overwrite=True, log=quiet)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# -- command line -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_converts_and_verifies_as_a_script(tmp_path):
    script = ROOT / "conversion" / "convert_original_to_hf.py"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        str(script),
        "--original_path",
        str(CHECKPOINT),
        "--original_config",
        str(YAML_CONFIG),
        "--output_dir",
        str(tmp_path / "out"),
        "--verify",
        "--reference_outputs",
        str(REFERENCE),
        "--tolerance",
        "1e-5",
        "--save_loss_weights",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "keys mapped: 185; dropped (loss-only): 55" in done.stdout
    assert "parameters: 1,037,451" in done.stdout
    assert "| decode(original quantized) vs original reconstruction |" in done.stdout
    assert OptVQModel.from_pretrained(tmp_path / "out").num_parameters() == 1_037_451


def test_cli_help_errors_and_dry_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--original_path",
        "--original_config",
        "--preset",
        "--output_dir",
        "--save_loss_weights",
        "--verify",
        "--push_to_hub",
        "--hub_model_id",
        "--dry_run",
    ):
        assert flag in help_text
    assert main(["--original_path", str(CHECKPOINT), "--output_dir", str(tmp_path / "a")]) == 1
    assert "--original_config" in capsys.readouterr().err
    assert main(["--original_path", str(HUB_FOLDER), "--output_dir", str(tmp_path / "a"), "--push_to_hub"]) == 1
    assert "--hub_model_id" in capsys.readouterr().err
    assert (
        main(
            [
                "--original_path",
                str(HUB_FOLDER),
                "--output_dir",
                str(tmp_path / "a"),
                "--push_to_hub",
                "--hub_model_id",
                "not a valid id!",
            ]
        )
        == 1
    )
    assert "invalid --hub_model_id" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert (
        main(
            [
                "--original_path",
                str(HUB_FOLDER),
                "--output_dir",
                str(tmp_path / "b"),
                "--push_to_hub",
                "--hub_model_id",
                "my-org/optvq-tiny",
                "--dry_run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "would upload" in out and "to my-org/optvq-tiny" in out
    assert "model.safetensors" in out and "config.json" in out and "README.md" in out
    assert "# my-org/optvq-tiny" in (tmp_path / "b" / "README.md").read_text()


# -- latent widths that are not a multiple of 32 ---------------------------------------------------------------------
@pytest.mark.parametrize("z_channels", [16, 48])
def test_latent_channels_not_a_multiple_of_32_convert_and_match_the_original(z_channels):
    """The original's z_channels is free (its GroupNorms see only `ch` multiples): 16 and 48 convert and match."""
    from optvq_hf.conversion.convert import build_model

    backbone = dict(
        double_z=False,
        z_channels=z_channels,
        resolution=16,
        in_channels=3,
        out_ch=3,
        ch=32,
        ch_mult=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[8],
        dropout=0.0,
    )
    block = {
        "target": "optvq.models.vqgan.VQModel",
        "params": {
            "encoder": {"target": "optvq.models.backbone.diffusion.Encoder", "params": dict(backbone)},
            "decoder": {"target": "optvq.models.backbone.diffusion.Decoder", "params": dict(backbone)},
            "quantize": {
                "target": "optvq.models.quantizer.VectorQuantizerSinkhorn",
                "params": dict(n_e=64, e_dim=z_channels, num_head=2, use_prob=False, loss_q_type="l2", beta=0.25),
            },
        },
    }
    spec = spec_from_autoencoder_block(block, source="z_channels test")
    config = spec.to_optvq_config()
    assert config.latent_channels == z_channels and config.embed_dim == z_channels
    shapes = original_parameter_shapes(spec)
    assert shapes["encoder.conv_out.weight"] == (z_channels, 64, 3, 3)
    assert shapes["decoder.conv_in.weight"] == (64, z_channels, 3, 3)
    assert shapes["quantize.embedding.weight"] == (64, z_channels // 2)
    weights = split_and_check(random_original_state_dict(spec, seed=1), spec, "random")
    model = build_model(spec, weights, "nearest")
    assert model.config.latent_channels == z_channels
    report = verify_conversion(model, spec, weights.model, batch_size=2, image_size=16, tolerance=1e-4)
    assert report.passed, report.table()
    assert all(check.value < 1e-4 for check in report.checks if isinstance(check.value, float))
