"""torch.compile of ResLoRA models: one graph, no graph break, no recompilation, eager's numbers.

The counting tests use dynamo's ``aot_eager`` backend: it runs dynamo (guards, graph breaks,
recompiles) and AOT autograd exactly as ``inductor`` does, without inductor's C++ code
generation, so they take seconds. One test compiles with inductor itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from reslora_diffusers import (
    ResLoRAConfig,
    add_reslora,
    load_reslora_checkpoint,
    merge_to_lora,
    save_reslora_checkpoint,
)
from reslora_diffusers.core import trainable_parameters
from reslora_diffusers.merge.error import output_tensor
from reslora_diffusers.training.speed import compile_model, fused_adam_supported, make_adamw
from tests.toys import ResidualStack

CASES = [(t, m) for t in ("none", "is", "bs", "ms") for m in (1, 5)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(res_type: str, pre_num: int, n_layers: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ResidualStack(d=8, n_layers=n_layers)
    config = ResLoRAConfig(rank=4, res_type=res_type, pre_num=pre_num, target_modules=["proj"])
    add_reslora(model, config)
    with torch.no_grad():  # non-zero B, so every shortcut term shows in the loss from step 1
        for p in trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape))
    return model


def _batches(steps: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)) for _ in range(steps)]


def _train(forward, params, batches) -> list[float]:
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step, (x, y) in enumerate(batches):
        if step == 1:  # every pass after the first must reuse the first one's graph
            stance = torch.compiler.set_stance("fail_on_recompile")
            stance.__enter__()
        loss = torch.nn.functional.mse_loss(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if len(batches) > 1:
        stance.__exit__(None, None, None)
    return losses


@pytest.mark.parametrize("res_type,pre_num", CASES)
def test_compiled_training_is_one_graph_without_breaks_or_recompiles_and_equals_eager(res_type, pre_num):
    eager = _model(res_type, pre_num)
    model = _model(res_type, pre_num)
    batches = _batches()
    compiled = compile_model(model, backend="aot_eager", inputs={"x": batches[0][0]})

    expected = _train(eager, trainable_parameters(eager), batches)
    got = _train(compiled, trainable_parameters(model), batches)

    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["aot_autograd"]["total"] == 1  # one forward/backward graph pair
    assert got == pytest.approx(expected, rel=1e-5)
    # the compiled module trains the same parameters: the weights after 5 steps agree too
    for a, b in zip(trainable_parameters(eager), trainable_parameters(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiling_before_the_tracing_pass_is_what_compile_model_avoids():
    """torch.compile straight after add_reslora traces the chain tracing: a graph break (the
    structure log) and a second graph once the chains freeze. compile_model has neither."""
    model = _model("ms", 2)
    compiled = torch.compile(model, backend="aot_eager")
    for x, _ in _batches(3):
        compiled(x).sum().backward()
    assert sum(counters["graph_break"].values()) > 0
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.slow
def test_merge_export_and_calibration_on_the_model_that_was_compiled(tmp_path):
    """Training goes through the compiled wrapper; merges, calibration and checkpoints take the
    uncompiled module (the wrapper's parameters are its own) and give what eager training gives."""
    eager, model = _model("ms", 2), _model("ms", 2)
    batches = _batches()
    compiled = compile_model(model, backend="aot_eager", inputs={"x": batches[0][0]})
    _train(eager, trainable_parameters(eager), batches)
    _train(compiled, trainable_parameters(model), batches)

    calibration = [{"x": x} for x, _ in _batches(4)]
    held_out = [{"x": torch.randn(16, 8)}]
    kwargs = {"merge": "calibrated", "calibration": calibration, "eval_inputs": held_out}
    want, got = merge_to_lora(eager, **kwargs), merge_to_lora(model, **kwargs)
    assert set(got) == set(want) and all(not k.startswith("_orig_mod") for k in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)
    assert got.report.output_error == pytest.approx(want.report.output_error, rel=1e-3, abs=1e-7)

    save_reslora_checkpoint(model, tmp_path / "ckpt.safetensors")
    restored = _model("ms", 2)
    load_reslora_checkpoint(restored, tmp_path / "ckpt.safetensors")
    x = held_out[0]["x"]
    model.train(), restored.train()
    torch.testing.assert_close(output_tensor(restored(x)), output_tensor(compiled(x)), rtol=1e-5, atol=1e-6)


def test_inductor_compile_of_a_small_toy_matches_eager():
    """The real backend (C++ code generation on CPU) on the smallest toy, one type."""
    eager, model = _model("bs", 2, n_layers=3), _model("bs", 2, n_layers=3)
    batches = _batches(3)
    compiled = compile_model(model, inputs={"x": batches[0][0]})
    expected = _train(eager, trainable_parameters(eager), batches)
    got = _train(compiled, trainable_parameters(model), batches)
    assert got == pytest.approx(expected, rel=1e-5)
    assert dict(counters["graph_break"]) == {}


def test_fused_adamw_only_by_default_on_cuda():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert not fused_adam_supported(torch.device("cpu"))
    assert fused_adam_supported(torch.device("cuda"))
    cpu = make_adamw(params, None, torch.device("cpu"), lr=1e-3)
    assert not cpu.defaults["fused"]
    assert make_adamw(params, True, torch.device("cpu"), lr=1e-3).defaults["fused"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_on_cuda_is_the_default_and_steps_like_the_unfused_one():
    ref = [torch.nn.Parameter(torch.randn(64, device="cuda"))]
    fused = [torch.nn.Parameter(ref[0].detach().clone())]
    opts = [make_adamw(ref, False, ref[0].device, lr=1e-2), make_adamw(fused, None, ref[0].device, lr=1e-2)]
    assert opts[1].defaults["fused"]
    for _ in range(3):
        for opt, p in zip(opts, (ref, fused)):
            p[0].grad = torch.ones_like(p[0]) * p[0].detach().sin()
            opt.step()
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-6)


def test_compile_mode_is_checked():
    with pytest.raises(ValueError, match="compile mode 'fast'"):
        compile_model(copy.deepcopy(ResidualStack()), mode="fast")


def _bf16_base(model: torch.nn.Module) -> torch.nn.Module:
    """The frozen base in bfloat16, the adapters in float32 (as the training script keeps them)."""
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    return model


def test_under_autocast_the_activation_is_not_cast_up_and_back_down():
    """A bf16 base under autocast: ``A x`` is one bf16 product of the bf16 activation (autocast
    casts A); without autocast it is a float32 product of the activation cast up."""
    block = _bf16_base(_model("none", 1)).layers[0].proj
    x = torch.randn(4, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ax = block.apply_a(x, block.lora_A)
    assert ax.dtype == torch.bfloat16
    torch.testing.assert_close(ax, x @ block.lora_A.detach().to(torch.bfloat16).T)
    plain = block.apply_a(x, block.lora_A)
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain, x.float() @ block.lora_A.detach().T)


@pytest.mark.parametrize("res_type", ["bs", "ms"])
def test_compiled_bf16_autocast_training_is_one_graph_and_matches_eager(res_type):
    eager, model = _bf16_base(_model(res_type, 5)), _bf16_base(_model(res_type, 5))
    batches = _batches()
    compiled = compile_model(model, backend="aot_eager", inputs={"x": batches[0][0].bfloat16()})

    def under_autocast(forward):
        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return forward(x).float()

        return run

    expected = _train(under_autocast(eager), trainable_parameters(eager), batches)
    got = _train(under_autocast(compiled), trainable_parameters(model), batches)
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    assert {p.dtype for p in trainable_parameters(model)} == {torch.float32}
    assert got == pytest.approx(expected, rel=1e-2)
