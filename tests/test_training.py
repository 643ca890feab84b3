"""examples/train.py end to end on tiny configs: the full objective with the discriminator on, a loss that falls on a
fixed batch, exact resume (also past a checkpoint whose writing was interrupted), two CPU processes that train what
one process trains on the same global batch, the multi-process guard, k-means initialisation with several heads, and
clear errors before training for bad configs and bad data."""

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
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from conftest import load_example, tiny_config_kwargs
from safetensors.torch import load_file

from optvq_hf import OptVQConfig, OptVQModel
from optvq_hf.training.checkpointing import (
    STATE_FILENAME,
    find_latest_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
)
from optvq_hf.training.codebook_init import kmeans_init_codebook, latent_rows
from optvq_hf.training.launch import check_process_group
from optvq_hf.training.losses import OptVQLoss, OptVQLossConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train.py"
TINY_DEFAULT = EXAMPLE.parent / "configs" / "tiny.yaml"


train = load_example("train")

# The small plain CNN of the original MNIST setup, shrunk: 16x16 images, 4x4 positions x 4 heads, 16 codes of dim 2.
SMALL_MODEL = dict(
    backbone="simple_cnn", resolution=16, base_channels=8, latent_channels=8, embed_dim=8, num_heads=4, num_codes=16
)
SMALL_DISCRIMINATOR = dict(disc_base_channels=8, disc_num_layers=2, perceptual_weight=0.0)
BASE = dict(
    dataset_name="builtin:digits",
    num_validation_images=8,
    train_batch_size=4,
    learning_rate=1e-3,
    checkpointing_steps=100,
    logging_steps=2,
    image_logging_steps=2,
    report_to="none",
    num_grid_images=2,
    validation_batch_size=8,
)


@pytest.fixture(autouse=True)
def offline_single_process(monkeypatch, tmp_path, fresh_accelerate_state):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached LPIPS weights: offline, as CI
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    # One thread: these models are so small that a second thread only adds synchronisation.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_config(path: Path, model=None, loss=None, **fields) -> Path:
    content = {**BASE, "model": {**SMALL_MODEL, **(model or {})}, "loss": {**SMALL_DISCRIMINATOR, **(loss or {})}}
    content.update(fields)
    path.write_text(yaml.safe_dump(content))
    return path


def run(config: Path, output_dir: Path, *extra: str) -> dict:
    AcceleratorState._reset_state(True)
    return train.main(["--config", str(config), "--output_dir", str(output_dir), *extra])


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def save_png_folder(folder: Path, count: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, size=(3, 3, 3), dtype=np.uint8)
        PIL.Image.fromarray(coarse).resize((16, 16), PIL.Image.Resampling.BILINEAR).save(folder / f"{i}.png")
    return folder


