"""ResLoRA on nn.Conv2d (LoCon): the formula written out with F.conv2d, shape-aware chains,
exact and calibrated merges on unfolded patches, and the files diffusers, kohya loaders and
PEFT read."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from reslora_diffusers import ResLoRAConfig, add_reslora, chain_structure, export_lora, merge_to_lora
from reslora_diffusers.export import export_peft_adapter
from reslora_diffusers.frontends import UNET_CONV_TARGETS, UNET_TARGETS
from reslora_diffusers.merge import merged_view
from tests.reference import reference_output
from tests.tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline, unet_inputs
from tests.toys import randomize_lora

TYPES = ["none", "is", "bs", "ms"]
#: (in, out, stride) per layer: a stride-2 layer and a width change break the chains
LAYERS = [(4, 4, 1), (4, 4, 1), (4, 4, 2), (4, 4, 1), (4, 4, 1), (4, 6, 1)]


class ConvLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)


class ConvStack(nn.Module):
    """``h <- h + tanh(conv_n(h))`` where shapes allow, else ``h <- tanh(conv_n(h))``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ConvLayer(*spec) for spec in LAYERS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            y = torch.tanh(layer.conv(x))
            x = x + y if y.shape == x.shape else y
        return x


class ScaleConvStack(nn.Module):
    """``x_{n+1} = c x_n`` exactly; the output concatenates every ``conv_n(x_n)``."""

    def __init__(self, c: float = 0.7) -> None:
        super().__init__()
        self.c = c
        self.layers = nn.ModuleList(ConvLayer(4, 4, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for layer in self.layers:
            outs.append(layer.conv(x))
            x = self.c * x
        return torch.cat(outs, dim=1)


def make(model_cls=ConvStack, seed=0, **cfg):
    torch.manual_seed(seed)
    model = model_cls()
    add_reslora(model, ResLoRAConfig(rank=2, alpha=4, target_modules=["conv"], record_norms=True, **cfg))
    randomize_lora(model, seed)
    return model


@pytest.mark.parametrize("res_type", TYPES)
@pytest.mark.parametrize("pre_num", [1, 2])
def test_conv_forward_matches_written_out_formula(res_type, pre_num):
    model = make(res_type=res_type, pre_num=pre_num)
    x = torch.randn(2, 4, 8, 8)
    for _ in range(2):  # the traced pass and a frozen-structure pass
        torch.testing.assert_close(
            model(x),
            reference_output(model, x, res_type=res_type, pre_num=pre_num, s=2.0),
            rtol=1e-5,
            atol=1e-6,
        )


def test_conv_factors_are_peft_shaped_and_only_they_train():
    model = make(res_type="bs")
    block = model.layers[5].conv
    assert block.lora_A.shape == (2, 4, 3, 3) and block.lora_B.shape == (6, 2, 1, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.conv.lora_{ab}" for i in range(6) for ab in "AB"}


@pytest.mark.parametrize(
    "res_type,segments",
    [
        ("is", [3, 3]),  # input shapes change at the stride-2 layer
        ("ms", [2, 4]),  # A x shapes change after it: layer 2's output joins the next ones
        ("bs", [5, 1]),  # factor shapes change at the 4 -> 6 layer only
    ],
)
def test_conv_chains_break_where_the_type_says(res_type, segments):
    model = make(res_type=res_type, pre_num=2)
    model(torch.randn(1, 4, 8, 8))
    assert [len(s) for s in chain_structure(model)["conv"]["segments"]] == segments


@pytest.mark.parametrize("res_type", ["none", "bs"])
def test_conv_exact_merge(res_type):
    model = make(res_type=res_type, pre_num=2)
    x = torch.randn(2, 4, 8, 8)
    model(x)  # trace the chains
    merged = merge_to_lora(model, eval_inputs=[x])
    assert merged.report.output_error < 1e-6
    if res_type == "bs":  # the stacked rank (k+1) r of a 5-block segment at pre_num 2
        assert merged.report.ranks["layers.4.conv"] == 6 and merged.report.ranks["layers.5.conv"] == 2


@pytest.mark.parametrize("res_type", ["is", "ms"])
@pytest.mark.parametrize("method", ["calibrated", "sequential"])
def test_conv_calibrated_merge_exact_when_inputs_scale_exactly(res_type, method):
    """x_{n-k} = x_n / c^k, so the shortcut's patches are a linear map of the block's own
    patches: the fit on unfolded patches must find it."""
    model = make(ScaleConvStack, res_type=res_type, pre_num=2)
    model.train()
    model(torch.randn(4, 4, 6, 6))
    calib = [torch.randn(4, 4, 6, 6) for _ in range(3)]
    merged = merge_to_lora(model, method, calibration=calib, eval_inputs=[torch.randn(2, 4, 6, 6)])
    assert merged.report.output_error < 1e-5
    # the paper's scalar merge is exact here too (alpha = 1/c per lag for is): a second path
    if res_type == "is":
        assert merge_to_lora(model, "input", eval_inputs=[torch.randn(2, 4, 6, 6)]).report.output_error < 1e-5


@pytest.mark.parametrize("res_type", ["bs", "ms"])
def test_conv_peft_adapter_loads_to_the_merged_model(tmp_path, res_type):
    from peft import PeftModel

    model = make(res_type=res_type, pre_num=2)
    x = torch.randn(2, 4, 8, 8)
    model.train()
    model(x)
    calib = [torch.randn(2, 4, 8, 8) for _ in range(2)]
    merged = export_peft_adapter(model, tmp_path / "adapter", calibration=calib, eval_inputs=[x])
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(ConvStack(), str(tmp_path / "adapter")).eval()
    with torch.no_grad(), merged_view(model.eval(), merged):
        want = model(x)
    torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-6)


def _conv_pipe(make_pipe, tmp_path, res_type):
    pipe = make_pipe(tmp_path)
    config = ResLoRAConfig(
        rank=2, alpha=4, res_type=res_type, pre_num=2, target_modules=[*UNET_TARGETS, *UNET_CONV_TARGETS]
    )
    add_reslora(pipe, config)
    randomize_lora(pipe.unet, scale=0.1)
    batches = [unet_inputs(pipe.unet, seed=s) for s in range(3)]
    pipe.unet.train()
    with torch.no_grad():
        pipe.unet(**batches[0])
    pipe.unet.eval()
    return pipe, batches


@pytest.mark.slow
@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline])
@pytest.mark.parametrize("res_type", ["bs", "is"])
def test_unet_conv_targets_export_to_diffusers_and_kohya(tmp_path, make_pipe, res_type):
    pipe, batches = _conv_pipe(make_pipe, tmp_path, res_type)
    blocks = [n for n, m in pipe.unet.named_modules() if type(m).__name__ == "ResLoRAConv2d"]
    assert any(".resnets." in n for n in blocks) and any("samplers.0.conv" in n for n in blocks)
    out = tmp_path / "lora"
    export_lora(out, unet=pipe.unet, calibration={"unet": batches[:2]}, eval_inputs={"unet": batches[2:]})
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        lora = {k.removeprefix("unet."): f.get_tensor(k) for k in f.keys()}
    with safe_open(str(out / "lora_kohya.safetensors"), framework="pt") as f:
        kohya_keys, meta = set(f.keys()), f.metadata()
        conv_down = f.get_slice("lora_unet_" + _kohya_conv_name(make_pipe) + ".lora_down.weight").get_shape()
    assert len(conv_down) == 4 and conv_down[2:] == [3, 3]
    assert json.loads(meta["ss_network_args"])["conv_dim"] == meta["ss_network_dim"]
    assert any(k.endswith(".lora_up.weight") for k in kohya_keys)

    with merged_view(pipe.unet, lora), torch.no_grad():
        want = pipe.unet(**batches[2]).sample
    via_diffusers, via_kohya = make_pipe(tmp_path), make_pipe(tmp_path)
    via_diffusers.load_lora_weights(str(out))
    via_kohya.load_lora_weights(str(out / "lora_kohya.safetensors"))
    for loaded in (via_diffusers, via_kohya):
        with torch.no_grad():
            got = loaded.unet(**batches[2]).sample
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # every ResLoRA layer arrived: diffusers' fused weights differ from the base at each of them
    base = make_pipe(tmp_path).unet.state_dict()
    via_kohya.fuse_lora()
    fused = via_kohya.unet.state_dict()
    for name in blocks:
        key = f"{name}.base_layer.weight" if f"{name}.base_layer.weight" in fused else f"{name}.weight"
        assert not torch.equal(fused[key], base[f"{name}.weight"]), name


