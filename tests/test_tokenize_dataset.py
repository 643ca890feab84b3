"""examples/tokenize_dataset.py and optvq_hf/training/token_data.py on a tiny tokenizer and a few generated PNGs."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPOSITORY, load_example, tiny_config_kwargs

from optvq_hf import OptVQConfig, OptVQModel
from optvq_hf.image_processing_optvq import OptVQImageProcessor
from optvq_hf.tokens import TokenLayout
from optvq_hf.training import token_data

NUM_IMAGES = 5


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tokenizer")
    model = OptVQModel(OptVQConfig(**tiny_config_kwargs(resolution=16)))
    model.save_pretrained(folder)
    OptVQImageProcessor.from_model_config(model.config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        label = "cat" if i % 2 else "dog"
        os.makedirs(folder / label, exist_ok=True)
        size = (20 + 3 * i, 18 + i)  # not square, not the resolution: resize and crop matter
        PIL.Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(folder / label / f"{i}.png")
    return str(folder)


def run(tokenizer_dir, image_dir, out, *extra):
    module = load_example("tokenize_dataset")
    argv = ["--tokenizer", tokenizer_dir, "--train_data_dir", image_dir, "--output_dir", str(out)]
    argv += ["--shard_size", "2", "--batch_size", "4", "--dataloader_num_workers", "0", *extra]
    return module.main(argv)


def source_images(image_dir):
    import datasets

    rows = datasets.load_dataset("imagefolder", data_dir=image_dir, split="train")
    return rows


def sorted_rows(dataset):
    rows = dataset.to_dict()
    order = sorted(range(len(rows["index"])), key=lambda i: (rows["index"][i], rows["variant"][i]))
    return {key: [values[i] for i in order] for key, values in rows.items()}


def test_tokens_equal_model_tokenize(tokenizer_dir, image_dir, tmp_path, fresh_accelerate_state):
    # One DataLoader worker process: the decoding path of real runs (the option given last wins).
    result = run(
        tokenizer_dir, image_dir, tmp_path / "out", "--label_column", "label", "--dataloader_num_workers", "1"
    )
    model = OptVQModel.from_pretrained(tokenizer_dir).eval()
    processor = OptVQImageProcessor.from_pretrained(tokenizer_dir)
    source = source_images(image_dir)
    dataset = result.dataset
    assert len(dataset) == NUM_IMAGES
    assert dataset.features["tokens"].feature.dtype == "uint8"  # 64 codes fit in a byte
    assert dataset["index"] == list(range(NUM_IMAGES)) and set(dataset["variant"]) == {0}
    assert dataset["label"] == source["label"]
    assert result.num_classes == 2
    for row in dataset:
        pixels = processor(source[row["index"]]["image"])["pixel_values"]
        expected = model.tokenize(pixels)[0]
        assert torch.equal(torch.tensor(row["tokens"], dtype=torch.long), expected)


def test_metadata_round_trip(tokenizer_dir, image_dir, tmp_path, fresh_accelerate_state, capsys):
    out = tmp_path / "out"
    layout_args = ("--order", "head-major", "--vocabulary", "per-head", "--max_samples", "3")
    hub_args = ("--push_to_hub", "true", "--hub_repo_id", "me/tokens", "--hub_dry_run", "true")
    run(tokenizer_dir, image_dir, out, *layout_args, *hub_args)
    assert "dry run: would push 3 rows" in capsys.readouterr().out
    import datasets

    # save_to_disk / load_from_disk of the plain dataset keep the metadata, and the sidecar file has it too.
    plain = datasets.load_from_disk(str(out / "dataset"))
    copy = tmp_path / "copy"
    plain.save_to_disk(str(copy))
    loaded = token_data.load_token_dataset(str(copy))
    assert loaded.layout == TokenLayout(64, 4, (8, 8), order="head-major", vocabulary="per-head")
    assert loaded.metadata["vocab_size"] == 256 and loaded.metadata["token_dtype"] == "uint8"
    assert loaded.metadata["image_processor"]["resolution"] == 16
    assert loaded.metadata["tokenizer"] == tokenizer_dir and loaded.metadata["variants"] == {"0": "center"}
    assert len(loaded.dataset) == 3 and loaded.num_classes is None and "label" not in loaded.dataset.column_names
    # The tokens decode back to indices that lie in each head's range.
    indices = loaded.layout.to_indices(loaded.torch_tokens())
    assert indices.shape == (3, 4, 8, 8)
    layout = TokenLayout(4, 2, (3, 5), "head-major", "per-head")
    assert TokenLayout.from_dict(layout.to_dict()) == layout
    with pytest.raises(ValueError, match="unknown TokenLayout field"):
        TokenLayout.from_dict({**layout.to_dict(), "heads": 2})


def test_variants(tokenizer_dir, image_dir, tmp_path, fresh_accelerate_state):
    result = run(tokenizer_dir, image_dir, tmp_path / "out", "--variants", "center", "flip", "ten_crop")
    dataset = result.dataset
    assert len(dataset) == NUM_IMAGES * 12
    assert dataset["variant"][:12] == list(range(12)) and dataset["index"][:12] == [0] * 12
    assert result.metadata["ten_crop"] == {"outer_size": 18, "crop_size": 16}  # round(16 * 1.1)
    processor = OptVQImageProcessor.from_pretrained(tokenizer_dir)
    image = source_images(image_dir)[1]["image"]
    pixels = token_data.variant_images(processor, image, list(range(12)))
    center = processor(image)["pixel_values"][0].numpy()
    outer = processor(image, resolution=18)["pixel_values"][0].numpy()
    np.testing.assert_array_equal(pixels[0], center)
    np.testing.assert_array_equal(pixels[1], center[:, :, ::-1])
    np.testing.assert_array_equal(pixels[2], outer[:, :16, :16])  # top-left
    np.testing.assert_array_equal(pixels[5], outer[:, 2:, 2:])  # bottom-right
    np.testing.assert_array_equal(pixels[6], outer[:, 1:17, 1:17])  # center: round((18 - 16) / 2) = 1
    np.testing.assert_array_equal(pixels[7], outer[:, :16, :16][:, :, ::-1])  # flipped top-left
    model = OptVQModel.from_pretrained(tokenizer_dir).eval()
    rows = dataset.select(range(12, 24))  # image 1, all variants
    expected = model.tokenize(torch.from_numpy(pixels))
    assert torch.equal(torch.tensor(rows["tokens"], dtype=torch.long), expected)


def test_resume_skips_finished_shards(tokenizer_dir, image_dir, tmp_path, fresh_accelerate_state):
    out = tmp_path / "out"
    full = run(tokenizer_dir, image_dir, out)
    shards = sorted(n for n in os.listdir(out / "shards") if n.startswith("shard-"))
    assert shards == ["shard-00000", "shard-00001", "shard-00002"]
    # An interrupted run: shard 1 never finished (only its temporary folder is there), no merged dataset.
    import shutil

    os.rename(out / "shards" / "shard-00001", out / "shards" / "shard-00001.tmp-0")
    shutil.rmtree(out / "dataset")
    stamps = {
        name: os.stat(out / "shards" / name / "state.json").st_mtime_ns for name in ("shard-00000", "shard-00002")
    }
    with pytest.raises(ValueError, match="expected 3 shards"):
        token_data.merge_shards(str(out), {}, 3)
    resumed = run(tokenizer_dir, image_dir, out)
    assert {name: os.stat(out / "shards" / name / "state.json").st_mtime_ns for name in stamps} == stamps
    assert sorted(n for n in os.listdir(out / "shards") if n.startswith("shard-")) == shards
    assert resumed.dataset.to_dict() == full.dataset.to_dict()
    with pytest.raises(ValueError, match=r"other settings \(variants: \['center'\] -> \['center', 'flip'\]\)"):
        run(tokenizer_dir, image_dir, out, "--variants", "center", "flip")


# Runs examples/tokenize_dataset.py in a process that SIGKILLs itself at the worst moment: the second shard fully
# written to its temporary folder, just before the rename that commits it.
KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import runpy
real_replace = os.replace
def replace(source, target):
    if os.path.basename(target) == "shard-00001":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, target)
os.replace = replace
sys.argv = [os.path.join(sys.argv[1], "examples", "tokenize_dataset.py"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_resume_after_a_kill(tokenizer_dir, image_dir, tmp_path, fresh_accelerate_state):
    out = tmp_path / "out"
    argv = ["--tokenizer", tokenizer_dir, "--train_data_dir", image_dir, "--output_dir", str(out)]
    argv += ["--shard_size", "2", "--batch_size", "4", "--dataloader_num_workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(REPOSITORY), *argv], env=env, capture_output=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    left = sorted(os.listdir(out / "shards"))
    assert "shard-00000" in left and "shard-00001.tmp-0" in left and "shard-00001" not in left
    assert not (out / "dataset").exists()
    finished = os.stat(out / "shards" / "shard-00000" / "state.json").st_mtime_ns
    resumed = run(tokenizer_dir, image_dir, out)
    assert os.stat(out / "shards" / "shard-00000" / "state.json").st_mtime_ns == finished  # not redone
    assert not any(".tmp" in name for name in os.listdir(out / "shards"))
    reference = run(tokenizer_dir, image_dir, tmp_path / "uninterrupted")
    assert resumed.dataset.to_dict() == reference.dataset.to_dict()


def test_bad_input(tokenizer_dir, image_dir, tmp_path, fresh_accelerate_state):
    with pytest.raises(ValueError, match="image_column 'picture' is not a column"):
        run(tokenizer_dir, image_dir, tmp_path / "a", "--image_column", "picture")
    with pytest.raises(ValueError, match="image_column 'labels' is not a column"):
        run(tokenizer_dir, image_dir, tmp_path / "b", "--label_column", "labels")
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(image_dir, bad)
    (bad / "cat" / "3.png").write_bytes(b"not a png")  # the 4th row: imagefolder sorts cat/ before dog/
    with pytest.raises(ValueError, match=r"unreadable image at row \d+ of split 'train'.*3\.png"):
        run(tokenizer_dir, str(bad), tmp_path / "c")
    result = run(tokenizer_dir, str(bad), tmp_path / "d", "--skip_bad_images", "true")
    assert len(result.dataset) == NUM_IMAGES - 1


@pytest.mark.slow
def test_one_vs_two_processes(tokenizer_dir, image_dir, tmp_path):
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
        launch += ["--multi_gpu"] if processes > 1 else []
        script = [str(REPOSITORY / "examples" / "tokenize_dataset.py"), "--tokenizer", tokenizer_dir]
        script += ["--train_data_dir", image_dir, "--output_dir", str(out), "--shard_size", "2", "--batch_size", "4"]
        script += ["--dataloader_num_workers", "0", "--variants", "center", "flip", "--label_column", "label"]
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
        done = subprocess.run(launch + script, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[processes] = token_data.load_token_dataset(str(out))
    one, two = outputs[1], outputs[2]
    assert len(one.dataset) == NUM_IMAGES * 2
    assert sorted_rows(one.dataset) == sorted_rows(two.dataset)
    assert one.layout == two.layout


def test_streaming_equals_map_style(tokenizer_dir, image_dir, tmp_path, fresh_accelerate_state):
    common = ("--label_column", "label", "--max_samples", "4", "--variants", "center", "flip")
    stored = run(tokenizer_dir, image_dir, tmp_path / "stored", *common)
    streamed = run(tokenizer_dir, image_dir, tmp_path / "streamed", "--streaming", "true", *common)
    assert len(stored.dataset) == 8 and sorted(os.listdir(tmp_path / "streamed" / "shards"))[-1] == "shard-00001"
    assert streamed.dataset.to_dict() == stored.dataset.to_dict()


def expected_variants(processor, image):
    """The twelve variants of one image from `processor.preprocess` itself (see the token_data docstring)."""
    center = processor(image)["pixel_values"][0].numpy()
    outer = processor(image, resolution=18)["pixel_values"][0].numpy()
    crops = [outer[:, :16, :16], outer[:, :16, 2:], outer[:, 2:, :16], outer[:, 2:, 2:], outer[:, 1:17, 1:17]]
    return np.stack([center, center[:, :, ::-1], *crops, *(crop[:, :, ::-1] for crop in crops)])


def test_batch_variants_equal_the_processor_image_by_image(tokenizer_dir, image_dir):
    processor = OptVQImageProcessor.from_pretrained(tokenizer_dir)
    rng = np.random.default_rng(2)
    images = list(source_images(image_dir)["image"])
    images += [PIL.Image.fromarray(rng.integers(0, 256, (40, 23), dtype=np.uint8)), images[0].convert("RGBA")]
    pixels = token_data.batch_variant_images(processor, images, list(range(12)))
    assert pixels.shape == (len(images), 12, 3, 16, 16) and pixels.dtype == np.float32
    for image, variants in zip(images, pixels):
        np.testing.assert_array_equal(variants, expected_variants(processor, image))
    subset = token_data.batch_variant_images(processor, images, [1, 7])
    np.testing.assert_array_equal(subset, pixels[:, [1, 7]])


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("num_workers", [0, 1])
def test_write_shards_batches_and_shards(tokenizer_dir, tmp_path, num_workers, streaming):
    """Batches that do not divide the shards, one DataLoader for every shard of a dataset, bad images (inside a
    batch, and a whole shard): undecodable bytes in a dataset, images that the processor rejects (no pixels) in a
    stream."""
    import datasets

    model = OptVQModel.from_pretrained(tokenizer_dir).eval()
    processor = OptVQImageProcessor.from_pretrained(tokenizer_dir)
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, (17 + i, 20, 3), dtype=np.uint8) for i in range(7)]
    if streaming:
        arrays[4] = arrays[6] = np.zeros((0, 20, 3), dtype=np.uint8)
        source, num_rows, error = [{"image": a, "label": 10 + i} for i, a in enumerate(arrays)], None, "no pixels"
    else:
        source = datasets.Dataset.from_dict(
            {"image": [PIL.Image.fromarray(a) for a in arrays], "label": range(10, 17)}
        )
        source = source.cast_column("image", datasets.Image(decode=False))
        rows = source.to_list()
        rows[4]["image"] = rows[6]["image"] = {"bytes": b"not a png", "path": None}
        source, num_rows, error = datasets.Dataset.from_list(rows, features=source.features), 7, "cannot identify"
    kwargs = dict(image_column="image", label_column="label", variant_ids=[0, 1], shard_size=3, batch_size=4)
    kwargs.update(num_workers=num_workers, progress=False)
    layout = model.token_layout()
    with pytest.raises(ValueError, match=f"image at row 4 of the dataset: .*{error}"):
        token_data.write_shards(model, layout, processor, source, num_rows, str(tmp_path / "a"), **kwargs)
    out = str(tmp_path / "b")
    stats = token_data.write_shards(model, layout, processor, source, num_rows, out, **kwargs, skip_bad_images=True)
    assert (stats.images, stats.rows, stats.skipped, stats.skipped_rows) == (7, 10, 2, [4, 6])
    assert stats.shards_written == 3
    shards = [datasets.load_from_disk(token_data.shard_path(out, s)) for s in range(3)]
    assert [shard["index"] for shard in shards] == [[0, 0, 1, 1, 2, 2], [3, 3, 5, 5], []]
    merged = token_data.merge_shards(out, {}, 3)
    assert merged["variant"] == [0, 1] * 5 and merged["label"] == [10 + i for i in merged["index"]]
    assert merged.features["tokens"] == datasets.Sequence(datasets.Value("uint8"), length=model.tokens_per_image)
    for index in (0, 3, 5):
        pixels = torch.from_numpy(expected_variants(processor, arrays[index])[:2])
        rows = [position for position, i in enumerate(merged["index"]) if i == index]
        assert torch.equal(torch.tensor(merged[rows]["tokens"], dtype=torch.long), model.tokenize(pixels))


def test_default_num_workers_leave_the_encoder_its_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    # CPU: the cores per process less the encoder's threads, 0 to 8.
    assert [token_data.default_num_workers(p, "cpu") for p in (1, 2, 4)] == [6, 2, 0]
    # GPU: one core per process for the process itself, 1 to 8.
    assert [token_data.default_num_workers(p, "cuda") for p in (1, 2, 8)] == [7, 3, 1]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert token_data.default_num_workers(1, "cpu") == token_data.default_num_workers(1, "cuda") == 8
