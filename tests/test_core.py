"""The ResLoRA core against the formulas written out in tests/reference.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from reslora_diffusers import (
    ResLoRAConfig,
    add_reslora,
    chain_structure,
    compare_merges,
    load_reslora_checkpoint,
    merge_to_lora,
    remove_reslora,
    reslora_chains,
    save_reslora_checkpoint,
)
from reslora_diffusers.core import get_state
from reslora_diffusers.merge import calibrate, calibrate_sequential
from tests.reference import reference_output
from tests.toys import (
    Independent,
    Reordered,
    ResidualStack,
    ScaleStack,
    WidthStack,
    randomize_lora,
)

TYPES = ["none", "is", "bs", "ms"]


def make(model_cls=ResidualStack, seed=0, **cfg):
    torch.manual_seed(seed)
    model = model_cls()
    cfg.setdefault("record_norms", True)  # the input merge is tested throughout
    config = ResLoRAConfig(rank=3, alpha=6, target_modules=["proj"], **cfg)
    add_reslora(model, config)
    randomize_lora(model, seed)
    return model


def plain_fused_copy(model: nn.Module, merged: dict) -> nn.Module:
    """A plain model (no ResLoRA) whose weights are W + B'A' from a merged state dict."""
    plain = remove_reslora(copy.deepcopy(model))
    with torch.no_grad():
        for name, module in plain.named_modules():
            key = f"{name}.lora_A.weight"
            if key in merged:
                module.weight += merged[f"{name}.lora_B.weight"] @ merged[key]
    return plain


# -- config ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("rank", 0),
        ("alpha", -1.0),
        ("dropout", 1.0),
        ("res_type", "xs"),
        ("pre_num", -1),
        ("target_modules", []),
        ("merge", "average"),
        ("norm_window", 0),
        ("init", "ones"),
    ],
)
def test_invalid_config_names_field_and_allowed(field, value):
    with pytest.raises(ValueError, match=rf"ResLoRAConfig\.{field}=.*allowed"):
        ResLoRAConfig(**{field: value})


def test_config_json_round_trip_and_scaling():
    cfg = ResLoRAConfig(rank=8, alpha=16, res_type="ms", pre_num=3, target_modules="q_proj, v_proj")
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.scaling == 2.0
    assert ResLoRAConfig.from_json(cfg.to_json()) == cfg
    assert ResLoRAConfig(rank=4).scaling == 1.0
    with pytest.raises(ValueError, match="unknown field 'rnak'"):
        ResLoRAConfig.from_dict({"rnak": 4})


def test_no_matching_module_lists_what_was_searched():
    with pytest.raises(ValueError, match=r"to_q.*searched 6 layers"):
        add_reslora(ResidualStack(), ResLoRAConfig(target_modules=["to_q"]))


def test_only_lora_trains():
    model = make(res_type="bs")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.proj.lora_{ab}" for i in range(6) for ab in "AB"}
    assert model.layers[0].proj.lora_A.shape == (3, 8)
    assert model.layers[0].proj.lora_B.shape == (8, 3)
    assert model.layers[0].proj.scaling == 2.0


def test_init_a_kaiming_b_zero():
    torch.manual_seed(0)
    model = add_reslora(ResidualStack(d=64), ResLoRAConfig(rank=4, target_modules=["proj"]))
    block = model.layers[0].proj
    assert torch.count_nonzero(block.lora_B) == 0
    bound = 1 / 64**0.5  # kaiming_uniform with a=sqrt(5) on fan_in 64
    assert block.lora_A.abs().max() <= bound and block.lora_A.abs().max() > 0.8 * bound


# -- forward --------------------------------------------------------------------------
@pytest.mark.parametrize("res_type", TYPES)
@pytest.mark.parametrize("pre_num", [0, 1, 2, 3])
def test_forward_matches_written_out_formula(res_type, pre_num):
    model = make(res_type=res_type, pre_num=pre_num)
    x = torch.randn(5, 8)
    for _ in range(2):  # the traced pass and a frozen-structure pass
        got = model(x)
        want = reference_output(model, x, res_type=res_type, pre_num=pre_num, s=2.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pre_num_zero_is_plain_lora():
    x = torch.randn(4, 8)
    plain = make(res_type="none")(x)
    for res_type in ("bs", "ms"):
        torch.testing.assert_close(make(res_type=res_type, pre_num=0)(x), plain)


def test_chain_order_follows_execution_not_registration():
    model = make(Reordered, res_type="bs")
    model(torch.randn(2, 8))
    order = [b.module_path for b in reslora_chains(model)["proj"]]
    assert order == ["early.0.proj", "early.1.proj", "late.0.proj", "late.1.proj"]


def test_chains_require_a_forward():
    model = make(res_type="bs")
    with pytest.raises(RuntimeError, match="forward"):
        reslora_chains(model)


@pytest.mark.parametrize(
    "res_type,links",
    [
        # widths 8,8,8,6,6,8: weights (8->8, 8->8, 8->6, 6->6, 6->8)
        ("bs", [False, True, False, False, False]),
        ("is", [False, True, True, False, True]),  # input widths 8,8,8,6,6
        ("ms", [False, True, True, True, True]),  # A x is always (batch, r)
    ],
)
def test_chains_break_where_shapes_differ(res_type, links):
    model = make(WidthStack, res_type=res_type, pre_num=2)
    model(torch.randn(3, 8))
    info = chain_structure(model)["proj"]
    assert info["links"] == links
    json.dumps(info)  # structure is plain data
    assert sum(len(s) for s in info["segments"]) == 5


@pytest.mark.parametrize("res_type", ["bs", "ms"])
def test_gradient_reaches_previous_block_through_shortcut(res_type):
    model = make(Independent, res_type=res_type)
    xs = [torch.randn(4, 8) for _ in range(3)]
    model(xs)[2].square().sum().backward()
    prev = model.layers[1].proj
    assert prev.lora_A.grad is not None and prev.lora_A.grad.abs().sum() > 0
    if res_type == "bs":
        assert prev.lora_B.grad.abs().sum() > 0


def test_input_shortcut_uses_previous_input():
    model = make(Independent, res_type="is")
    xs = [torch.randn(4, 8, requires_grad=True) for _ in range(3)]
    model(xs)[2].square().sum().backward()
    assert xs[1].grad.abs().sum() > 0
    assert xs[0].grad is None or xs[0].grad.abs().sum() == 0  # only one predecessor


def test_plain_lora_has_no_cross_layer_gradient():
    model = make(Independent, res_type="none")
    xs = [torch.randn(4, 8, requires_grad=True) for _ in range(3)]
    model(xs)[2].square().sum().backward()
    prev = model.layers[1].proj
    assert prev.lora_A.grad is None or prev.lora_A.grad.abs().sum() == 0
    assert xs[1].grad is None or xs[1].grad.abs().sum() == 0


@pytest.mark.parametrize("res_type", TYPES)
def test_caches_do_not_leak_between_passes(res_type):
    model = make(res_type=res_type, pre_num=2)
    fresh_a, fresh_b = copy.deepcopy(model), copy.deepcopy(model)
    x1, x2 = torch.randn(4, 8), torch.randn(6, 8)
    model.train()
    y1 = model(x1)
    model.eval()
    y2 = model(x2)
    torch.testing.assert_close(y1, fresh_a.train()(x1), rtol=0, atol=0)
    torch.testing.assert_close(y2, fresh_b.eval()(x2), rtol=0, atol=0)


def test_submodule_called_directly_still_starts_a_new_pass():
    model = make(res_type="is")
    fresh = copy.deepcopy(model)
    inner = nn.Sequential(*[_Res(layer) for layer in model.layers])
    x1, x2 = torch.randn(4, 8), torch.randn(4, 8)
    inner(x1)
    torch.testing.assert_close(inner(x2), fresh(x2), rtol=0, atol=0)


class _Res(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return x + torch.tanh(self.layer.proj(x))


class _CheckpointableStack(ResidualStack):
    """Carries ``gradient_checkpointing`` flags where diffusers and transformers put them: on the
    model and on its repeated blocks, from construction (their ``enable`` functions set them)."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        for layer in self.layers:
            layer.gradient_checkpointing = False