def _kohya_conv_name(make_pipe) -> str:
    """A resnet conv of the first down block: diffusers names for SD, SGM names for SDXL."""
    if make_pipe is tiny_sdxl_pipeline:
        return "input_blocks_1_0_in_layers_2"
    return "down_blocks_0_resnets_0_conv1"


def test_a_users_attention_processor_stays_and_its_projections_run_their_branches():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from tests.tiny_pipes import tiny_sd_unet

    class Custom(AttnProcessor2_0):
        """A processor of the user's that ResLoRA does not know."""

    unet = tiny_sd_unet()
    kwargs = unet_inputs(unet)
    names = list(unet.attn_processors)
    custom_name = names[0]
    unet.set_attn_processor({n: Custom() if n == custom_name else AttnProcessor() for n in names})
    reference_unet = copy.deepcopy(unet)
    add_reslora(unet, ResLoRAConfig(rank=2, res_type="bs", pre_num=2))
    processors = unet.attn_processors
    assert isinstance(processors[custom_name], Custom)
    assert all(type(p) is AttnProcessor for n, p in processors.items() if n != custom_name)
    with torch.no_grad():
        torch.testing.assert_close(unet(**kwargs).sample, reference_unet(**kwargs).sample)
    randomize_lora(unet, scale=0.2)
    with torch.no_grad():  # the custom processor's projections run their branches too
        changed = unet(**kwargs).sample
    assert (changed - reference_unet(**kwargs).sample).abs().max() > 1e-4
