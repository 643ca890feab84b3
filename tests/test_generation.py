import math

import pytest
import torch

from optvq_hf.digits_metrics import (
    class_accuracy,
    digits_fd,
    feature_frechet_distance,
    load_digits_images,
    train_digits_classifier,
)
from optvq_hf.generation import (
    TokenGenerator,
    TokenGeneratorConfig,
    indices_to_steps,
    process_logits,
    sample_codes,
    steps_to_indices,
)


def tiny_generator(codes_per_step=4, num_steps=6, num_classes=3, seed=0):
    torch.manual_seed(seed)
    config = TokenGeneratorConfig(
        num_codes=8,
        codes_per_step=codes_per_step,
        num_steps=num_steps,
        num_classes=num_classes,
        hidden_size=32,
        num_layers=2,
        num_attention_heads=2,
    )
    return TokenGenerator(config).eval()


def test_cfg_scale_one_equals_plain_conditional_sampling():
    model = tiny_generator()
    labels = torch.tensor([0, 1, 2, 1])
    plain = sample_codes(model, labels, cfg_scale=None, generator=torch.Generator().manual_seed(3))
    guided = sample_codes(model, labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(3))
    assert plain.shape == (4, 6, 4)
    assert torch.equal(plain, guided)
    # a real guidance scale changes the distribution: over a few seeds some token differs
    other = [sample_codes(model, labels, cfg_scale=4.0, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    again = [sample_codes(model, labels, cfg_scale=None, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    assert any(not torch.equal(a, b) for a, b in zip(other, again))


def test_kv_cache_sampling_matches_teacher_forced_logits():
    """The logits of the cached step-by-step loop equal those of one full forward on the sampled codes."""
    model = tiny_generator()
    labels = torch.tensor([2, 0])
    codes = sample_codes(model, labels, cfg_scale=None, generator=torch.Generator().manual_seed(0))
    full = model(codes, labels).logits  # (B, S, H, V)
    # greedy sampling (top_k=1) from the full-forward logits must reproduce the same argmax codes
    greedy = sample_codes(model, labels, cfg_scale=None, top_k=1)
    assert torch.equal(greedy[:, 0], full[:, 0].argmax(-1))
    replay = model(greedy, labels).logits
    assert torch.equal(greedy, replay.argmax(-1))


def test_cfg_combination_formula():
    """With top_k=1, guided sampling picks argmax(uncond + s * (cond - uncond)) at the first step."""
    model = tiny_generator()
    labels = torch.tensor([1])
    scale = 2.5
    codes = sample_codes(model, labels, cfg_scale=scale, top_k=1)
    with torch.no_grad():
        dummy = torch.zeros(2, 6, 4, dtype=torch.long)
        logits = model(dummy, torch.tensor([1, model.null_class])).logits[:, 0]
    expected = (logits[1] + scale * (logits[0] - logits[1])).argmax(-1)
    assert torch.equal(codes[0, 0], expected)


def test_process_logits_top_k_top_p_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top2 = process_logits(logits, 1.0, 2, 1.0)
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    nucleus = torch.softmax(process_logits(logits, 1.0, 0, 0.7), -1)  # 0.5 + 0.3 >= 0.7: two ids kept
    torch.testing.assert_close(nucleus, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    hot = process_logits(logits, 2.0, 0, 1.0)
    torch.testing.assert_close(hot, logits / 2)
    with pytest.raises(ValueError, match="temperature"):
        process_logits(logits, 0.0, 0, 1.0)


def test_loss_in_nats_per_position_and_class_dropout():
    model = tiny_generator(codes_per_step=4)
    codes = torch.randint(0, 8, (5, 6, 4))
    out = model(codes, torch.tensor([0, 1, 2, 0, 1]))
    manual = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 8), codes.reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    torch.testing.assert_close(out.nats_per_position, 4 * manual)
    flat = TokenGenerator(TokenGeneratorConfig(num_codes=8, codes_per_step=1, num_steps=24, heads_per_position=4))
    assert flat.config.heads_per_position == 4
    flat_out = flat(indices_to_steps(steps_to_indices(codes, 4, (2, 3)), 1), None)
    torch.testing.assert_close(flat_out.nats_per_position, 4 * flat_out.loss)
    # an untrained model is close to uniform: ~log(8) nats per index
    assert abs(float(out.loss.detach()) - math.log(8)) < 0.2
    # class dropout acts only in training: with p ~ 1 the labels become the null class (the decoder has no dropout)
    model.config.class_dropout = 0.999
    labels = torch.tensor([0, 1, 2, 0, 1])
    null = torch.full((5,), model.null_class)
    torch.manual_seed(0)
    dropped = model.train()(codes, labels).logits
    model.eval()
    torch.testing.assert_close(dropped, model(codes, null).logits)
    assert not torch.allclose(model(codes, labels).logits, dropped)


def test_indices_steps_round_trip():
    indices = torch.arange(2 * 4 * 2 * 3).view(2, 4, 2, 3)
    by_position = indices_to_steps(indices, 4)
    assert by_position.shape == (2, 6, 4)
    assert by_position[0, 1].tolist() == [1, 7, 13, 19]  # position (0, 1): head j at j * 6 + 1
    flat = indices_to_steps(indices, 1)
    assert flat[0, :5, 0].tolist() == [0, 6, 12, 18, 1]
    assert torch.equal(steps_to_indices(by_position, 4, (2, 3)), indices)
    assert torch.equal(steps_to_indices(flat, 4, (2, 3)), indices)
    with pytest.raises(ValueError, match="codes_per_step"):
        indices_to_steps(indices, 2)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_generator()
    model.save_pretrained(tmp_path)
    loaded = TokenGenerator.from_pretrained(tmp_path).eval()
    assert loaded.config.codes_per_step == 4 and loaded.config.num_steps == 6
    labels = torch.tensor([0, 2])
    a = sample_codes(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
    b = sample_codes(loaded, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_config_errors():
    with pytest.raises(ValueError, match="class_dropout"):
        TokenGeneratorConfig(class_dropout=1.0)
    with pytest.raises(ValueError, match="num_codes"):
        TokenGeneratorConfig(num_codes=0)
    with pytest.raises(ValueError, match="codes must be"):
        tiny_generator()(torch.zeros(1, 5, 4, dtype=torch.long))


def test_frechet_distance_known_cases():
    torch.manual_seed(0)
    features = torch.randn(200, 3)
    assert feature_frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    # a shift by d in every coordinate adds 3 d^2 (same covariance)
    assert feature_frechet_distance(features, features + 2.0) == pytest.approx(12.0, abs=1e-6)
    # scaling by 2: tr(S) + tr(4S) - 2 tr(2S) = tr(S)
    cov_trace = float(torch.cov(features.T).trace())
    assert feature_frechet_distance(features, 2 * features) == pytest.approx(
        cov_trace + float((features.mean(0) ** 2).sum()), rel=1e-6
    )
    with pytest.raises(ValueError, match="feature sets"):
        feature_frechet_distance(features, torch.randn(10, 4))


def test_digits_classifier_reads_real_digits():
    images, labels = load_digits_images(16)
    assert images.shape == (1797, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    test, train = order[:300], order[300:]
    model = train_digits_classifier(images[train], labels[train], steps=150)
    assert class_accuracy(model, images[test], labels[test]) > 0.85
    # wrong labels: accuracy near chance
    assert class_accuracy(model, images[test], (labels[test] + 1) % 10) < 0.1
    real = digits_fd(model, images[train[:300]], images[test])
    noise = digits_fd(model, torch.rand(300, 1, 16, 16) * 2 - 1, images[test])
    assert digits_fd(model, images[test], images[test]) == pytest.approx(0.0, abs=1e-6)
    assert noise > 5 * real
