"""SD3 and Flux: ResLoRA on diffusion transformers, their chains, and files diffusers loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
from peft import PeftModel
from safetensors import safe_open

from reslora_diffusers import (
    ResLoRAConfig,
    add_reslora,
    chain_structure,
    export_lora,
    save_reslora_checkpoint,
)
from reslora_diffusers.cli import merge_main
from reslora_diffusers.core import get_state
from reslora_diffusers.data import build_sd3_transformer
from reslora_diffusers.eval import generate
from reslora_diffusers.export import export_peft_adapter
from reslora_diffusers.frontends import (
    DIT_ATTENTION_TARGETS,
    FLUX_FEEDFORWARD_TARGETS,
    FoldedPaddingAttnProcessor,
    fold_t5_padding,
    pipeline_components,
)
from reslora_diffusers.merge import merged_view
from tests.reference import reference_hooks
from tests.tiny_dits import (
    tiny_flux_pipeline,
    tiny_flux_transformer,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
    tiny_t5,
)
from tests.toys import randomize_lora
from tests.transformer_checks import assert_starts_at_base_and_comes_off_exactly, forward, inputs

TYPES = ["none", "is", "bs", "ms"]
MAKERS = {"sd3": tiny_sd3_transformer, "flux": tiny_flux_transformer}
PIPES = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


def text_batches(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 40, (2, 16), generator=gen)} for _ in range(n)]


def train_forwards(module, batches):
    """Training-mode passes: trace the chains and fill the norm windows."""
    module.train()
    with torch.no_grad():
        for batch in batches:
            module(**batch)
    module.eval()


@pytest.mark.parametrize("family", MAKERS)
@pytest.mark.parametrize("res_type", TYPES)
def test_init_is_bit_identical_and_removal_exact(family, res_type):
    assert_starts_at_base_and_comes_off_exactly(MAKERS[family](), res_type)


@pytest.mark.parametrize("family", MAKERS)
@pytest.mark.parametrize("res_type", TYPES)
def test_outputs_and_gradients_follow_the_written_out_formula(family, res_type):
    model = MAKERS[family]()
    plain = copy.deepcopy(model)
    config = ResLoRAConfig(rank=2, alpha=4, res_type=res_type, pre_num=2)
    add_reslora(model, config)
    randomize_lora(model, scale=0.2)
    batch = inputs(model)[0]
    with torch.no_grad():
        forward(model, batch)  # trace the chains
    blocks = get_state(model).blocks
    factors = {
        p: (b.lora_A.detach().clone().requires_grad_(), b.lora_B.detach().clone().requires_grad_())
        for p, b in blocks.items()
    }
    weights = torch.randn(forward(plain, batch).shape, generator=torch.Generator().manual_seed(1))
    got = forward(model.train(), batch)
    with reference_hooks(plain.train(), factors, config.scaling, res_type, pre_num=2) as ref:
        want = forward(ref, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    for p, b in blocks.items():
        torch.testing.assert_close(b.lora_A.grad, factors[p][0].grad, rtol=1e-4, atol=1e-6, msg=p)
        torch.testing.assert_close(b.lora_B.grad, factors[p][1].grad, rtol=1e-4, atol=1e-6, msg=p)


def _segments(model, res_type, targets=None):
    add_reslora(model, ResLoRAConfig(rank=2, res_type=res_type, pre_num=2, target_modules=targets))
    with torch.no_grad():
        forward(model, inputs(model)[0])
    return {k: [len(s) for s in v["segments"]] for k, v in chain_structure(model).items()}


@pytest.mark.parametrize("res_type", ["is", "bs", "ms"])
def test_sd3_chains_run_unbroken_through_the_joint_blocks(res_type):
    segments = _segments(tiny_sd3_transformer(), res_type)
    for role in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"):
        assert segments[f"attn.{role}"] == [3], role
    assert segments["attn.to_add_out"] == [2]  # the last block's text stream ends before it
    assert segments["attn2.to_q"] == [1]  # SD3.5's dual attention: its own chain


def test_flux_chains_cross_from_double_to_single_blocks_where_shapes_allow():
    # bs links equal weight shapes: to_q runs through the 2 double and 2 single blocks
    bs = _segments(tiny_flux_transformer(), "bs")
    assert bs["attn.to_q"] == [4] and bs["attn.add_q_proj"] == [2] and bs["attn.to_out.0"] == [2]
    model = tiny_flux_transformer()
    _segments(model, "is")
    q = chain_structure(model)["attn.to_q"]
    # the single blocks also see the text tokens: is/ms inputs differ in shape there
    assert q["segments"] == [
        ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q"],
        ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_q"],
    ]
    assert _segments(tiny_flux_transformer(), "ms")["attn.to_v"] == [2, 2]


def test_flux_feedforward_targets_leave_the_output_layer_alone():
    model = tiny_flux_transformer()
    targets = [*DIT_ATTENTION_TARGETS, *FLUX_FEEDFORWARD_TARGETS]
    segments = _segments(model, "bs", targets)
    assert chain_structure(model)["proj_out"]["modules"] == [
        "single_transformer_blocks.0.proj_out",
        "single_transformer_blocks.1.proj_out",
    ]
    assert segments["proj_mlp"] == [2] and segments["ff_context.net.2"] == [2]
    assert type(model.proj_out).__name__ == "Linear"
    # named explicitly, the output layer is adapted like any other
    model = tiny_flux_transformer()
    add_reslora(model, ResLoRAConfig(rank=2, target_modules=["proj_out"], exclude_modules=[]))
    assert type(model.proj_out).__name__ == "ResLoRALinear"


def _pipe_with_reslora(family, tmp_path, res_type):
    pipe = PIPES[family](tmp_path)
    add_reslora(pipe, ResLoRAConfig(rank=2, alpha=4, res_type=res_type, pre_num=2), train_text_encoder=True)
    comps = pipeline_components(pipe)
    batches = {}
    for name, module in comps.items():
        randomize_lora(module, scale=0.1)
        batches[name] = inputs(module, num=3) if name == "transformer" else text_batches(3)
        train_forwards(module, batches[name])
    return pipe, comps, batches


def _lora_of(out, component, module):
    """The exported plain LoRA of one component, keyed by the module's own paths."""
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        lora = {k[len(component) + 1 :]: f.get_tensor(k) for k in f.keys() if k.startswith(component + ".")}
    if component != "transformer" and not hasattr(module, "text_model"):
        lora = {k.removeprefix("text_model."): v for k, v in lora.items()}
    return lora


