"""examples/train_ar.py end to end on a tiny random tokenizer and a tiny LlamaForCausalLM: the stored tokens are the
tokenizer's, the tokenizer runs once, the sampled ids respect the layout and decode to exactly the saved grid."""

import json
import math
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import load_example, tiny_config_kwargs
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel, TokenLayout

pytest.importorskip("sklearn", reason="the example's default data are scikit-learn's digits")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_ar.py"
NUM_CODES, NUM_HEADS, IMAGE_SIZE = 64, 2, 8  # factor-2 tokenizer on 8x8 digits: 4x4 positions x 2 heads = 32 tokens


train_ar = load_example("train_ar")


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = OptVQModel(OptVQConfig(**tiny_config_kwargs(num_heads=NUM_HEADS, num_codes=NUM_CODES)))
    folder = tmp_path_factory.mktemp("tokenizer")
    model.save_pretrained(folder)
    return folder


def run_args(tokenizer_dir, output_dir, *extra):
    return [
        "--tokenizer",
        str(tokenizer_dir),
        "--output_dir",
        str(output_dir),
        "--image_size",
        str(IMAGE_SIZE),
        "--max_train_samples",
        "60",
        "--max_train_steps",
        "3",
        "--batch_size",
        "8",
        "--hidden_size",
        "32",
        "--num_layers",
        "1",
        "--num_attention_heads",
        "2",
        "--samples_per_class",
        "2",
        "--log_every",
        "1",
        "--vocabulary",
        "per-head",
        "--order",
        "head-major",
        "--top_k",
        "20",
        "--temperature",
        "0.9",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(tokenizer_dir, tmp_path_factory):
    AcceleratorState._reset_state(True)
    output_dir = tmp_path_factory.mktemp("ar")
    summary = train_ar.main(run_args(tokenizer_dir, output_dir))
    AcceleratorState._reset_state(True)
    return output_dir, summary


def test_summary_values(finished_run):
    _, summary = finished_run
    assert summary["steps"] == 3 and summary["images"] == 60
    assert summary["tokens_per_image"] == NUM_HEADS * 4 * 4 and summary["image_vocab_size"] == NUM_HEADS * NUM_CODES
    # A freshly initialised transformer predicts nearly uniformly over its 128 + BOI + 10 class ids.
    assert summary["first_loss"] == pytest.approx(math.log(NUM_HEADS * NUM_CODES + 1 + 10), abs=0.3)
    assert summary["validation_loss"] is not None and math.isfinite(summary["validation_loss"])


def test_stored_tokens_are_the_tokenizers(finished_run, tokenizer_dir):
    output_dir, _ = finished_run
    stored = datasets.load_from_disk(str(output_dir / "tokens" / "dataset"))
    assert len(stored) == 60 and sorted(stored.column_names) == ["input_ids", "label"]
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [PIL.Image.fromarray(np.round(d * (255 / 16)).astype(np.uint8), mode="L") for d in digits.images[:5]]
    tokenizer = OptVQModel.from_pretrained(tokenizer_dir).eval()
    pixel_values = OptVQImageProcessor(resolution=IMAGE_SIZE)(images)["pixel_values"]
    expected = tokenizer.tokenize(pixel_values, order="head-major", vocabulary="per-head")
    assert torch.equal(torch.tensor(stored[:5]["input_ids"]), expected)
    assert stored[:5]["label"] == digits.target[:5].tolist()
    meta = json.loads((output_dir / "tokens" / "token_meta.json").read_text())
    assert (meta["order"], meta["vocabulary"], meta["image_size"]) == ("head-major", "per-head", IMAGE_SIZE)


def test_samples_respect_the_layout_and_decode_to_the_grid(finished_run, tokenizer_dir):
    output_dir, _ = finished_run
    record = load_file(output_dir / "samples.safetensors")
    ids, labels = record["token_ids"], record["labels"]
    assert ids.shape == (20, 32) and labels.tolist() == [c for c in range(10) for _ in range(2)]
    layout = TokenLayout(NUM_CODES, NUM_HEADS, (4, 4), order="head-major", vocabulary="per-head")
    assert torch.equal(ids // NUM_CODES, layout.head_of_slot().expand_as(ids))  # each id in its head's range
    assert ids.unique().numel() > 10  # sampled, not one repeated id

    tokenizer = OptVQModel.from_pretrained(tokenizer_dir).eval()
    with torch.no_grad():
        images = tokenizer.detokenize(ids, order="head-major", vocabulary="per-head", latent_shape=(4, 4))
    uint8 = OptVQImageProcessor().postprocess(images, output_type="np")
    expected = train_ar.image_grid(uint8, columns=2, scale=2)
    saved = PIL.Image.open(output_dir / "samples.png")
    assert saved.size == ((2 * 9 + 1) * 2, (10 * 9 + 1) * 2)  # 10 rows of 2 samples of 8x8, 1-pixel gaps, x2
    assert np.array_equal(np.asarray(saved), np.asarray(expected))
    assert (output_dir / "reference.png").is_file()


def test_generator_is_saved_with_its_layout(finished_run):
    output_dir, _ = finished_run
    generator = LlamaForCausalLM.from_pretrained(output_dir / "generator")
    layout = json.loads((output_dir / "generator" / "token_layout.json").read_text())
    # image ids, BOI, 10 classes and the null class of classifier-free guidance
    assert generator.config.vocab_size == 128 + 1 + 10 + 1 and generator.config.num_hidden_layers == 1
    assert (layout["boi_id"], layout["class_offset"], layout["prefix_length"], layout["null_class_id"]) == (
        128,
        129,
        2,
        139,
    )
    assert layout["class_names"] == [str(d) for d in range(10)] and layout["latent_shape"] == [4, 4]


def test_a_second_run_reuses_the_tokens(finished_run, tokenizer_dir, tmp_path, monkeypatch):
    output_dir, _ = finished_run

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cached tokens should have been reused")

    monkeypatch.setattr(OptVQModel, "tokenize", no_tokenizing)
    token_cache = ["--token_cache_dir", str(output_dir / "tokens")]
    args = run_args(tokenizer_dir, tmp_path, *token_cache, "--max_train_steps", "1", "--samples_per_class", "1")
    summary = train_ar.main(args)
    assert summary["steps"] == 1 and summary["images"] == 60
    assert load_file(tmp_path / "samples.safetensors")["token_ids"].shape == (10, 32)
    # Another layout is another cache key: that run must tokenize (and here fails loudly).
    with pytest.raises(AssertionError, match="cached tokens should have been reused"):
        AcceleratorState._reset_state(True)
        train_ar.main(run_args(tokenizer_dir, tmp_path, *token_cache, "--order", "position-major"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "0"], "--temperature must be positive"),
        (["--hidden_size", "30", "--num_attention_heads", "4"], "divisible by --num_attention_heads"),
        (["--validation_fraction", "1.0"], r"--validation_fraction must be in \[0, 1\)"),
        (["--dataset_name", "x", "--data_dir", "y"], "at most one of --dataset_name and --data_dir"),
        (["--top_k", "-1"], "--top_k must be >= 0"),
        (["--top_p", "0"], r"--top_p must be in \(0, 1\]"),
        (["--token_dataset", "tok", "--dataset_name", "x"], "--token_dataset replaces --dataset_name"),
    ],
)
def test_bad_flags_raise(extra, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train_ar.parse_args(["--tokenizer", "t", "--output_dir", str(tmp_path), *extra])


def test_the_demo_config_file_sets_the_flags_and_the_command_line_wins(tmp_path):
    config = EXAMPLE.parent / "configs" / "ar_tiny.yaml"
    args = train_ar.parse_args(["--config", str(config), "--tokenizer", "t", "--max_train_steps", "7"])
    assert (args.image_size, args.num_layers, args.temperature, args.eval_every) == (16, 3, 0.8, 100)
    assert args.max_train_steps == 7 and args.output_dir == "outputs/ar-digits"
    (tmp_path / "bad.yaml").write_text("tokenizer: t\nnum_layer: 2\n")
    with pytest.raises(ValueError, match=r"unknown field 'num_layer'.*num_layers"):
        train_ar.parse_args(["--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "good.yaml").write_text("tokenizer: from-the-file\n")
    assert train_ar.parse_args(["--config", str(tmp_path / "good.yaml")]).tokenizer == "from-the-file"
    with pytest.raises(ValueError, match="--tokenizer is required"):
        train_ar.parse_args([])
    assert train_ar.parse_args(["--tokenizer", "t", "--no_class_conditional"]).class_conditional is False


def test_cfg_loop_with_scale_one_matches_generate_and_guidance_uses_the_null_class():
    torch.manual_seed(0)
    layout = TokenLayout(8, 2, (2, 2), order="position-major", vocabulary="per-head")
    fmt = train_ar.SequenceFormat(layout, num_classes=3)
    assert fmt.vocab_size == 16 + 1 + 3 + 1 and fmt.null_class == 3
    args = train_ar.parse_args(["--tokenizer", "t", "--hidden_size", "32", "--num_layers", "1"])
    args.num_attention_heads, args.top_k, args.temperature = 2, 1, 1.0  # top-1: deterministic tokens
    model = LlamaForCausalLM(train_ar.transformer_config(args, fmt)).eval()
    labels = torch.tensor([0, 2, 1])
    greedy = train_ar.sample_tokens(model, fmt, labels, 3, args)  # cfg_scale 1: generate
    args.cfg_scale = 1.0
    assert torch.equal(train_ar.sample_tokens_cfg(model, fmt, labels, args), greedy)
    # the first token under guidance: argmax of uncond + s (cond - uncond) within the first place's ids
    args.cfg_scale = 3.0
    guided = train_ar.sample_tokens(model, fmt, labels, 3, args)
    low, high = layout.id_bounds()
    assert ((guided >= low) & (guided < high)).all()
    with torch.no_grad():
        cond = model(input_ids=fmt.prompts(labels, 3)).logits[:, -1]
        uncond = model(input_ids=fmt.prompts(torch.full_like(labels, 3), 3)).logits[:, -1]
    mixed = (uncond + 3.0 * (cond - uncond))[:, int(low[0]) : int(high[0])]
    assert torch.equal(guided[:, 0], mixed.argmax(-1) + int(low[0]))
    # class dropout: with p ~ 1 every class token is the null class's
    sequence, _ = fmt.sequences(torch.zeros(4, 8, dtype=torch.long), torch.tensor([0, 1, 2, 0]), class_dropout=0.999)
    assert (sequence[:, 0] == fmt.class_offset + fmt.null_class).all()


def test_token_dataset_trains_from_pretokenized_rows(tokenizer_dir, tmp_path, monkeypatch):
    """--token_dataset reads `load_token_dataset`'s rows (tokens, label, index, variant) and never tokenizes; the
    reader is stood in by a module in sys.modules (its on-disk format belongs to optvq_hf.training.token_data)."""
    import sys
    import types
    from dataclasses import dataclass

    layout = TokenLayout(NUM_CODES, NUM_HEADS, (4, 4), order="head-major", vocabulary="per-head")
    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(0, NUM_CODES, (40, NUM_HEADS, 4, 4), generator=generator)
    rows = datasets.Dataset.from_dict(
        {
            "tokens": layout.to_tokens(indices).tolist(),
            "label": [i % 10 for i in range(40)],
            "index": list(range(40)),
            "variant": [0] * 40,
        }
    )

    @dataclass
    class FakeTokenDataset:
        dataset: datasets.Dataset
        layout: TokenLayout
        metadata: dict
        num_classes: int

    calls = []
    module = types.ModuleType("optvq_hf.training.token_data")
    module.load_token_dataset = lambda path, split=None: (
        calls.append((path, split)) or FakeTokenDataset(rows, layout, {}, 10)
    )
    monkeypatch.setitem(sys.modules, "optvq_hf.training.token_data", module)
    monkeypatch.setattr(OptVQModel, "tokenize", lambda *a, **k: pytest.fail("--token_dataset must not tokenize"))
    args = run_args(tokenizer_dir, tmp_path, "--token_dataset", "some/tokens", "--max_train_steps", "2")
    summary = train_ar.main(args)
    assert calls == [("some/tokens", "train")]
    assert summary["images"] == 40 and summary["tokens_per_image"] == 32 and summary["steps"] == 2
    sampled = load_file(tmp_path / "samples.safetensors")
    assert sampled["token_ids"].shape == (20, 32)
    low, high = layout.id_bounds()
    assert ((sampled["token_ids"] >= low) & (sampled["token_ids"] < high)).all()
    # a tokenizer with other heads cannot decode these tokens: a clear error
    other = layout.__class__(NUM_CODES, 4, (4, 4), order="head-major", vocabulary="per-head")
    module.load_token_dataset = lambda path, split=None: FakeTokenDataset(rows, other, {}, 10)
    AcceleratorState._reset_state(True)
    with pytest.raises(ValueError, match="pass the tokenizer that made the tokens"):
        train_ar.main(args)


@pytest.mark.slow
def test_token_dataset_written_by_tokenize_dataset_trains_the_generator(tokenizer_dir, tmp_path):
    """The real round trip: examples/tokenize_dataset.py writes the tokens of an imagefolder of digits with class
    subfolders, and train_ar.py --token_dataset trains on exactly those rows without tokenizing again."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(30):
        folder = tmp_path / "images" / str(int(digits.target[i]))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
        PIL.Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    tokenize_dataset = load_example("tokenize_dataset")
    # fmt: skip below: flags and their values on shared lines read better than one item per line.
    written = tokenize_dataset.main(
        ["--tokenizer", str(tokenizer_dir), "--train_data_dir", str(tmp_path / "images"), "--label_column", "label",
         "--order", "head-major", "--vocabulary", "per-head", "--output_dir", str(tmp_path / "tokens"),
         "--dataloader_num_workers", "0", "--mixed_precision", "no"]
    )  # fmt: skip
    assert len(written.dataset) == 30
    AcceleratorState._reset_state(True)
    args = run_args(tokenizer_dir, tmp_path / "ar", "--token_dataset", str(tmp_path / "tokens"))
    summary = train_ar.main(args)
    # The tokens are at the tokenizer processor's resolution, whatever --image_size says: the dataset's layout rules.
    assert summary["images"] == 30 and summary["tokens_per_image"] == written.layout.sequence_length
    assert written.layout.sequence_length == len(written.dataset[0]["tokens"])