@pytest.mark.parametrize("flagged", ["model", "block"])
@pytest.mark.parametrize("res_type", ["is", "ms"])
def test_checkpointing_flags_are_seen_where_the_libraries_set_them(flagged, res_type):
    """A training pass with the flag set on the model or on a block is recomputed in backward
    (tests/test_checkpointing.py checks what that changes)."""
    model = make(_CheckpointableStack, res_type=res_type)
    x = torch.randn(2, 8)
    model.train()(x)
    assert not get_state(model).recomputed
    (model if flagged == "model" else model.layers[3]).gradient_checkpointing = True
    model.train()(x)
    assert get_state(model).recomputed
    with torch.no_grad():  # nothing is recomputed without a backward pass
        model(x)
    assert not get_state(model).recomputed


def test_norm_windows_record_training_passes_only():
    model = make(res_type="is", norm_window=3)
    for _ in range(5):
        model.train()(torch.randn(4, 8))
    model.eval()(torch.randn(4, 8))
    block = model.layers[1].proj
    assert int(block.norm_count) == 5
    assert torch.all(block.norm_window > 0)


# -- remove ---------------------------------------------------------------------------
@pytest.mark.parametrize("res_type", TYPES)
def test_remove_restores_bit_identical_outputs(res_type):
    torch.manual_seed(0)
    model = ResidualStack()
    model.layers[0].proj.weight.requires_grad_(False)
    x = torch.randn(4, 8)
    before = model(x)
    add_reslora(model, ResLoRAConfig(res_type=res_type, target_modules=["proj"], record_norms=True))
    randomize_lora(model)
    assert not torch.equal(model(x), before)
    remove_reslora(model)
    assert torch.equal(model(x), before)
    assert all(isinstance(layer.proj, nn.Linear) for layer in model.layers)
    assert model.layers[0].proj.weight.requires_grad is False
    assert model.layers[1].proj.weight.requires_grad is True
    assert not model._forward_hooks and not model._forward_pre_hooks