# ------------------------------------------------------------------------------------------------------ the objective
def test_full_objective_with_discriminator_and_outputs(tmp_path):
    """Diffusion backbone, LPIPS (random VGG16 weights), discriminator and adaptive weight on from step 0, EMA,
    tensorboard: every part of the objective moves the weights, and every output is written."""
    model = tiny_config_kwargs(resolution=16, num_codes=32)
    loss = dict(perceptual_weight=0.5, perceptual_pretrained=False, perceptual_backbone="vgg", disc_start=0)
    config = write_config(
        tmp_path / "c.yaml",
        model=model,
        loss=loss,
        max_train_steps=2,
        checkpointing_steps=2,
        use_ema=True,
        report_to="tensorboard",
        train_crop_scale=[0.5, 1.0],
    )
    report = run(config, tmp_path / "out")

    logs = report["last_train_logs"]
    assert logs["disc_factor"] == 1.0 and logs["g_weight"] > 0 and np.isfinite(logs["g_loss"])
    assert logs["perceptual_loss"] > 0 and logs["l1_loss"] > 0 and logs["quantizer_loss"] > 0
    assert np.isfinite(logs["d_loss"]) and "logits_real" in logs
    assert report["global_step"] == 2 and set(report["validation"]) == {"model", "ema"}
    results = report["validation"]["model"]
    assert 0 < results["l1"] < 1 and 0 < results["usage"] <= 1 and 1 <= results["perplexity"] <= 32
    assert results["usage"] >= max(results[f"usage_head{h}"] for h in range(4))

    # The discriminator trained: its weights left their (seeded) initialisation.
    set_seed(42)
    OptVQModel(OptVQConfig(**model))
    initial = OptVQLoss(OptVQLossConfig(**{**SMALL_DISCRIMINATOR, **loss})).discriminator.state_dict()
    trained = load_file(tmp_path / "out" / "checkpoint-2" / "model_1.safetensors")
    assert not torch.equal(trained["discriminator.main.0.weight"], initial["main.0.weight"])

    out = tmp_path / "out"
    loaded = OptVQModel.from_pretrained(out)
    assert loaded.config.num_codes == 32 and (out / "preprocessor_config.json").is_file()
    assert_same(final_weights(out), {k: v for k, v in load_file(out / "checkpoint-2" / "model.safetensors").items()})
    ema = OptVQModel.from_pretrained(out / "ema")
    assert not torch.equal(ema.decoder.conv_out.weight, loaded.decoder.conv_out.weight)
    assert PIL.Image.open(out / "reconstruction.png").size == (2 * 16, 2 * 16)  # 2 images, originals over recons
    assert (out / "samples" / "reconstruction-2.png").is_file() and list((out / "logs").rglob("events.out.*"))
    saved = json.loads((out / "report.json").read_text())
    assert saved["validation"]["model"]["psnr"] == pytest.approx(results["psnr"])
    assert "| model |" in (out / "report.md").read_text()


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    data = tmp_path / "data"
    save_png_folder(data / "train", 1)
    save_png_folder(data / "validation", 1, seed=1)
    config = write_config(
        tmp_path / "c.yaml",
        dataset_name=None,
        train_data_dir=str(data),
        dataset_repeats=4,
        random_flip=False,
        max_train_steps=40,
        learning_rate=1e-2,
        logging_steps=10,
        loss={"disc_loss_weight": 0.0, "disc_weight": 0.0},
    )
    report = run(config, tmp_path / "out")
    first, last = report["first_train_logs"], report["last_train_logs"]
    assert last["rec_loss"] < 0.5 * first["rec_loss"], (first, last)
    assert last["loss"] < 0.25 * first["loss"], (first, last)  # the quantizer loss falls too


# ------------------------------------------------------------------------------------------------------------- resume
def test_resume_equals_the_uninterrupted_run_and_skips_an_interrupted_checkpoint(tmp_path, monkeypatch):
    """6 steps with random crops, flips, gradient accumulation, discriminator, adaptive weight from step 2, EMA and a
    cosine schedule, versus: 3 steps, checkpoint, crash while writing the step-6 checkpoint, resume 'latest'."""
    config = write_config(
        tmp_path / "c.yaml",
        max_train_steps=6,
        checkpointing_steps=3,
        gradient_accumulation_steps=2,
        train_crop_scale=[0.3, 1.0],
        use_ema=True,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        loss={"disc_start": 2},
    )
    reference = tmp_path / "uninterrupted"
    run(config, reference)

    interrupted = tmp_path / "interrupted"
    real_save_state = Accelerator.save_state

    def crash_at_step_6(self, output_dir, *args, **kwargs):
        if output_dir.endswith("checkpoint-6"):
            Path(output_dir).mkdir(parents=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
            raise OSError("No space left on device")
        return real_save_state(self, output_dir, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", crash_at_step_6)
    with pytest.raises(OSError, match=r"could not write checkpoint .*checkpoint-6: No space left.*checkpoint-3 is"):
        run(config, interrupted)
    monkeypatch.setattr(Accelerator, "save_state", real_save_state)
    assert not (interrupted / ".tmp-checkpoint-6").exists() and not (interrupted / "checkpoint-6").exists()
    assert not [path.name for path in interrupted.iterdir() if path.name.startswith(".tmp")]
    (interrupted / "checkpoint-9").mkdir()  # a folder someone copied halfway: no training_state.json
    assert find_latest_checkpoint(interrupted) == str(interrupted / "checkpoint-3")

    report = run(config, interrupted, "--resume_from_checkpoint", "latest")
    assert report["steps_this_run"] == 3 and report["global_step"] == 6
    assert_same(final_weights(interrupted), final_weights(reference))
    ema = [load_file(out / "ema" / "model.safetensors") for out in (interrupted, reference)]
    assert_same(*ema)
    discriminator = [load_file(out / "checkpoint-6" / "model_1.safetensors") for out in (interrupted, reference)]
    assert_same(*discriminator)
    assert report["validation"] == json.loads((reference / "report.json").read_text())["validation"]


def test_streaming_run_resumes_exactly(tmp_path):
    """A streamed imagefolder (shuffle buffer, decoding threads): 5 steps equal 3 steps + resume + 2 steps, across
    the end of an epoch (7 streamed images: 3 batches of 2, the last image dropped)."""
    data = save_png_folder(tmp_path / "data", 9)
    config = write_config(
        tmp_path / "c.yaml",
        dataset_name=None,
        train_data_dir=str(data),
        streaming=True,
        num_validation_images=2,
        train_batch_size=2,
        shuffle_buffer_size=4,
        dataloader_num_workers=2,
        train_crop_scale=[0.3, 1.0],
        max_train_steps=5,
        checkpointing_steps=3,
    )
    run(config, tmp_path / "reference")
    run(config, tmp_path / "resumed", "--max_train_steps", "3")
    state = json.loads((tmp_path / "resumed" / "checkpoint-3" / "process_state_0.json").read_text())
    assert state == {"data": {"epoch": 0, "position": 6}}
    report = run(config, tmp_path / "resumed", "--resume_from_checkpoint", "latest")
    assert report["steps_this_run"] == 2
    assert_same(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "reference"))


def test_checkpoint_helpers(tmp_path):
    for step in (2, 10, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / STATE_FILENAME).write_text("{}")
    (tmp_path / "checkpoint-12").mkdir()  # incomplete
    (tmp_path / ".tmp-checkpoint-14").mkdir()
    assert find_latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # numeric, not alphabetical order
    assert resolve_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-10")
    assert resolve_checkpoint("checkpoint-4", tmp_path) == str(tmp_path / "checkpoint-4")
    assert resolve_checkpoint("latest", tmp_path / "nothing-yet") is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "checkpoint-12"), tmp_path)
    assert prune_checkpoints(tmp_path, keep=1) == [str(tmp_path / "checkpoint-2"), str(tmp_path / "checkpoint-4")]
    assert find_latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