@pytest.mark.parametrize("family", PIPES)
@pytest.mark.parametrize("res_type", TYPES)
def test_load_lora_weights_gives_the_merged_model(tmp_path, family, res_type):
    pipe, comps, batches = _pipe_with_reslora(family, tmp_path, res_type)
    # SD3: the transformer and both CLIP encoders; Flux: the transformer and CLIP, never T5
    assert (
        set(comps)
        == {
            "sd3": {"transformer", "text_encoder", "text_encoder_2"},
            "flux": {"transformer", "text_encoder"},
        }[family]
    )
    out = tmp_path / "lora"
    calib = {k: b[:2] for k, b in batches.items()}
    held = {k: b[2:] for k, b in batches.items()}
    report = export_lora(out, calibration=calib, eval_inputs=held, **comps)
    assert {p.name for p in out.iterdir()} == {"pytorch_lora_weights.safetensors", "merge_report.json"}
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight" in f.keys()

    fresh = PIPES[family](tmp_path)
    fresh.load_lora_weights(str(out))
    for name, module in comps.items():
        batch = held[name][0]
        with torch.no_grad():
            reslora_out = forward(module, batch)
            with merged_view(module, _lora_of(out, name, module)):
                merged_out = forward(module, batch)
            got = forward(getattr(fresh, name), batch)
        torch.testing.assert_close(got, merged_out, rtol=1e-4, atol=1e-5)
        err = float((got - reslora_out).norm() / reslora_out.norm())
        if res_type in ("none", "bs"):
            assert err < 1e-5, name
        else:
            assert 1e-7 < err <= report["components"][name]["output_error"] * 1.001 + 1e-6, name