# -- merges ---------------------------------------------------------------------------
@pytest.mark.parametrize("res_type,pre_num", [("none", 1), ("bs", 1), ("bs", 3)])
def test_exact_merges(res_type, pre_num):
    model = make(res_type=res_type, pre_num=pre_num)
    x = torch.randn(16, 8)
    y = model(x)
    merged = merge_to_lora(model, eval_inputs=[x])
    assert merged.report.output_error < 1e-6
    # independent path: a plain model with W + B'A'
    torch.testing.assert_close(plain_fused_copy(model, merged)(x), y, rtol=1e-5, atol=1e-6)
    ranks = [merged[f"layers.{i}.proj.lora_A.weight"].shape[0] for i in range(6)]
    expect = [3] * 6 if res_type == "none" else [3 * (min(i, pre_num) + 1) for i in range(6)]
    assert ranks == expect


def test_rank_truncation_reports_error():
    model = make(res_type="bs", pre_num=3)
    x = torch.randn(16, 8)
    model(x)
    full = merge_to_lora(model)
    cut = merge_to_lora(model, rank=3, eval_inputs=[x])
    path = "layers.5.proj"
    assert cut.factors(path)[0].shape == (3, 8)
    dw_full = full.factors(path)[1] @ full.factors(path)[0]
    dw_cut = cut.factors(path)[1] @ cut.factors(path)[0]
    rel = float((dw_full - dw_cut).norm() / dw_full.norm())
    assert cut.report.truncation[path] == pytest.approx(rel, rel=1e-4)
    # the best rank-3 approximation: error equals the tail of the singular values
    s = torch.linalg.svdvals(dw_full.double())
    assert rel == pytest.approx(float(s[3:].square().sum().sqrt() / s.square().sum().sqrt()), rel=1e-4)
    assert cut.report.truncation["layers.0.proj"] == 0.0


def _train_windows(model, steps=4, d=8):
    model.train()
    for _ in range(steps):
        model(torch.randn(32, d))


def test_input_merge_exact_for_is_when_inputs_scale_exactly():
    model = make(ScaleStack, res_type="is")
    _train_windows(model)
    x = torch.randn(64, 8)
    merged = merge_to_lora(model, "input", eval_inputs=[x])
    assert merged.report.output_error < 1e-5
    assert merged.report.alphas["layers.2.proj"] == pytest.approx(1 / 0.7, rel=1e-5)
    torch.testing.assert_close(plain_fused_copy(model, merged)(x), model.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["calibrated", "sequential"])
