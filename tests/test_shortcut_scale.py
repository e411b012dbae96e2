"""The shortcut scale ``c``: every shortcut term times ``c``; ``c = 0`` is a plain LoRA that
merges exactly; saved, restored, and changed without recompiling."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from reslora_diffusers import (
    ResLoRAConfig,
    add_reslora,
    load_reslora_checkpoint,
    merge_to_lora,
    save_reslora_checkpoint,
    set_shortcut_scale,
    shortcut_scale,
)
from tests.reference import reference_output
from tests.toys import ResidualStack, ScaleStack, randomize_lora

SHORTCUT_TYPES = [("is", 1), ("bs", 2), ("ms", 2)]


def make(res_type, pre_num=1, model_cls=ResidualStack, seed=0):
    torch.manual_seed(seed)
    model = add_reslora(
        model_cls(),
        ResLoRAConfig(
            rank=3, alpha=6, res_type=res_type, pre_num=pre_num, target_modules=["proj"], record_norms=True
        ),
    )
    randomize_lora(model, seed)
    return model


def factors(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("res_type,pre_num", SHORTCUT_TYPES)
@pytest.mark.parametrize("c", [0.0, 0.3, 1.0])
def test_forward_matches_the_written_out_formula_at_every_scale(res_type, pre_num, c):
    model = make(res_type, pre_num)
    set_shortcut_scale(model, c)
    assert shortcut_scale(model) == pytest.approx(c, rel=1e-7)  # a float32 buffer
    x = torch.randn(5, 8)
    want = reference_output(model, x, res_type=res_type, pre_num=pre_num, s=2.0, c=c)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("res_type,pre_num", SHORTCUT_TYPES)
def test_scale_zero_is_plain_lora_in_outputs_and_gradients(res_type, pre_num):
    model = make(res_type, pre_num)
    plain = make("none")
    with torch.no_grad():  # the same A and B in both
        for (name, p), (other, q) in zip(factors(model).items(), factors(plain).items(), strict=True):
            assert name == other
            q.copy_(p)
    set_shortcut_scale(model, 0.0)
    x = torch.randn(6, 8)
    model(x).square().sum().backward()
    plain(x).square().sum().backward()
    # bs at c = 0 still multiplies stacked factors (with zero columns): equal up to round-off
    torch.testing.assert_close(model(x), plain(x), rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(factors(model).items(), factors(plain).values(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)
    # and at c = 1 the shortcut reaches the earlier blocks' factors: the gradients differ
    set_shortcut_scale(model, 1.0)
    model.zero_grad()
    model(x).square().sum().backward()
    assert not torch.allclose(
        factors(model)["layers.0.proj.lora_A"].grad, factors(plain)["layers.0.proj.lora_A"].grad
    )


@pytest.mark.parametrize("res_type,pre_num", SHORTCUT_TYPES)
def test_scale_zero_merges_exactly_with_no_calibration(res_type, pre_num):
    model = make(res_type, pre_num)
    x = torch.randn(64, 8)
    model(x)  # trace
    set_shortcut_scale(model, 0.0)
    merged = merge_to_lora(model, "calibrated", eval_inputs=[x])  # no calibration batches needed
    assert merged.report.shortcuts_off
    assert merged.report.output_error < 1e-6
    assert set(merged.report.ranks.values()) == {3}  # bs: rank r, not (m+1) r
    # a scale just above 0 is a ResLoRA again: is/ms ask for calibration batches, bs stacks
    set_shortcut_scale(model, 1e-3)
    if res_type == "bs":
        assert max(merge_to_lora(model, "calibrated").report.ranks.values()) == 9
    else:
        with pytest.raises(ValueError, match="needs calibration batches"):
            merge_to_lora(model, "calibrated")


@pytest.mark.parametrize("res_type", ["is", "ms"])
def test_merges_see_the_scale(res_type):
    """x_{n-1} = x_n / 0.7 in ScaleStack: the calibrated merge is exact at any scale, and the
    paper's input merge for is uses alpha = c f_{n-1} / f_n."""
    model = make(res_type, 2, ScaleStack)
    set_shortcut_scale(model, 0.4)
    model.train()
    for _ in range(3):
        model(torch.randn(32, 8))
    x = torch.randn(64, 8)
    assert merge_to_lora(model, "calibrated", calibration=[x], eval_inputs=[x]).report.output_error < 1e-5
    if res_type == "is":
        merged = merge_to_lora(model, "input", eval_inputs=[x])
        assert merged.report.output_error < 1e-5
        assert merged.report.alphas["layers.2.proj"] == pytest.approx(0.4 / 0.7, rel=1e-5)


def test_scale_is_saved_restored_and_old_checkpoints_load_as_one(tmp_path):
    model = make("ms", 2)
    x = torch.randn(4, 8)
    model(x)
    set_shortcut_scale(model, 0.25)
    assert "layers.1.proj.shortcut_scale" in model.state_dict()
    path = save_reslora_checkpoint(model, tmp_path / "c.safetensors")
    fresh = copy.deepcopy(model)
    set_shortcut_scale(fresh, 1.0)
    load_reslora_checkpoint(fresh, path)
    assert shortcut_scale(fresh) == 0.25
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # a checkpoint written before the scale existed: every block loads at c = 1
    old = {k: v for k, v in load_file(path).items() if not k.endswith("shortcut_scale")}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    load_reslora_checkpoint(fresh, tmp_path / "old.safetensors")
    assert all(
        float(b.shortcut_scale) == 1.0 for n, b in fresh.named_modules() if hasattr(b, "shortcut_scale")
    )


def test_changing_the_scale_does_not_recompile():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = make("is")
    x = torch.randn(4, 8)
    model(x)  # trace the chains eagerly
    compiled = torch.compile(model, backend="eager")
    outs = {}
    for c in (1.0, 0.5, 0.0, 0.5):
        set_shortcut_scale(model, c)
        outs[c] = compiled(x)
        if c == 1.0:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs > 0
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation for a new value
    set_shortcut_scale(model, 0.5)
    torch.testing.assert_close(outs[0.5], model(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(outs[0.5], outs[1.0]) and not torch.allclose(outs[0.0], outs[0.5])


def test_bad_scale_is_refused():
    model = make("is")
    with pytest.raises(ValueError, match="finite number"):
        set_shortcut_scale(model, float("nan"))