# --------------------------------------------------------------------------------------------------- several processes
TWO_RANKS = """
import importlib.util, os, sys, warnings
warnings.simplefilter("ignore")
import torch
from accelerate import debug_launcher
from accelerate.state import PartialState
from optvq_hf import OptVQModel

spec = importlib.util.spec_from_file_location("optvq_train_example", sys.argv[1])
train = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = train
spec.loader.exec_module(train)


def worker(latents_file, result_dir, argv):
    train.main(argv)
    rank = PartialState().process_index
    # The trained quantizer on this rank's half of fixed latents, in training mode: Sinkhorn over both ranks.
    model = OptVQModel.from_pretrained(argv[argv.index("--output_dir") + 1])
    indices = model.quantizer.train()(torch.load(latents_file).chunk(2)[rank]).indices
    torch.save({"indices": indices}, os.path.join(result_dir, f"rank{rank}.pt"))


debug_launcher(worker, args=(sys.argv[2], sys.argv[3], sys.argv[4:]), num_processes=2)
"""


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path):
    """2 gloo ranks x 2 images = 1 process x 4 images: same weights (DDP averages the gradients, the Sinkhorn marginals
    are summed over the ranks), and the split batch gets the assignment of the whole batch. With k-means
    initialisation (gathered rows, broadcast codes) and the discriminator training (adversarial term off: its
    adaptive weight is computed per rank)."""
    common = dict(
        max_train_steps=3,
        checkpointing_steps=3,
        train_crop_scale=[0.5, 1.0],
        kmeans_init=True,
        kmeans_init_batches=1,
        kmeans_iterations=5,
        loss={"disc_start": 100},
    )
    one_config = write_config(tmp_path / "one.yaml", train_batch_size=4, **common)
    two_config = write_config(tmp_path / "two.yaml", train_batch_size=2, **common)
    run(one_config, tmp_path / "one")

    latents = torch.randn(8, 8, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5
    torch.save(latents, tmp_path / "latents.pt")
    argv = ["--config", str(two_config), "--output_dir", str(tmp_path / "two")]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="yes")
    done = subprocess.run(
        [sys.executable, "-c", TWO_RANKS, str(EXAMPLE), str(tmp_path / "latents.pt"), str(tmp_path), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["num_processes"] == 2 and report["global_batch_size"] == 4

    # Both ranks saved identical parameters (each wrote its own process state; rank 0 wrote the weights).
    assert (tmp_path / "two" / "checkpoint-3" / "process_state_1.json").is_file()
    assert_same(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"), exact=False)

    model = OptVQModel.from_pretrained(tmp_path / "two")
    whole = model.quantizer.train()(latents).indices
    split = torch.cat([torch.load(tmp_path / f"rank{r}.pt")["indices"] for r in range(2)])
    assert torch.equal(split, whole)
    alone = torch.cat([model.quantizer(half).indices for half in latents.chunk(2)])
    assert not torch.equal(alone, whole)  # each half on its own gets another assignment: the all-reduce matters


def test_guard_refuses_processes_that_did_not_form_a_group(tmp_path, monkeypatch):
    check_process_group(1, {})
    check_process_group(2, {"WORLD_SIZE": "2"})
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU=true accelerate launch --multi_gpu"):
        check_process_group(1, {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    with pytest.raises(RuntimeError, match="launcher started 4 processes"):
        check_process_group(1, {"OMPI_COMM_WORLD_SIZE": "4"})
    # What `accelerate launch --multi_gpu --num_processes 2` does on a machine without GPUs: each process sees
    # WORLD_SIZE=2 but accelerate falls back to a one-process state.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="did not form one distributed group"):
        run(write_config(tmp_path / "c.yaml", max_train_steps=1), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------- k-means
def test_kmeans_init_with_several_heads():
    torch.manual_seed(0)
    model = OptVQModel(OptVQConfig(**{**SMALL_MODEL, "num_codes": 8}))
    batches = [torch.rand(4, 3, 16, 16) * 2 - 1 for _ in range(2)]
    rows = torch.cat([latent_rows(model, batch) for batch in batches])  # all 4 heads' sub-vectors, d = 2
    assert rows.shape == (2 * 4 * 4 * 4 * 4, 2)
    error = lambda codes: torch.cdist(rows, codes).min(dim=1).values.pow(2).mean()  # noqa: E731
    initial = model.quantizer.codebook().detach().clone()
    before = error(initial)
    codes = kmeans_init_codebook(model, batches, iterations=10)
    torch.testing.assert_close(model.quantizer.codebook().detach(), codes, rtol=0, atol=1e-6)
    assert error(codes) < 0.2 * before
    # Every head's sub-vectors were clustered (the original's k-means broke with several heads): each head's own
    # quantization error falls, and the codes serve the heads together.
    per_head = lambda codes: torch.cdist(rows, codes).min(dim=1).values.pow(2).view(-1, 4).mean(0)  # noqa: E731
    assert bool((per_head(codes) < 0.5 * per_head(initial)).all())
    assert len(torch.unique(torch.cdist(rows, codes).argmin(dim=1))) == 8
    with pytest.raises(ValueError, match="at least num_codes"):
        kmeans_init_codebook(OptVQModel(OptVQConfig(**{**SMALL_MODEL, "num_codes": 4096})), batches)


# -------------------------------------------------------------------------------------------- errors before training
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"learning_rat": 1e-3}, "unknown field 'learning_rat'.*did you mean 'learning_rate'"),
        ({"model": {**SMALL_MODEL, "num_code": 8}}, "unknown field 'num_code' in the 'model' section"),
        ({"loss": {"disc_strat": 5}}, "unknown field 'disc_strat' in the 'loss' section.*'disc_start'"),
        ({"train_batch_size": "many"}, "train_batch_size must be an integer, got 'many'"),
        ({"train_batch_size": 0}, "train_batch_size must be >= 1"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
        ({"model": {**SMALL_MODEL, "num_heads": 3}}, r"embed_dim \(8\) must be divisible by num_heads \(3\)"),
        ({"loss": {"disc_loss": "wasserstein"}}, "disc_loss must be one of"),
        (
            {
                "loss": {"perceptual_weight": 1.0, "perceptual_pretrained": False, "disc_in_channels": 1},
                "model": {**SMALL_MODEL, "in_channels": 1, "out_channels": 1},
            },
            "LPIPS needs RGB images",
        ),
        ({"dataset_name": "builtin:digits", "train_data_dir": "/tmp"}, "exactly one data source"),
        pytest.param(
            {"report_to": "wandb"},
            "needs wandb: pip install wandb",
            marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb installed"),
        ),
    ],
)
def test_bad_config_fields_fail_before_training(tmp_path, fields, message):
    content = {**BASE, "model": SMALL_MODEL, "loss": SMALL_DISCRIMINATOR, "max_train_steps": 1, **fields}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "c.yaml", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_command_line_overrides_every_field(tmp_path):
    config = train.parse_args(
        [
            "--config",
            str(TINY_DEFAULT),
            "--learning_rate",
            "2e-4",
            "--model.resolution",
            "64",
            "--model.num_codes",
            "512",
            "--loss.disc_start",
            "7",
            "--train_crop_scale",
            "0.5",
            "1",
            "--validation_steps",
            "null",
            "--use_ema",
            "true",
        ]
    )
    assert config.learning_rate == 2e-4 and config.model["resolution"] == 64 and config.model["num_codes"] == 512
    assert config.loss["disc_start"] == 7 and config.train_crop_scale == [0.5, 1.0] and config.use_ema is True
    assert config.model["channel_multipliers"] == [1, 1, 1]  # untouched fields keep the file's values
    assert config.validation_steps is None
    with pytest.raises(ValueError, match="--train_batch_size.*invalid int value: '2.5'"):
        train.parse_args(["--config", str(TINY_DEFAULT), "--train_batch_size", "2.5"])
    with pytest.raises(ValueError, match="unknown command-line argument '--no_such_flag'"):
        train.parse_args(["--config", str(TINY_DEFAULT), "--no_such_flag", "1"])
    # A prefix abbreviation is refused, not read as the field it abbreviates.
    with pytest.raises(ValueError, match="'--model.num_code'; did you mean '--model.num_codes'"):
        train.parse_args(["--config", str(TINY_DEFAULT), "--model.num_code", "5"])
    with pytest.raises(ValueError, match="learning_rate is NaN"):
        train.parse_args(["--config", str(TINY_DEFAULT), "--learning_rate", "nan"])
    with pytest.raises(ValueError, match="model.sinkhorn_epsilon is NaN"):
        train.parse_args(["--config", str(TINY_DEFAULT), "--model.sinkhorn_epsilon", "nan"])
    with pytest.raises(ValueError, match="'--learning_rat'; did you mean '--learning_rate'"):
        train.parse_args(["--config", str(TINY_DEFAULT), "--learning_rat", "1"])
    with pytest.raises(ValueError, match="does not exist"):
        train.parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_bad_data_fails_before_training(tmp_path):
    data = save_png_folder(tmp_path / "data", 6)
    base = dict(dataset_name=None, train_data_dir=str(data), num_validation_images=2, max_train_steps=1)
    with pytest.raises(ValueError, match="image_column 'img' is not a column"):
        run(write_config(tmp_path / "a.yaml", image_column="img", **base), tmp_path / "a")
    (data / "3.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    with pytest.raises(ValueError, match=r"unreadable image at .*3\.png"):
        run(write_config(tmp_path / "b.yaml", **base), tmp_path / "b")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        run(write_config(tmp_path / "c.yaml", **{**base, "train_data_dir": str(empty)}), tmp_path / "c")
    good = save_png_folder(tmp_path / "good", 6)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        run(
            write_config(tmp_path / "d.yaml", **{**base, "train_data_dir": str(good), "train_batch_size": 8}),
            tmp_path / "d",
        )
    for name in "abcd":
        assert (
            not list((tmp_path / name).glob("checkpoint-*")) and not (tmp_path / name / "model.safetensors").exists()
        )


# ----------------------------------------------------------------------------------------------------- example configs
def test_example_configs_hold_the_original_hyperparameters(tmp_path):
    configs = {
        name: train.parse_args(["--config", str(EXAMPLE.parent / "configs" / f"{name}.yaml")])
        for name in ("tiny", "imagenet_16x16x4", "imagenet_16x16x8", "mnist", "cifar10")
    }
    models = {name: config.model_config() for name, config in configs.items()}
    losses = {name: config.loss_config() for name, config in configs.items()}
    for heads in (4, 8):
        name = f"imagenet_16x16x{heads}"
        config, model, loss = configs[name], models[name], losses[name]
        shape = (model.num_heads, model.num_codes, model.latent_resolution, model.code_dim)
        assert shape == (heads, 16384, 16, 256 // heads)
        assert (loss.perceptual_weight, loss.disc_start, loss.l1_weight, loss.l2_weight) == (3.0, 150_000, 1.0, 1.0)
        assert config.learning_rate * 8 * config.train_batch_size == pytest.approx(2.88e-4)  # scale_lr, 8 GPUs
        assert config.scale_lr and config.lr_scheduler == "one_cycle" and config.num_train_epochs == 50
        assert (config.adam_weight_decay, config.adam_epsilon, config.max_grad_norm) == (0.05, 1e-7, 1.0)
    for name, channels in (("mnist", 1), ("cifar10", 3)):
        model, loss = models[name], losses[name]
        assert (
            model.backbone,
            model.in_channels,
            model.latent_resolution,
            model.num_heads,
            model.code_dim,
            model.num_codes,
        ) == ("simple_cnn", channels, 8, 4, 2, 1024)
        assert loss.perceptual_weight == loss.disc_weight == loss.disc_loss_weight == 0.0
        assert configs[name].train_batch_size == 1024 and not configs[name].random_flip
    assert configs["cifar10"].image_column == "img"
    # The offline default needs no download: no perceptual term, built-in photos.
    assert losses["tiny"].perceptual_weight == 0.0 and configs["tiny"].dataset_name == "builtin:skimage-photos"


def test_mnist_config_trains_on_the_offline_digits(tmp_path):
    report = run(
        EXAMPLE.parent / "configs" / "mnist.yaml",
        tmp_path / "out",
        "--dataset_name",
        "builtin:digits",
        "--validation_split",
        "null",
        "--train_batch_size",
        "8",
        "--max_train_steps",
        "2",
        "--num_validation_images",
        "8",
        "--report_to",
        "none",
        "--dataloader_num_workers",
        "0",
    )
    results = report["validation"]["model"]
    assert report["global_step"] == 2 and results["psnr"] == results["psnr_rgb"] > 0  # one channel: PSNR of it
    assert OptVQModel.from_pretrained(tmp_path / "out").config.in_channels == 1


# ------------------------------------------------------------------------------------------------- no silent surprises
def test_resume_refuses_options_its_restored_state_overrides(tmp_path):
    config = write_config(tmp_path / "c.yaml", max_train_steps=2, checkpointing_steps=1)
    run(config, tmp_path / "out")
    for flag, value, message in [
        ("--learning_rate", "5e-4", "learning_rate: 0.001 in the checkpoint, 0.0005 now"),
        ("--lr_scheduler", "cosine", "lr_scheduler: 'constant' in the checkpoint, 'cosine' now"),
        ("--train_batch_size", "2", "train_batch_size: 4 in the checkpoint, 2 now"),
    ]:
        with pytest.raises(ValueError, match=message):
            run(config, tmp_path / "out", "--resume_from_checkpoint", "latest", flag, value)
    # Options the restored state does not hold may change: more steps continue the run.
    report = run(config, tmp_path / "out", "--resume_from_checkpoint", "latest", "--logging_steps", "1")
    assert report["global_step"] == 2 and report["steps_this_run"] == 0


def test_full_disk_at_the_final_save_leaves_no_half_written_file(tmp_path, monkeypatch):
    config = write_config(tmp_path / "c.yaml", max_train_steps=1)
    real_save = OptVQModel.save_pretrained

    def full_disk(self, folder, *args, **kwargs):
        (Path(folder) / "modeling_optvq.py").write_bytes(b"")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(OptVQModel, "save_pretrained", full_disk)
    out = tmp_path / "out"
    with pytest.raises(OSError, match=f"could not save the model into {out}: No space left on device"):
        run(config, out)
    assert not (out / "modeling_optvq.py").exists() and not (out / "model.safetensors").exists()
    assert not [path.name for path in out.iterdir() if path.name.startswith(".tmp")]
    assert find_latest_checkpoint(out) == str(out / "checkpoint-1")  # the step's checkpoint stays usable
    monkeypatch.setattr(OptVQModel, "save_pretrained", real_save)


def test_saved_files_get_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        run(write_config(tmp_path / "c.yaml", max_train_steps=1), tmp_path / "out")
    finally:
        os.umask(mask)
    modes = {
        str(path.relative_to(tmp_path)): path.stat().st_mode & 0o777
        for path in (tmp_path / "out").rglob("*")
        if path.is_file() and "logs" not in path.parts
    }
    assert "out/model.safetensors" in modes and "out/checkpoint-1/model.safetensors" in modes
    assert {name: mode for name, mode in modes.items() if mode != 0o644} == {}


# ------------------------------------------------------------------------------------- checkpoints are model folders
def test_every_checkpoint_opens_as_a_model_and_evaluates(tmp_path):
    from optvq_hf import OptVQImageProcessor

    config = write_config(tmp_path / "c.yaml", max_train_steps=2, checkpointing_steps=1)
    out = tmp_path / "out"
    run(config, out)
    first = OptVQModel.from_pretrained(out / "checkpoint-1")
    last = OptVQModel.from_pretrained(out / "checkpoint-2")
    assert first.config.num_codes == 16 and first.config.backbone == "simple_cnn"
    assert_same(last.state_dict(), final_weights(out))  # the last checkpoint holds the final weights
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), last.state_dict().values()))
    processor = OptVQImageProcessor.from_pretrained(out / "checkpoint-1")
    assert processor.to_dict() == OptVQImageProcessor.from_pretrained(out).to_dict()
    # examples/evaluate.py takes a checkpoint folder as --model
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        PIL.Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(images / f"{i}.png")
    AcceleratorState._reset_state(True)
    results = load_example("evaluate").main(
        [
            "--model",
            str(out / "checkpoint-2"),
            "--data_dir",
            str(images),
            "--output_dir",
            str(tmp_path / "eval"),
            "--metrics",
            "psnr_rgb,usage",
            "--batch_size",
            "2",
            "--num_workers",
            "0",
        ]
    )
    assert set(results) == {"psnr_rgb", "usage"} and results["psnr_rgb"] > 0


# -------------------------------------------------------------------------------------------------------- preemption
def test_sigterm_checkpoints_the_step_and_resume_continues_exactly(tmp_path, monkeypatch):
    import signal

    config = write_config(tmp_path / "c.yaml", max_train_steps=5, checkpointing_steps=100, loss={"disc_start": 1})
    reference = tmp_path / "uninterrupted"
    run(config, reference)

    real_log = Accelerator.log

    def preempt_at_step_2(self, values, step=None, **kwargs):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step finishes first
        return real_log(self, values, step=step, **kwargs)

    monkeypatch.setattr(Accelerator, "log", preempt_at_step_2)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(SystemExit) as stopped:
        run(config, interrupted)
    monkeypatch.setattr(Accelerator, "log", real_log)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert find_latest_checkpoint(interrupted) == str(interrupted / "checkpoint-2")
    assert not (interrupted / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    report = run(config, interrupted, "--resume_from_checkpoint", "latest")
    assert report["steps_this_run"] == 3
    assert_same(final_weights(interrupted), final_weights(reference))


@pytest.mark.slow
def test_sigterm_to_a_training_subprocess(tmp_path):
    """A real signal to a real process: it finishes its step, checkpoints, says so and exits with 128 + SIGTERM."""
    import signal
    import time

    config = write_config(tmp_path / "c.yaml", max_train_steps=100000, checkpointing_steps=100000)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(EXAMPLE.parents[1])}
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--config", str(config), "--output_dir", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "training_config.yaml").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "Stopped by a signal after step" in output and "--resume_from_checkpoint latest" in output
    step = int(output.split("Stopped by a signal after step ")[1].split()[0])
    assert find_latest_checkpoint(out) == str(out / f"checkpoint-{step}")
    assert OptVQModel.from_pretrained(out / f"checkpoint-{step}").config.num_codes == 16


# ------------------------------------------------------------------------------------------------------- fine-tuning
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "official-tiny"


@pytest.fixture(scope="module")
def converted_fixture(tmp_path_factory):
    from optvq_hf.conversion.convert import convert

    output = tmp_path_factory.mktemp("converted") / "model"
    convert(
        FIXTURE / "training_checkpoint.pth",
        output,
        original_config=str(FIXTURE / "original_config.yaml"),
        save_loss_weights=True,
        log=lambda message: None,
    )
    return output


def finetune_config(tmp_path, **fields):
    """A config without a model section: the architecture comes from the pretrained model."""
    content = {**BASE, "train_data_dir": str(save_png_folder(tmp_path / "data", 12)), "dataset_name": None}
    content.update(num_validation_images=4, validation_batch_size=4, max_train_steps=1)
    content["loss"] = {"disc_num_layers": 3, "perceptual_weight": 0.0, "disc_start": 0}
    content.update(fields)
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(content))
    return tmp_path / "ft.yaml"


def test_finetuning_starts_from_the_pretrained_weights_and_loss_networks(tmp_path, monkeypatch, converted_fixture):
    from safetensors.torch import load_file as load

    disc_weights = {
        k.removeprefix("loss.discriminator."): v
        for k, v in load(converted_fixture / "loss_weights.safetensors").items()
        if k.startswith("loss.discriminator.")
    }
    base_channels = disc_weights["main.0.weight"].shape[0]
    config = finetune_config(tmp_path)
    seen = {}
    real_generator_loss = OptVQLoss.generator_loss

    def record(self, pixel_values, reconstruction, *args, **kwargs):
        if not seen:
            seen["pixel_values"], seen["reconstruction"] = pixel_values.clone(), reconstruction.detach().clone()
            seen["discriminator"] = {k: v.clone() for k, v in self.discriminator.state_dict().items()}
        return real_generator_loss(self, pixel_values, reconstruction, *args, **kwargs)

    monkeypatch.setattr(OptVQLoss, "generator_loss", record)
    run(
        config,
        tmp_path / "out",
        "--pretrained_model_name_or_path",
        str(converted_fixture),
        "--loss.disc_base_channels",
        str(base_channels),
        "--model.inference_assignment",
        "sinkhorn",  # a training-time field may change
    )
    pretrained = OptVQModel.from_pretrained(converted_fixture).train()
    expected = pretrained(seen["pixel_values"]).reconstruction.detach()  # with autograd, as in the training step
    # Float rounding of a differently scheduled forward (~5e-6); other weights would differ by ~0.1.
    torch.testing.assert_close(seen["reconstruction"], expected, rtol=0, atol=2e-5)
    assert_same(seen["discriminator"], {k: v for k, v in disc_weights.items()})
    saved = OptVQConfig.from_pretrained(tmp_path / "out")
    assert saved.inference_assignment == "sinkhorn" and saved.num_codes == pretrained.config.num_codes


def test_finetuning_refuses_contradicting_architecture_fields(tmp_path, converted_fixture):
    num_codes = OptVQConfig.from_pretrained(converted_fixture).num_codes
    with pytest.raises(
        ValueError, match=f"model.num_codes=5 contradicts the pretrained model .*num_codes={num_codes}"
    ):
        run(
            finetune_config(tmp_path),
            tmp_path / "out",
            "--pretrained_model_name_or_path",
            str(converted_fixture),
            "--model.num_codes",
            "5",
        )


# ----------------------------------------------------------------------------------------- the flags of diffusers' kit
def test_diffusers_style_flags_and_a_dry_run_push(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", max_train_steps=2, image_logging_steps=1, report_to="tensorboard")
    report = run(
        config,
        tmp_path / "out",
        "--allow_tf32",
        "true",
        "--gradient_checkpointing",
        "true",
        "--max_train_samples",
        "12",
        "--push_to_hub",
        "true",
        "--hub_model_id",
        "someone/optvq-digits",
        "--hub_dry_run",
        "true",
    )
    out = tmp_path / "out"
    assert report["dataset"].startswith("scikit-learn digits")
    assert yaml.safe_load((out / "training_config.yaml").read_text())["gradient_checkpointing"] is True
    card = (out / "README.md").read_text()
    assert "someone/optvq-digits" in card and f"| {report['validation']['model']['psnr']:.3f} |" in card
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and "checkpoint-2" not in printed.split("someone/optvq-digits", 1)[1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    images = events.Images("reconstructions")
    assert [image.step for image in images] == [1, 2]
    assert PIL.Image.open(__import__("io").BytesIO(images[0].encoded_image_string)).size == (2 * 16, 2 * 16)


def test_report_links_a_plot_of_the_curves(tmp_path):
    pytest.importorskip("matplotlib")
    config = write_config(tmp_path / "c.yaml", max_train_steps=4, logging_steps=2, validation_steps=2)
    report = run(config, tmp_path / "out")
    assert [step for step, _ in report["history"]["loss"]] == [2, 4]
    assert [step for step, _ in report["history"]["usage"]] == [2, 4]
    assert [step for step, _ in report["history"]["psnr"]] == [2, 4]
    assert report["history"]["psnr"][-1][1] == report["validation"]["model"]["psnr"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "](training_curves.png)" in markdown
    with PIL.Image.open(tmp_path / "out" / "training_curves.png") as image:
        assert image.size == (1300, 360)


def test_every_option_has_help_text():
    from dataclasses import fields

    for cls in (train.TrainingConfig, OptVQLossConfig):
        missing = [f.name for f in fields(cls) if not f.metadata.get("help")]
        assert missing == [], f"{cls.__name__} fields without help: {missing}"


def test_two_thread_runs_are_bit_identical(tmp_path):
    """With several intra-op threads the CPU path stays deterministic: the codebook gather is `F.embedding`, whose
    backward accumulates in a fixed order (the backward of `codes[indices]` does not)."""
    config = write_config(tmp_path / "c.yaml", max_train_steps=4, model={"num_codes": 16})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(config, tmp_path / "a")
        run(config, tmp_path / "b")
    finally:
        torch.set_num_threads(threads)
    assert_same(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"), exact=True)