@pytest.mark.parametrize("res_type,pre_num", [("is", 1), ("ms", 1), ("ms", 3)])
def test_calibrated_merge_exact_when_inputs_scale_exactly(res_type, pre_num, method):
    model = make(ScaleStack, res_type=res_type, pre_num=pre_num)
    _train_windows(model)
    calib = [torch.randn(64, 8) for _ in range(2)]
    held_out = [torch.randn(64, 8)]
    merged = merge_to_lora(model, method, calibration=calib, eval_inputs=held_out)
    assert merged.report.output_error < 1e-5
    assert merged["layers.3.proj.lora_A.weight"].shape == (3, 8)  # still rank r


def test_paper_ms_input_merge_is_not_exact_and_says_by_how_much():
    model = make(ScaleStack, res_type="ms", pre_num=2)
    _train_windows(model)
    held_out = [torch.randn(64, 8)]
    errors = compare_merges(model, held_out, calibration=[torch.randn(64, 8)])
    assert errors["calibrated"] < 1e-5
    # A_{n-k} x_{n-k} is not a multiple of A_n x_n: the paper's scalar cannot be exact
    assert errors["input"] > 1e-2
    assert errors["weight"] > 1e-2


@pytest.mark.parametrize("res_type,pre_num", [("is", 1), ("ms", 2)])
def test_calibrated_beats_paper_merges_on_nonlinear_model(res_type, pre_num):
    model = make(ResidualStack, res_type=res_type, pre_num=pre_num)
    _train_windows(model, steps=10)
    calib = [torch.randn(128, 8) for _ in range(2)]
    held_out = [torch.randn(128, 8) for _ in range(2)]
    errors = compare_merges(model, held_out, calibration=calib)
    assert errors["calibrated"] <= errors["input"]
    assert errors["calibrated"] <= errors["weight"]
    assert errors["calibrated"] > 0  # x_{n-1} is not linear in x_n here


def test_sequential_calibration_written_out_for_is():
    """Block n's correction, fitted on the inputs it sees when blocks 1..n-1 already run
    ``A_j + G_j``, towards the ResLoRA intermediate ``A_n (x_n + x_{n-1})``; restated here from
    the weights with two residual streams (reference and merged)."""
    model = make(ResidualStack, res_type="is")
    _train_windows(model)
    s = model.layers[0].proj.scaling
    calib = [torch.randn(128, 8) for _ in range(2)]
    got = calibrate_sequential(model, calib)
    W = [layer.proj.base_layer.weight.double() for layer in model.layers]
    bias = [layer.proj.base_layer.bias.double() for layer in model.layers]
    A = [layer.proj.lora_A.detach().double() for layer in model.layers]
    B = [layer.proj.lora_B.detach().double() for layer in model.layers]
    fitted = {0: torch.zeros_like(A[0])}  # the first block has no shortcut: nothing to fit
    for n in range(1, len(model.layers)):
        xt, u = [], []
        for x in calib:
            h = ht = x.double()
            prev = None
            for j in range(n):
                inp = h if prev is None else h + prev
                prev, h = h, h + torch.tanh(h @ W[j].T + bias[j] + s * inp @ A[j].T @ B[j].T)
                ht = ht + torch.tanh(ht @ W[j].T + bias[j] + s * ht @ (A[j] + fitted[j]).T @ B[j].T)
            xt.append(ht)
            u.append((h + prev) @ A[n].T)
        X, U = torch.cat(xt), torch.cat(u)
        gram = X.T @ X
        lam = 1e-6 * float(torch.trace(gram)) / gram.shape[0] + 1e-12
        fitted[n] = torch.linalg.solve(gram + lam * torch.eye(8, dtype=gram.dtype), X.T @ (U - X @ A[n].T)).T
        torch.testing.assert_close(got[model.layers[n].proj].double(), fitted[n], rtol=1e-4, atol=1e-5)
    # the first fitted block sees an exact upstream, so it matches the one-pass fit; later ones do not
    joint = calibrate(model, calib)
    torch.testing.assert_close(got[model.layers[1].proj], joint[model.layers[1].proj], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[model.layers[4].proj], joint[model.layers[4].proj], atol=1e-4)


