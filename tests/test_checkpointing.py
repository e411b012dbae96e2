"""Gradient checkpointing with every shortcut type: a recomputed block reads what its first run
read, gradients through the shortcuts reach the earlier blocks, and what a pass keeps for the
recomputation stays rank ``r`` (``ms``, and ``is`` once its chains are traced).

Every comparison is against the same model trained without checkpointing (float32): loss and
every LoRA gradient, relative error ``||g_ckpt - g|| / ||g||`` at most 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.utils.checkpoint
import transformers.modeling_utils
from torch._dynamo.utils import counters
from transformers import CLIPTextModel

from reslora_diffusers import ResLoRAConfig, add_reslora
from reslora_diffusers.core import get_state, trainable_parameters
from reslora_diffusers.frontends import frontend_for
from reslora_diffusers.merge.error import output_tensor
from reslora_diffusers.training.speed import compile_model
from tests.runs import records, run
from tests.tiny_dits import tiny_flux_transformer, tiny_sd3_transformer, tiny_t5
from tests.tiny_pipes import tiny_clip_config, tiny_sd_unet, unet_inputs
from tests.toys import randomize_lora

CASES = [(t, m) for t in ("none", "is", "bs", "ms") for m in (1, 3)]
RANK = 2


class Attention(nn.Module):
    """q, k, v read one tensor (a shared-input group); ``o`` reads the attention output."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        weights = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)
        return h + self.o(weights @ self.v(x))


class CheckpointedStack(nn.Module):
    """Pre-norm attention blocks, each a checkpointed region when ``gradient_checkpointing`` is
    set (non-reentrant unless ``reentrant``), as diffusers and transformers checkpoint their blocks."""

    def __init__(self, d: int = 8, n_layers: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Attention(d) for _ in range(n_layers))
        self.gradient_checkpointing = False
        self.reentrant = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=self.reentrant)
            else:
                h = block(h)
        return h


def _stack(res_type: str, pre_num: int, **config) -> CheckpointedStack:
    torch.manual_seed(0)
    model = CheckpointedStack()
    targets = ["q", "k", "v", "o"]
    add_reslora(
        model, ResLoRAConfig(rank=RANK, res_type=res_type, pre_num=pre_num, target_modules=targets, **config)
    )
    randomize_lora(model, scale=0.3)
    return model


def _loss_and_grads(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    for p in trainable_parameters(model):
        p.grad = None
    out = output_tensor(model(**inputs)).float()
    # a fixed random readout: a layer-normed output's mean square is 1 whatever the weights
    readout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    loss = (out * readout).mean() + out.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got, want) -> None:
    (loss, grads), (loss_ref, grads_ref) = got, want
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    assert grads.keys() == grads_ref.keys() and grads
    assert sum(float(g.norm() > 0) for g in grads_ref.values()) > len(grads_ref) / 2
    for name, g in grads_ref.items():
        # (a factor whose output the model discards, SD3's last text-stream q/k/v, gets none)
        err = float((grads[name] - g).norm() / g.norm()) if g.norm() > 0 else float(grads[name].norm())
        assert err <= 1e-5, (name, err)


class _CountCheckpoints:
    """Counts ``torch.utils.checkpoint.checkpoint`` calls (so a test cannot pass unchecked)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        real = torch.utils.checkpoint.checkpoint

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
        monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted)  # bound at import


# -- the core on a toy ----------------------------------------------------------------
@pytest.mark.parametrize("res_type,pre_num", CASES)
def test_checkpointed_passes_equal_unchecked_ones(res_type, pre_num, monkeypatch):
    """The tracing pass and the passes after it (``is`` switches to its lookahead form)."""
    checkpoints = _CountCheckpoints(monkeypatch)
    plain, checked = _stack(res_type, pre_num), _stack(res_type, pre_num)
    checked.gradient_checkpointing = True
    for seed in range(3):
        x = {"h": torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(seed))}
        _assert_same(_loss_and_grads(checked, x), _loss_and_grads(plain, x))
    assert checkpoints.calls == 3 * len(checked.blocks)


@pytest.mark.parametrize("res_type,pre_num", CASES)
def test_five_training_steps_identical(res_type, pre_num):
    models = [_stack(res_type, pre_num), _stack(res_type, pre_num)]
    models[1].gradient_checkpointing = True
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 6, 8, generator=gen), torch.randn(3, 6, 8, generator=gen)) for _ in range(5)]
    losses = []
    for model in models:
        opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
        losses.append([])
        for x, y in batches:
            loss = nn.functional.mse_loss(model.train()(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[-1].append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for a, b in zip(trainable_parameters(models[0]), trainable_parameters(models[1])):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("res_type,pre_num", [("is", 1), ("ms", 1), ("ms", 3)])
def test_what_a_checkpointed_pass_keeps_is_rank_r(res_type, pre_num):
    """After a checkpointed training forward, the chains hold only the rank-r products the
    recomputation reads (``ms``: ``A x``; ``is``: ``A_n x_{n-1}``, computed by block ``n-1``),
    never an activation of the model's width; the tracing pass of ``is`` keeps ``x_{n-1}``."""
    model = _stack(res_type, pre_num)
    model.gradient_checkpointing = True
    x = torch.randn(2, 6, 8)

    def kept():
        return [
            chain.cached(kind, pos).shape[-1]
            for chain in get_state(model).chains.values()
            for kind in ("x", "ax", "ahead")
            for pos in range(len(chain.blocks))
            if chain.cached(kind, pos) is not None
        ]

    model.train()(x).sum().backward()  # the tracing pass
    assert kept() and set(kept()) == ({8} if res_type == "is" else {RANK})
    model(x).sum().backward()
    widths = kept()
    assert widths and set(widths) == {RANK}
    # q, k, v, o: 4 chains of 5 blocks; is: the 4 blocks with a successor, ms: every block's A x
    assert len(widths) == 4 * (4 if res_type == "is" else 5)
    model.eval()(x)  # the next pass forgets them
    assert kept() == []


