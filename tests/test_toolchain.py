"""The model with the rest of the PyTorch / Hugging Face toolchain: torch.export, torch.compile(fullgraph=True),
accelerate offload, gradient checkpointing, dtypes on every construction path, configs from other versions."""

import json
import warnings

import pytest
import torch
from conftest import tiny_config_kwargs
from transformers import AutoModel

from optvq_hf import OptVQConfig, OptVQModel
from optvq_hf.quantization import checks_tensor_values


class Entry(torch.nn.Module):
    """One public method of the model as a module's forward (what torch.export and torch.compile take)."""

    def __init__(self, model: OptVQModel, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, inputs: torch.Tensor):
        model = self.model
        if self.method == "forward":
            output = model(inputs)
            return output.reconstruction, output.indices, output.quantizer_loss
        if self.method == "encode":
            output = model.encode(inputs)
            return output.latents, output.quantized, output.indices, output.quantizer_loss
        if self.method == "decode":
            return model.decode(inputs).sample
        if self.method == "decode_indices":
            return model.decode_indices(inputs).sample
        if self.method == "tokenize":
            return model.tokenize(inputs)
        return model.detokenize(inputs)


METHODS = ("forward", "encode", "decode", "decode_indices", "tokenize", "detokenize")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return OptVQModel(OptVQConfig(**tiny_config_kwargs())).eval()


def method_inputs(model: OptVQModel, method: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    config = model.config
    if method in ("forward", "encode", "tokenize"):
        return torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    if method == "decode":
        return torch.randn(2, config.embed_dim, 16, 16, generator=generator)
    if method == "decode_indices":
        return torch.randint(0, config.num_codes, (2, config.num_heads, 16, 16), generator=generator)
    return torch.randint(0, config.num_codes, (2, model.tokens_per_image), generator=generator)


def assert_same_outputs(actual, expected, atol: float = 0.0):
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        if e.is_floating_point():
            torch.testing.assert_close(a, e, atol=atol, rtol=0)
        else:
            assert torch.equal(a, e)


# ---------------------------------------------------------------------------------------------------------------------
# torch.export / torch.compile / torch.jit.trace
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_export_matches_eager(tiny_model, method):
    entry = Entry(tiny_model, method)
    inputs = method_inputs(tiny_model, method)
    with torch.no_grad():
        expected = entry(inputs)
        exported = torch.export.export(entry, (inputs,))
        assert_same_outputs(exported.module()(inputs), expected)
    # No host synchronisation was captured: the graph holds no data-dependent scalar reads.
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert not any("_local_scalar_dense" in target or "_assert_async" in target for target in targets), targets


@pytest.mark.parametrize("method", METHODS)
def test_compile_fullgraph_matches_eager(tiny_model, method):
    # The "eager" backend runs dynamo's capture (which raises on any graph break with fullgraph=True) without
    # inductor's code generation, so the test stays fast; the kernels themselves are PyTorch's.
    torch._dynamo.reset()
    entry = Entry(tiny_model, method)
    inputs = method_inputs(tiny_model, method)
    with torch.no_grad():
        expected = entry(inputs)
        compiled = torch.compile(entry, fullgraph=True, backend="eager")
        assert_same_outputs(compiled(inputs), expected)


@pytest.mark.slow
def test_compile_inductor_matches_eager(tiny_model):
    torch._dynamo.reset()
    entry = Entry(tiny_model, "forward")
    inputs = method_inputs(tiny_model, "forward")
    with torch.no_grad():
        expected = entry(inputs)
        actual = torch.compile(entry, fullgraph=True)(inputs)
    assert torch.equal(actual[1], expected[1])  # same codes
    torch.testing.assert_close(actual[0], expected[0], atol=1e-4, rtol=0)


def test_value_checks_run_in_eager_mode_only(tiny_model):
    assert checks_tensor_values()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tiny_model.encode(torch.full((1, 3, 32, 32), 2.0))
    with pytest.raises(ValueError, match="NaN"):
        tiny_model.encode(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tiny_model.decode_indices(torch.full((1, 4, 16, 16), 64))
    # Shape checks are free and stay under compile.
    torch._dynamo.reset()
    compiled = torch.compile(Entry(tiny_model, "encode"), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="channels"):
        compiled(torch.zeros(1, 4, 32, 32))


def test_compiled_training_step_matches_eager():
    # Training mode (Sinkhorn assignment): dynamo captures the step; the gradients are those of eager mode.
    torch.manual_seed(0)
    model = OptVQModel(OptVQConfig(**tiny_config_kwargs())).train()
    inputs = method_inputs(model, "forward")

    def loss_of(module):
        output = module(inputs)
        return (output.reconstruction - inputs).abs().mean() + output.quantizer_loss

    eager_loss = loss_of(model)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    compiled_loss = loss_of(compiled)
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-6, rtol=0)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-6, rtol=1e-5)