def test_weight_merge_uses_merged_weight_norms():
    model = make(ScaleStack, res_type="is")
    model(torch.randn(4, 8))
    merged = merge_to_lora(model, "weight")
    blocks = reslora_chains(model)["proj"]

    def fstar(i):
        w = blocks[i].base_layer.weight
        return float(
            (w + merged[f"layers.{i}.proj.lora_B.weight"] @ merged[f"layers.{i}.proj.lora_A.weight"]).norm()
        )

    assert merged.report.alphas["layers.1.proj"] == 1.0  # n-2 does not exist
    assert merged.report.alphas["layers.3.proj"] == pytest.approx(fstar(1) / fstar(2), rel=1e-6)
    a3, b3 = merged.factors("layers.3.proj")
    blk = blocks[3]
    torch.testing.assert_close(b3, blk.lora_B.detach() * blk.scaling * (1 + fstar(1) / fstar(2)))


def test_merge_errors_are_clear():
    model = make(res_type="is")
    model.eval()(torch.randn(4, 8))
    with pytest.raises(ValueError, match="norm window of layers.0.proj"):
        merge_to_lora(model, "input")
    with pytest.raises(ValueError, match="calibration"):
        merge_to_lora(model, "calibrated")
    with pytest.raises(ValueError, match="allowed"):
        merge_to_lora(model, "mean")