@pytest.mark.parametrize("res_type", ["is", "ms"])
def test_reentrant_checkpointing_is_refused_where_shortcuts_read_activations(res_type):
    model = _stack(res_type, 1)
    model.gradient_checkpointing = model.reentrant = True
    with pytest.raises(ValueError, match="use_reentrant=False"):
        model.train()(torch.randn(2, 6, 8, requires_grad=True))


@pytest.mark.parametrize("res_type", ["none", "bs"])
def test_reentrant_checkpointing_works_where_no_activation_is_read(res_type):
    plain, checked = _stack(res_type, 2), _stack(res_type, 2)
    checked.gradient_checkpointing = checked.reentrant = True
    x = {"h": torch.randn(2, 6, 8, requires_grad=True)}
    _assert_same(_loss_and_grads(checked, x), _loss_and_grads(plain, x))


@pytest.mark.parametrize("res_type", ["is", "ms"])
def test_norm_windows_record_a_recomputed_block_once(res_type):
    model = _stack(res_type, 1, record_norms=True)
    model.gradient_checkpointing = True
    for _ in range(3):
        model.train()(torch.randn(2, 6, 8)).sum().backward()
    assert {int(b.norm_count) for b in get_state(model).blocks.values()} == {3}


@pytest.mark.slow
@pytest.mark.parametrize("res_type,pre_num", [("none", 1), ("is", 1), ("bs", 3), ("ms", 3)])
def test_compiled_checkpointed_training_is_one_graph_and_equals_eager(res_type, pre_num):
    """dynamo traces each checkpointed region into the one graph (its recomputation is the
    tensor work alone); no graph break, no recompilation over five AdamW steps."""
    torch._dynamo.reset()
    counters.clear()
    eager, model = _stack(res_type, pre_num), _stack(res_type, pre_num)
    eager.gradient_checkpointing = model.gradient_checkpointing = True
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(3, 6, 8, generator=gen), torch.randn(3, 6, 8, generator=gen)) for _ in range(5)]
    compiled = compile_model(model, backend="aot_eager", inputs={"h": batches[0][0]})
    eager.eval()(batches[0][0])  # the same eager tracing pass
    losses = []
    for forward, params in ((eager, trainable_parameters(eager)), (compiled, trainable_parameters(model))):
        opt = torch.optim.AdamW(params, lr=1e-2)
        losses.append([])
        for step, (x, y) in enumerate(batches):
            with torch.compiler.set_stance(
                "fail_on_recompile" if step and forward is compiled else "default"
            ):
                loss = nn.functional.mse_loss(forward.train()(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[-1].append(loss.item())
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    torch._dynamo.reset()


# -- diffusers' and transformers' own checkpointing ---------------------------------------
def _sd3():
    return tiny_sd3_transformer(num_layers=3)


MODELS = {
    "unet": (tiny_sd_unet, lambda m: unet_inputs(m)),
    "sd3": (_sd3, lambda m: frontend_for(m).synthetic_inputs(m, num=1, seed=0)[0]),
    "flux": (tiny_flux_transformer, lambda m: frontend_for(m).synthetic_inputs(m, num=1, seed=0)[0]),
}


def _adapted(family: str, res_type: str, pre_num: int) -> nn.Module:
    make, _ = MODELS[family]
    model = add_reslora(make(), ResLoRAConfig(rank=RANK, res_type=res_type, pre_num=pre_num))
    randomize_lora(model, scale=0.2)
    return model


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("res_type,pre_num", CASES)
def test_diffusers_checkpointing_equals_unchecked(family, res_type, pre_num, monkeypatch):
    checkpoints = _CountCheckpoints(monkeypatch)
    plain = _adapted(family, res_type, pre_num)
    checked = copy.deepcopy(plain)
    checked.enable_gradient_checkpointing()
    kwargs = MODELS[family][1](plain)
    for _ in range(2):  # the tracing pass, then a traced one
        _assert_same(_loss_and_grads(checked, kwargs), _loss_and_grads(plain, kwargs))
    assert checkpoints.calls > 0


def _clip():
    torch.manual_seed(0)
    return CLIPTextModel(tiny_clip_config(vocab_size=64))


@pytest.mark.parametrize("encoder", ["clip", "t5"])
@pytest.mark.parametrize("res_type,pre_num", [("is", 1), ("bs", 3), ("ms", 3)])
def test_text_encoder_checkpointing_equals_unchecked(encoder, res_type, pre_num, monkeypatch):
    """transformers' ``gradient_checkpointing_enable()`` (non-reentrant by default)."""
    checkpoints = _CountCheckpoints(monkeypatch)
    plain = add_reslora(
        _clip() if encoder == "clip" else tiny_t5(),
        ResLoRAConfig(rank=RANK, res_type=res_type, pre_num=pre_num),
    )
    randomize_lora(plain, scale=0.2)
    checked = copy.deepcopy(plain)
    # transformers 5 renamed gradient_checkpointing_enable (the old name warns)
    getattr(checked, "activation_checkpointing_enable", checked.gradient_checkpointing_enable)()
    ids = {"input_ids": torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))}
    for _ in range(2):
        _assert_same(_loss_and_grads(checked, ids), _loss_and_grads(plain, ids))
    assert checkpoints.calls > 0