def test_compiled_training_solves_outside_the_graph(monkeypatch):
    # Under torch.compile in training mode the exp-domain solver runs eagerly (the only graph break) with the eager
    # indices; with solver_in_graph the log-domain solver is traced instead, and fullgraph=True captures the step.
    from optvq_hf import assignment

    torch.manual_seed(0)
    model = OptVQModel(OptVQConfig(**tiny_config_kwargs())).train()
    inputs = method_inputs(model, "forward")
    calls = []
    solve = assignment._exp_domain_indices
    monkeypatch.setattr(assignment, "_exp_domain_indices", lambda *args: calls.append(1) or solve(*args))
    expected = model(inputs).indices
    torch._dynamo.reset()
    reasons = [str(b.reason) for b in torch._dynamo.explain(model)(inputs).break_reasons]
    assert reasons and all("_sinkhorn_codes_eagerly" in reason for reason in reasons), reasons  # the only break
    calls.clear()
    assert torch.equal(torch.compile(model, backend="eager")(inputs).indices, expected)
    assert calls == [1]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="disable"):
        torch.compile(model, fullgraph=True, backend="eager")(inputs)
    model.quantizer.solver_in_graph = True
    torch._dynamo.reset()
    calls.clear()
    assert torch.equal(torch.compile(model, fullgraph=True, backend="eager")(inputs).indices, expected)
    assert calls == []


# ---------------------------------------------------------------------------------------------------------------------
# accelerate offload
# ---------------------------------------------------------------------------------------------------------------------
def test_device_map_auto_with_cpu_and_disk_offload_equals_plain_load(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "model")
    plain = OptVQModel.from_pretrained(tmp_path / "model").eval()
    size = sum(p.numel() * p.element_size() for p in plain.parameters())
    # Room in "cpu" for about half of the weights: the rest goes to the offload folder.
    offloaded = OptVQModel.from_pretrained(
        tmp_path / "model",
        device_map="auto",
        max_memory={"cpu": size // 2},
        offload_folder=str(tmp_path / "offload"),
    ).eval()
    placements = set(offloaded.hf_device_map.values())
    assert "disk" in placements and ({"cpu", 0} & placements or "cpu" in placements), offloaded.hf_device_map
    assert any(key.startswith("quantizer") and value == "disk" for key, value in offloaded.hf_device_map.items()) or (
        offloaded.hf_device_map.get("") == "disk"
    ), offloaded.hf_device_map
    pixel_values = method_inputs(plain, "forward")
    indices = method_inputs(plain, "decode_indices")
    with torch.no_grad():
        expected, actual = plain(pixel_values), offloaded(pixel_values)
        assert torch.equal(actual.indices, expected.indices)
        assert torch.equal(actual.reconstruction, expected.reconstruction)
        assert torch.equal(offloaded.decode_indices(indices).sample, plain.decode_indices(indices).sample)


# ---------------------------------------------------------------------------------------------------------------------
# gradient (activation) checkpointing
# ---------------------------------------------------------------------------------------------------------------------
def saved_activation_bytes(model: OptVQModel, inputs: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Bytes autograd keeps for the backward pass of one loss, and the parameter gradients."""
    saved = 0

    def pack(tensor):
        nonlocal saved
        if not isinstance(tensor, torch.nn.Parameter):
            saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(inputs)
        loss = (output.reconstruction - inputs).square().mean() + output.quantizer_loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return saved, grads


@pytest.mark.parametrize("backbone", ["diffusion", "simple_cnn"])
@pytest.mark.parametrize("method_name", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_gradient_checkpointing_changes_memory_not_gradients(backbone, method_name):
    torch.manual_seed(0)
    config = OptVQConfig(**tiny_config_kwargs(backbone=backbone))
    model = OptVQModel(config).train()
    inputs = method_inputs(model, "forward")
    plain_bytes, plain_grads = saved_activation_bytes(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is the deprecated name
        getattr(model, method_name)()
    assert model.is_activation_checkpointing
    checkpointed_bytes, checkpointed_grads = saved_activation_bytes(model, inputs)
    assert checkpointed_bytes < 0.7 * plain_bytes, (checkpointed_bytes, plain_bytes)
    for checkpointed, plain in zip(checkpointed_grads, plain_grads):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# dtypes and configs
# ---------------------------------------------------------------------------------------------------------------------
def quantizer_dtypes(model: OptVQModel) -> set[torch.dtype]:
    return {parameter.dtype for parameter in model.quantizer.parameters()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantizer_is_float32_on_every_construction_path(tmp_path, dtype):
    config = OptVQConfig(**tiny_config_kwargs())
    built = {
        "_from_config": OptVQModel._from_config(config, dtype=dtype),
        "AutoModel.from_config": AutoModel.from_config(config, dtype=dtype),
    }
    OptVQModel(config).save_pretrained(tmp_path)
    built["from_pretrained"] = OptVQModel.from_pretrained(tmp_path, dtype=dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        built["default dtype"] = OptVQModel(config)
    finally:
        torch.set_default_dtype(previous)
    for path, model in built.items():
        assert quantizer_dtypes(model) == {torch.float32}, path
        assert model.quant_conv.weight.dtype == dtype, path  # the rest of the model does take the dtype
    with torch.no_grad():  # and a half model runs, with float32 assignment inside the quantizer
        output = built["_from_config"].eval()(torch.zeros(1, 3, 32, 32, dtype=dtype))
    assert output.reconstruction.dtype == dtype and output.quantized.dtype == dtype


def test_config_from_a_newer_version_and_standard_kwargs_load_through_from_pretrained(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    written = json.loads(config_file.read_text())
    written["field_of_a_later_version"] = {"x": 1}
    config_file.write_text(json.dumps(written))
    model = OptVQModel.from_pretrained(tmp_path, attn_implementation="eager")
    assert model.config.field_of_a_later_version == {"x": 1}
    assert model.config._attn_implementation == "eager"
    auto = AutoModel.from_pretrained(tmp_path, attn_implementation="eager", output_hidden_states=False)
    assert type(auto) is OptVQModel
    for name, parameter in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], parameter), name