@pytest.mark.parametrize("family", MAKERS)
def test_merge_report_on_synthetic_transformer_inputs(tmp_path, family):
    model = MAKERS[family]()
    add_reslora(model, ResLoRAConfig(rank=2, res_type="ms", pre_num=2, record_norms=True))
    randomize_lora(model, scale=0.2)
    train_forwards(model, inputs(model, num=2))
    report = export_lora(tmp_path / "out", transformer=model)
    component = report["components"]["transformer"]
    assert component["eval_inputs"] == "synthetic"
    assert 0 < component["output_error"] < 1
    assert set(component["methods"]) == {"input", "weight", "calibrated"}
    assert "attn.to_q" in component["methods"]["calibrated"]["chains"]


def test_export_refuses_kohya_and_t5_for_transformer_pipelines(tmp_path):
    model = add_reslora(tiny_flux_transformer(), ResLoRAConfig(rank=2))
    with torch.no_grad():
        forward(model, inputs(model)[0])
    with pytest.raises(ValueError, match="no kohya-ss file for flux pipelines"):
        export_lora(tmp_path / "x", transformer=model, formats=("kohya",))
    t5 = add_reslora(tiny_t5(), ResLoRAConfig(rank=2))
    t5(**text_batches(1)[0])
    with pytest.raises(ValueError, match="component 'text_encoder_2' cannot go into its LoRA file"):
        export_lora(tmp_path / "x", transformer=model, text_encoder_2=t5)
    assert not (tmp_path / "x").exists()


def test_t5_encoder_targets_and_peft_export(tmp_path):
    t5 = tiny_t5()
    base = copy.deepcopy(t5)
    batch = text_batches(1)[0]
    with torch.no_grad():
        before = t5(**batch).last_hidden_state
    add_reslora(t5, ResLoRAConfig(rank=2, res_type="bs", pre_num=1))
    adapted = sorted({p.rsplit(".", 1)[-1] for p in get_state(t5).blocks})
    assert adapted == ["k", "o", "q", "v", "wi_0", "wi_1", "wo"]
    with torch.no_grad():
        assert torch.equal(t5(**batch).last_hidden_state, before)
    randomize_lora(t5, scale=0.2)
    train_forwards(t5, text_batches(2))
    assert [len(s) for s in chain_structure(t5)["DenseReluDense.wi_0"]["segments"]] == [2]
    export_peft_adapter(t5, tmp_path / "t5")
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "t5"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, t5(**batch).last_hidden_state)