# -- checkpoints ----------------------------------------------------------------------
@pytest.mark.parametrize("res_type", ["is", "ms"])
def test_checkpoint_round_trip_is_exact(tmp_path, res_type):
    model = make(WidthStack, res_type=res_type, pre_num=2, norm_window=4)
    _train_windows(model, steps=6)
    x = torch.randn(5, 8)
    y = model.eval()(x)
    path = save_reslora_checkpoint(model, tmp_path / "ckpt.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["configs"])[""]["res_type"] == res_type

    torch.manual_seed(0)
    fresh = WidthStack()  # same base weights, no ResLoRA yet
    load_reslora_checkpoint(fresh, path)
    assert chain_structure(fresh) == chain_structure(model)  # no forward needed
    assert torch.equal(fresh.eval()(x), y)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    # the windows go on where they stopped
    _continue_windows(model, fresh)


def _continue_windows(trained, fresh):
    """One more training pass on both models records the same norms at the same positions."""
    x = torch.randn(32, 8)
    trained.train()(x)
    fresh.train()(x)
    for a, b in zip(trained.modules(), fresh.modules()):
        if hasattr(a, "norm_window"):
            assert int(b.norm_count) == int(a.norm_count) == 7
            assert torch.equal(a.norm_window, b.norm_window)


class _Reversed(ResidualStack):
    """ResidualStack with its layers run last to first: the same modules, another chain order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            x = x + torch.tanh(layer.proj(x))
        return x


def _stack(model_cls=ResidualStack, **cfg) -> nn.Module:
    torch.manual_seed(0)
    model = model_cls()
    config = {"rank": 3, "alpha": 4.0, "res_type": "ms", "pre_num": 1, "target_modules": ["proj"], **cfg}
    return add_reslora(model, ResLoRAConfig(**config))


@pytest.mark.parametrize(
    "field, value",
    [
        ("res_type", "bs"),
        ("res_type", "is"),
        ("alpha", 16.0),
        ("pre_num", 2),
        ("rank", 4),
        ("target_modules", [f"layers.{i}.proj" for i in range(6)]),
    ],
)
def test_a_checkpoint_is_refused_by_a_model_of_another_config_naming_the_field(tmp_path, field, value):
    """An ms checkpoint with alpha 4 in a same-shape model of another config would compute
    another model from the same tensors: refused before anything is loaded."""
    saved = _stack()
    randomize_lora(saved)
    x = torch.randn(5, 8)
    expected = saved.eval()(x)
    path = save_reslora_checkpoint(saved, tmp_path / "ms.safetensors")

    other = _stack(**{field: value})
    other(x)  # traced
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=f"saved with {field}=.*the model's ResLoRA has {field}="):
        load_reslora_checkpoint(other, path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())

    same = _stack()
    same(x)
    load_reslora_checkpoint(same, path)  # the same config loads, and computes the saved model
    assert torch.equal(same.eval()(x), expected)
    torch.manual_seed(0)
    fresh = ResidualStack()  # no ResLoRA: the checkpoint's own config is attached
    load_reslora_checkpoint(fresh, path)
    assert torch.equal(fresh.eval()(x), expected)


def test_pre_num_of_a_type_that_ignores_it_does_not_matter_but_chains_do(tmp_path):
    saved = _stack(res_type="is", pre_num=1)
    randomize_lora(saved)
    x = torch.randn(5, 8)
    saved(x)
    expected = saved.eval()(x)
    path = save_reslora_checkpoint(saved, tmp_path / "is.safetensors")
    other = _stack(res_type="is", pre_num=3)  # is always reads one predecessor
    load_reslora_checkpoint(other, path)
    assert torch.equal(other.eval()(x), expected)

    reordered = _stack(_Reversed, res_type="is")
    reordered(x)  # traced in the other order: the same module names, other shortcuts
    with pytest.raises(
        ValueError,
        match=r"chain 'proj' differs from the model's traced chain at block 0: saved 'layers.0.proj'",
    ):
        load_reslora_checkpoint(reordered, path)
    untraced = _stack(_Reversed, res_type="is")  # not traced yet: the stored order is installed
    load_reslora_checkpoint(untraced, path)
    assert [b["modules"] for b in chain_structure(untraced).values()] == [
        [f"layers.{i}.proj" for i in range(6)]
    ]


@pytest.mark.parametrize("res_type", ["is", "ms"])
def test_norm_window_continues_after_load_state_dict(res_type):
    """A Trainer resume restores the buffers with load_state_dict: the window position must
    follow the loaded norm_count (it used to restart at 0 and overwrite the oldest entries)."""
    model = make(WidthStack, res_type=res_type, pre_num=2, norm_window=4)
    _train_windows(model, steps=6)
    torch.manual_seed(0)
    fresh = make(WidthStack, res_type=res_type, pre_num=2, norm_window=4)
    fresh(torch.randn(2, 8))  # trace the chains
    fresh.load_state_dict(model.state_dict())
    _continue_windows(model, fresh)


def test_checkpoint_shape_mismatch_names_first_key(tmp_path):
    model = make(WidthStack, res_type="bs")
    model(torch.randn(2, 8))
    path = save_reslora_checkpoint(model, tmp_path / "c.safetensors")
    other = WidthStack(widths=(8, 8, 8, 6, 5, 8))
    with pytest.raises(ValueError, match=r"layers\.3\.proj\.lora_B.*shape \(6, 3\).*\(5, 3\)"):
        load_reslora_checkpoint(other, path)
    with pytest.raises(ValueError, match="no matching ResLoRA module"):
        load_reslora_checkpoint(WidthStack(widths=(8, 8, 8)), path)


def test_checkpoint_is_written_atomically(tmp_path):
    model = make(res_type="bs")
    target = tmp_path / "ckpt.safetensors"
    with pytest.raises(TypeError):  # invalid metadata: safetensors refuses, nothing may be left behind
        save_reslora_checkpoint(model, target, metadata={"bad": 1})
    assert not target.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("res_type", ["is", "ms"])
def test_norm_windows_are_recorded_only_for_the_input_merge_or_on_request(res_type):
    """The windows cost a few small operations per block and step: recorded when the configured
    merge reads them (``input``) or with ``record_norms=True``; otherwise ``merge="input"`` names
    the missing statistics and ``compare_merges`` leaves that merge out."""
    from reslora_diffusers.merge import has_norm_windows

    x = torch.randn(4, 8)
    counts = {}
    for label, extra in {"default": {}, "input": {"merge": "input"}, "asked": {"record_norms": True}}.items():
        model = make(res_type=res_type, **{"record_norms": None, **extra})
        model.train()(x)
        counts[label] = [int(layer.proj.norm_count) for layer in model.layers]
        assert has_norm_windows(model) == (label != "default")
    assert set(counts["default"]) == {0} and set(counts["input"]) == set(counts["asked"]) == {1}

    model = make(res_type=res_type, record_norms=None)
    model.train()(x)
    with pytest.raises(
        ValueError, match=r"merge='input' needs the norm window of layers\.\d\.proj.*record_norms=True"
    ):
        merge_to_lora(model, merge="input")
    errors = compare_merges(model.eval(), [x], calibration=[x])
    assert "input" not in errors and {"weight", "calibrated"} <= set(errors)
    assert ResLoRAConfig(merge="input").records_norms and not ResLoRAConfig().records_norms
    with pytest.raises(ValueError, match="record_norms"):
        ResLoRAConfig(record_norms="yes")
