"""Shared-input groups (``core.fusion``): blocks that read one tensor apply ``A`` as one product,
with the numbers of separate products."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from torch._dynamo.utils import counters

from reslora_diffusers import ResLoRAConfig, add_reslora
from reslora_diffusers.core import ResLoRALayer, trainable_parameters
from reslora_diffusers.core.inject import get_state
from reslora_diffusers.frontends import DIT_ATTENTION_TARGETS, frontend_for
from reslora_diffusers.training.speed import compile_model
from tests.tiny_dits import tiny_sd3_transformer


class Attention(nn.Module):
    """``o(q(x) * k(x or other) + v(x))``: q, k and v read one tensor unless ``other`` is given."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        return self.o(self.q(x) * self.k(x if other is None else other) + self.v(x))


class Stack(nn.Module):
    def __init__(self, d: int = 8, n_layers: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Attention(d) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer(x, other))
        return x


def _model(res_type: str, pre_num: int = 3, dropout: float = 0.0) -> Stack:
    torch.manual_seed(0)
    model = Stack()
    config = ResLoRAConfig(
        rank=4, res_type=res_type, pre_num=pre_num, dropout=dropout, target_modules=["q", "k", "v", "o"]
    )
    add_reslora(model, config)
    with torch.no_grad():  # non-zero B: every block's branch shows in the output
        for p in trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape))
    return model


def _output_and_grads(model, *args) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model(*args)
    params = trainable_parameters(model)
    grads = torch.autograd.grad(out.square().sum(), params)
    return out.detach(), list(grads)


class CountProducts:
    """Counts ``A`` products (calls of a block's ``apply_a``) while active."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        original = ResLoRALayer.apply_a

        def counted(block, x, a):
            self.calls += 1
            return original(block, x, a)

        monkeypatch.setattr(ResLoRALayer, "apply_a", counted)


@pytest.mark.parametrize("res_type", ["none", "is", "bs", "ms"])
def test_q_k_v_reading_one_tensor_share_one_product_with_the_separate_products_numbers(res_type, monkeypatch):
    model = _model(res_type)
    x = torch.randn(5, 8)
    traced = _output_and_grads(model, x)  # the tracing pass applies every A alone
    groups = get_state(model).inputs.describe()
    assert groups == [[f"layers.{i}.{p}" for p in "qkv"] for i in range(4)]

    products = CountProducts(monkeypatch)
    fused = _output_and_grads(model, x)
    assert products.calls == 4 * 2  # per layer: one for q, k, v and one for o (12 apart)
    torch.testing.assert_close(fused[0], traced[0])
    for got, want in zip(fused[1], traced[1]):
        torch.testing.assert_close(got, want)


def test_blocks_with_lora_dropout_apply_their_own():
    """With LoRA dropout each block draws its own mask: A reads a different input per block."""
    model = _model("none", dropout=0.1)
    model(torch.randn(5, 8))
    assert get_state(model).inputs.groups == []


def test_is_blocks_with_different_scales_apply_their_own():
    """``is`` folds x_n + c x_{n-1} once per group, with the first member's c."""
    model = _model("is")
    get_state(model).blocks["layers.2.k"].shortcut_scale.fill_(0.5)
    model(torch.randn(5, 8))
    assert get_state(model).inputs.describe() == [[f"layers.{i}.{p}" for p in "qkv"] for i in (0, 1, 3)]