@pytest.mark.parametrize("family", MAKERS)
def test_peft_export_of_the_transformer_loads_into_peft(tmp_path, family):
    model = MAKERS[family]()
    base = copy.deepcopy(model)
    add_reslora(model, ResLoRAConfig(rank=2, res_type="bs", pre_num=2))
    randomize_lora(model, scale=0.2)
    batch = inputs(model)[0]
    train_forwards(model, [batch])
    export_peft_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["rank_pattern"]  # bs stacks ranks 2, 4, 6 along a chain
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(forward(loaded, batch), forward(model, batch), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", PIPES)
def test_merge_cli_and_fuse(tmp_path, family):
    base_dir = tmp_path / "base"
    PIPES[family](tmp_path).save_pretrained(str(base_dir))
    pipe = DiffusionPipeline.from_pretrained(str(base_dir))
    add_reslora(pipe, ResLoRAConfig(rank=2, res_type="bs", pre_num=2), train_text_encoder=True)
    comps = pipeline_components(pipe)
    for name, module in comps.items():
        randomize_lora(module, scale=0.1)
        train_forwards(module, inputs(module) if name == "transformer" else text_batches(1))
    ckpt = save_reslora_checkpoint(comps, tmp_path / "r.safetensors")
    out = tmp_path / "merged"
    assert merge_main([str(ckpt), "--base", str(base_dir), "--output", str(out), "--fuse"]) == 0
    assert {p.name for p in out.iterdir()} == {
        "pytorch_lora_weights.safetensors",
        "merge_report.json",
        "fused_pipeline",
    }
    fused = DiffusionPipeline.from_pretrained(str(out / "fused_pipeline"))
    base = DiffusionPipeline.from_pretrained(str(base_dir))
    assert sum(p.numel() for p in fused.transformer.parameters()) == sum(
        p.numel() for p in base.transformer.parameters()
    )
    batch = inputs(pipe.transformer)[0]
    with torch.no_grad():
        want = forward(pipe.transformer, batch)  # bs merges exactly: the ResLoRA model itself
        torch.testing.assert_close(forward(fused.transformer, batch), want, rtol=1e-4, atol=1e-5)
    assert (
        merge_main([str(ckpt), "--base", str(base_dir), "--output", str(tmp_path / "k"), "--format", "kohya"])
        == 2
    )


def test_folded_t5_padding_computes_what_the_whole_prompt_does():
    """A pipeline without T5 pads each prompt with 256 zero states; folded into one token whose
    logits carry log 256, the transformer's output and gradients are diffusers' own on the whole
    sequence (its ``JointAttnProcessor2_0``), and without the fold the processor is diffusers'."""
    torch.manual_seed(0)
    reference = build_sd3_transformer()
    model = copy.deepcopy(reference)
    model.set_attn_processor(FoldedPaddingAttnProcessor())
    clip = torch.randn(2, 16, reference.config.joint_attention_dim)
    states = torch.cat([clip, torch.zeros(2, 256, clip.shape[-1])], dim=1)
    common = {
        "hidden_states": torch.randn(2, reference.config.in_channels, 16, 16),
        "pooled_projections": torch.randn(2, reference.config.pooled_projection_dim),
        "timestep": torch.tensor([100.0, 700.0]),
    }
    folded, kwargs = fold_t5_padding(states, 256)
    assert folded.shape[1] == 16 + 1 and torch.equal(folded[:, :16], clip)
    expected = reference(**common, encoder_hidden_states=states).sample
    out = model(**common, encoder_hidden_states=folded, joint_attention_kwargs=kwargs).sample
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    expected.square().mean().backward()
    out.square().mean().backward()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, ref.grad, atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(**common, encoder_hidden_states=states).sample, expected)
        # the fold's weight is what makes it exact: one zero token alone is another prompt
        unweighted = model(**common, encoder_hidden_states=folded).sample
    assert (unweighted - expected).abs().max() > 1e-2
    with pytest.raises(ValueError, match="the last 256 prompt states are not the zeros"):
        fold_t5_padding(states + 1, 256)


def test_generate_folds_the_t5_padding_of_a_pipeline_without_t5(tmp_path):
    """``generate`` draws through SD3's cheaper call: without T5 the transformer sees one T5
    token for 256 and draws what the plain pipeline call draws (the tiny transformer's first
    block has SD3.5's second attention, which must not weigh anything), with its processors
    restored afterwards; with a working T5 the call is the plain one."""
    with_t5 = tiny_sd3_pipeline(tmp_path)
    without_t5 = StableDiffusion3Pipeline(
        **{**with_t5.components, "text_encoder_3": None, "tokenizer_3": None}
    )
    prompts = ["a red circle on a white background", "a blue square"]
    common = {"num_inference_steps": 2, "guidance_scale": 4.0, "output_type": "np"}
    for pipe, folds in ((without_t5, True), (with_t5, False)):
        processors = [type(p) for p in pipe.transformer.attn_processors.values()]
        lengths = []
        hook = pipe.transformer.register_forward_pre_hook(
            lambda module, args, kwargs, seen=lengths: seen.append(kwargs["encoder_hidden_states"].shape[1]),
            with_kwargs=True,
        )
        drawn = generate(pipe, prompts, [0, 1], **common)
        generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
        plain = pipe(prompt=prompts, generator=generators, **common).images
        hook.remove()
        steps = common["num_inference_steps"]
        assert lengths[steps:] == [lengths[steps]] * steps
        assert lengths[:steps] == [lengths[steps] - (255 if folds else 0)] * steps
        torch.testing.assert_close(torch.as_tensor(drawn), torch.as_tensor(plain), atol=1e-5, rtol=0)
        assert [type(p) for p in pipe.transformer.attn_processors.values()] == processors
