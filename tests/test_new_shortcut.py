"""A fifth shortcut type, defined here, registered, trained, merged and exported with no
change to the package: the shortcut contract is the whole interface. The training script
takes it from this module as a plugin (``--shortcut_module tests.test_new_shortcut``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from reslora_diffusers import (
    ResLoRAConfig,
    add_reslora,
    load_reslora_checkpoint,
    merge_to_lora,
    res_types,
    save_reslora_checkpoint,
    trainable_parameters,
)
from reslora_diffusers.core.shortcuts import (
    ActivationShortcut,
    CalibrationTerm,
    check_cached,
    register_shortcut,
)
from reslora_diffusers.export import export_peft_adapter
from reslora_diffusers.merge import merged_view
from reslora_diffusers.training.run_folder import RunFolder
from tests.runs import ROOT, run, script
from tests.toys import ResidualStack, ScaleStack, randomize_lora

HALF = 0.5


@register_shortcut
class LaggedInputShortcut(ActivationShortcut):
    """``ls``: ``h_n = W_n x_n + s B_n A_n (x_n + 0.5 sum_{k=1..m} x_{n-k})``."""

    name = "ls"
    stat = "x"
    caches = ("x",)
    uses_pre_num = True

    @property
    def max_preds(self):
        return self.pre_num

    def link_ok(self, step, block, x):
        prev = step.chain.cached("x", step.pos - 1)
        return prev is not None and prev.shape == x.shape

    def mid(self, block, step, x, ax):
        for pred, pos in zip(step.pred_blocks, step.preds):
            x_prev = check_cached(block, pred, step.chain.cached("x", pos), x)
            ax = ax + HALF * block.apply_a(block.dropout(x_prev), block.lora_A)
        return ax

    def calibration_terms(self, block, step):
        return [CalibrationTerm(block, step.chain.cached("x", p), HALF) for p in step.preds]

    def input_alpha(self, block, preds, ctx):
        return HALF * sum(ctx.window_mean(p) for p in preds) / ctx.window_mean(block)

    def weight_alpha(self, block, preds, ctx):
        return HALF * sum(ctx.weight_ratio(block, k) for k in range(1, len(preds) + 1))


def make(model_cls=ResidualStack, seed=0):
    torch.manual_seed(seed)
    model = add_reslora(
        model_cls(),
        ResLoRAConfig(rank=3, alpha=6, res_type="ls", pre_num=2, target_modules=["proj"], record_norms=True),
    )
    randomize_lora(model, seed)
    return model


def written_out(model, x, m=2, s=2.0):
    xs, h = [], x
    for n, layer in enumerate(model.layers):
        b = layer.proj
        xs.append(h)
        inp = h + HALF * sum(xs[n - k] for k in range(1, min(m, n) + 1))
        term = F.linear(F.linear(inp, b.lora_A), b.lora_B)
        h = h + torch.tanh(b.base_layer(h) + s * term)
    return h


def test_registered_type_is_a_res_type():
    assert "ls" in res_types()
    assert ResLoRAConfig(res_type="ls").res_type == "ls"
    with pytest.raises(ValueError, match="registered already"):
        register_shortcut(type("Other", (LaggedInputShortcut,), {}))


def test_forward_matches_written_out_formula_and_gradients_reach_earlier_blocks():
    model = make()
    x = torch.randn(5, 8)
    for _ in range(2):
        torch.testing.assert_close(model(x), written_out(model, x), rtol=1e-5, atol=1e-6)
    model(x).square().sum().backward()
    # every block's factors train, including through the shortcut terms
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable_parameters(model))


class _CheckpointedStack(ResidualStack):
    """``ResidualStack`` with each layer a non-reentrant checkpointed region."""

    gradient_checkpointing = True

    def forward(self, x):
        for layer in self.layers:
            x = torch.utils.checkpoint.checkpoint(
                lambda h, layer=layer: h + torch.tanh(layer.proj(h)), x, use_reentrant=False
            )
        return x


def test_gradient_checkpointing_needs_nothing_of_the_type():
    """A pass under checkpointing keeps the type's ``caches`` for the recomputation (all of them,
    as the type names no ``kept_caches``): the same gradients as without."""
    plain, checked = make(), make(_CheckpointedStack)
    x = torch.randn(5, 8)
    for _ in range(2):
        grads = []
        for model in (plain, checked):
            model.zero_grad(set_to_none=True)
            model.train()(x).square().sum().backward()
            grads.append([p.grad for p in trainable_parameters(model)])
        for want, got in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_train_merge_checkpoint_and_export(tmp_path):
    from peft import PeftModel

    model = make()
    opt = torch.optim.Adam(trainable_parameters(model), lr=1e-2)
    target = torch.randn(64, 8)
    data = torch.randn(64, 8)
    losses = []
    for _ in range(30):
        loss = (model(data) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    calib = [torch.randn(32, 8) for _ in range(4)]
    held = [torch.randn(16, 8)]
    errors = {
        m: merge_to_lora(model, m, calibration=calib, eval_inputs=held).report.output_error
        for m in ("input", "weight", "calibrated")
    }
    # an approximation on this nonlinear stack, and the calibrated fit the best of the three
    assert 0 < errors["calibrated"] < min(errors["input"], errors["weight"])

    path = save_reslora_checkpoint(model, tmp_path / "ls.safetensors")
    torch.manual_seed(0)
    fresh = load_reslora_checkpoint(ResidualStack(), path)
    torch.testing.assert_close(fresh.eval()(held[0]), model.eval()(held[0]))

    merged = export_peft_adapter(model, tmp_path / "adapter", calibration=calib, eval_inputs=held)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(ResidualStack(), str(tmp_path / "adapter")).eval()
    with torch.no_grad(), merged_view(model.eval(), merged):
        torch.testing.assert_close(loaded(held[0]), model(held[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["calibrated", "sequential", "input"])
def test_merges_exact_when_inputs_scale_exactly(method):
    model = make(ScaleStack)
    model.train()
    model(torch.randn(32, 8))
    merged = merge_to_lora(model, method, calibration=[torch.randn(32, 8)], eval_inputs=[torch.randn(8, 8)])
    assert merged.report.output_error < 1e-5


# -- the training script, with the type from a plugin module ---------------------------------
def _parse_in_a_fresh_process(*argv: str) -> subprocess.CompletedProcess:
    """The script's command line parsed by a process that has imported nothing of this file."""
    code = "import sys, train_text_to_image as t; print(t.parse_args(sys.argv[1:]).res_type)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_the_training_script_takes_a_type_its_shortcut_module_registers():
    refused = _parse_in_a_fresh_process("--res_type", "ls")
    assert refused.returncode == 2 and "invalid choice: 'ls'" in refused.stderr
    taken = _parse_in_a_fresh_process("--shortcut_module", "tests.test_new_shortcut", "--res_type", "ls")
    assert taken.returncode == 0 and taken.stdout.split()[-1] == "ls", taken.stderr


def test_a_shortcut_module_that_does_not_import_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        script.parse_args(["--shortcut_module", "no_such_plugin", "--res_type", "ls"])
    assert info.value.code == 2
    assert "--shortcut_module no_such_plugin: cannot import it (No module named 'no_such_plugin')" in (
        capsys.readouterr().err
    )


@pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")
def test_the_training_script_trains_merges_and_exports_the_plugin_type(base, data, tmp_path):
    summary = run(
        base,
        data,
        tmp_path / "run",
        *("--shortcut_module", "tests.test_new_shortcut", "--res_type", "ls", "--pre_num", "2"),
        *("--max_train_steps", "2", "--calibration_batches", "1", "--shortcut_schedule", "constant"),
    )
    folder = RunFolder(tmp_path / "run")
    assert folder.has_lora() and folder.merge_report()["res_type"] == "ls"
    assert summary["merge_error"]["unet"] > 0  # ls merges approximately: calibrated, as is/ms
    assert folder.label() == "ResLoRA ls m=2 (run)"