class SideInput(Stack):
    """Layer ``side``'s k reads ``other``; every other projection reads the running ``x``."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.side = side

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = x + torch.tanh(layer(x, other if i == self.side else None))
        return x


def test_an_is_member_whose_predecessor_read_another_tensor_folds_its_own():
    """Layer 1's q, k, v read one x_1, but k's predecessor (layer 0's k) read ``other``: k's fold
    x_1 + c other is not q's x_1 + c x_0, so k must not take q's slice. The reference is the
    traced pass, which applies every A alone (``_output_and_grads`` of the same model)."""
    torch.manual_seed(0)
    model = SideInput(side=0)
    add_reslora(model, ResLoRAConfig(rank=4, res_type="is", target_modules=["q", "k", "v", "o"]))
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape))
    x, other = torch.randn(5, 8), torch.randn(5, 8)
    traced = _output_and_grads(model, x, other)
    groups = get_state(model).inputs.describe()
    assert [f"layers.1.{p}" for p in "qkv"] in groups and ["layers.0.q"] not in groups
    fused = _output_and_grads(model, x, other)
    torch.testing.assert_close(fused[0], traced[0])
    for got, want in zip(fused[1], traced[1]):
        torch.testing.assert_close(got, want)


def test_a_member_run_on_another_tensor_computes_its_own_product():
    """Traced with q, k, v on one tensor; later k reads another: k must not take the slice q
    computed from x. The reference is the same model traced on the later pattern (no groups)."""
    model = _model("bs")
    reference = copy.deepcopy(model)
    x, other = torch.randn(5, 8), torch.randn(5, 8)
    model(x)
    assert len(get_state(model).inputs.groups) == 4
    got = model(x, other)
    want = reference(x, other)
    assert get_state(reference).inputs.groups == []  # q(x), k(other), v(x): nothing consecutive
    torch.testing.assert_close(got, want)


def test_sd3_groups_the_projections_of_each_stream():
    net = tiny_sd3_transformer()
    config = ResLoRAConfig(rank=4, res_type="bs", target_modules=list(DIT_ATTENTION_TARGETS))
    add_reslora(net, config)
    net(**frontend_for(net).synthetic_inputs(net, num=1, batch=1)[0])
    groups = get_state(net).inputs.describe()
    image = [[f"transformer_blocks.{i}.attn.{p}" for p in ("to_q", "to_k", "to_v")] for i in range(3)]
    text = [
        [f"transformer_blocks.{i}.attn.{p}" for p in ("add_q_proj", "add_k_proj", "add_v_proj")]
        for i in range(3)
    ]
    dual = [[f"transformer_blocks.0.attn2.{p}" for p in ("to_q", "to_k", "to_v")]]
    assert sorted(groups) == sorted(image + text + dual)


def _output_counter(counts: list[int]):
    """A dynamo backend that records how many outputs each captured graph returns."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        (output,) = [n for n in gm.graph.nodes if n.op == "output"]
        counts.append(len(output.args[0]))
        return gm.forward

    return backend


@pytest.mark.parametrize("res_type", ["none", "is", "bs", "ms"])
def test_no_cached_activation_leaves_the_compiled_graph_as_an_extra_output(res_type):
    """The root model's hooks, which empty a pass's caches, run outside a compiled graph, so
    the chain caches and the groups' slices and input are emptied inside the forward (after
    each chain's last block, each group's last member): else every activation still held when
    the graph returns becomes one more graph output, kept alive through the step."""
    x = torch.randn(3, 8)
    model = _model(res_type)
    counts: list[int] = []
    compile_model(model, backend=_output_counter(counts), inputs={"x": x})(x).sum().backward()
    assert counts == [1]
    state = get_state(model)
    assert state.inputs.groups
    for chain in state.chains.values():
        for kind in chain.shortcut.caches:
            assert all(chain.cached(kind, pos) is None for pos in range(len(chain.blocks)))


@pytest.mark.slow
def test_compiled_groups_are_one_graph_without_breaks():
    torch._dynamo.reset()
    counters.clear()
    eager, model = _model("ms"), _model("ms")
    x = torch.randn(5, 8)
    compiled = compile_model(model, backend="aot_eager", inputs={"x": x})
    assert len(get_state(model).inputs.groups) == 4
    eager(x)  # the tracing pass: the next one is grouped, as the compiled model's passes are
    want = _output_and_grads(eager, x)
    got = _output_and_grads(compiled, x)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_checkpoint_carries_the_groups_so_a_loaded_model_computes_as_the_saved_one(tmp_path):
    from reslora_diffusers import load_reslora_checkpoint, save_reslora_checkpoint

    model = _model("bs")
    x = torch.randn(5, 8)
    model(x)
    save_reslora_checkpoint(model, tmp_path / "ckpt.safetensors")
    torch.manual_seed(0)  # the frozen base weights of _model
    fresh = load_reslora_checkpoint(Stack(), tmp_path / "ckpt.safetensors")
    assert get_state(fresh).inputs.describe() == get_state(model).inputs.describe()
    assert get_state(fresh).inputs.frozen  # active before any forward: no unfused first pass
    assert torch.equal(fresh(x), model(x))