@pytest.mark.slow
@pytest.mark.parametrize("family,res_type,pre_num", [("unet", "ms", 1), ("sd3", "is", 1), ("flux", "ms", 3)])
def test_compiled_diffusers_checkpointing_is_one_graph_and_equals_eager(family, res_type, pre_num):
    """diffusers' checkpointed blocks compile into one graph with every type (20-35 s each on
    one CPU thread): no graph break, no recompilation, eager's gradients."""
    torch._dynamo.reset()
    counters.clear()
    model = _adapted(family, res_type, pre_num)
    eager = copy.deepcopy(model)
    model.enable_gradient_checkpointing()
    eager.enable_gradient_checkpointing()
    kwargs = MODELS[family][1](model)
    compiled = compile_model(model, backend="aot_eager", inputs=kwargs)
    eager.eval()(**kwargs)  # the same eager tracing pass
    for step in range(3):
        with torch.compiler.set_stance("fail_on_recompile" if step else "default"):
            loss, grads = _loss_and_grads(compiled, kwargs)
        _assert_same(
            (loss, {n.removeprefix("_orig_mod."): g for n, g in grads.items()}),
            _loss_and_grads(eager, kwargs),
        )
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


# -- the training script ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("res_type,extra", [("ms", []), ("is", ["--train_text_encoder"])])
@pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")
def test_training_script_with_checkpointing_repeats_the_unchecked_run(base, tmp_path, res_type, extra):
    """``--gradient_checkpointing`` with the default ``ms`` (refused before) and ``is`` with the
    text encoder trained: the same losses and the same LoRA file as without it."""
    from safetensors.torch import load_file

    from reslora_diffusers.data import default_finetune_data_dir

    outputs = {}
    for checkpointing in (False, True):
        out = tmp_path / f"run-{checkpointing}"
        argv = ["--max_train_samples", "6", "--max_train_steps", "3", "--res_type", res_type]
        argv += ["--validation_prompt", "a red cross", "--num_validation_images", "1"]
        argv += ["--validation_steps", "100", "--calibration_batches", "1", "--learning_rate", "1e-2", *extra]
        run(
            base,
            default_finetune_data_dir(),
            out,
            *argv,
            *(["--gradient_checkpointing"] if checkpointing else []),
        )
        losses = [row["loss"] for row in records(out) if "loss" in row]
        outputs[checkpointing] = losses, load_file(out / "pytorch_lora_weights.safetensors")
    (losses, lora), (losses_ckpt, lora_ckpt) = outputs[False], outputs[True]
    assert len(losses) == 3 and losses_ckpt == pytest.approx(losses, rel=1e-5)
    assert lora.keys() == lora_ckpt.keys() and any(k.startswith("text_encoder.") for k in lora) == bool(extra)
    for key in lora:  # (is: float32 rounding of the lookahead form, through three AdamW steps)
        assert float((lora_ckpt[key] - lora[key]).norm() / lora[key].norm()) < 1e-4, key
