"""The diffusers front end: attention under diffusers' processors, chains in a UNet, export files
loaded by diffusers."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open

from reslora_diffusers import (
    ResLoRAConfig,
    add_reslora,
    chain_structure,
    export_lora,
    remove_reslora,
    set_shortcut_scale,
)
from reslora_diffusers.cli import merge_main
from reslora_diffusers.core import get_state
from reslora_diffusers.frontends import UNET_FEEDFORWARD_TARGETS, UNET_TARGETS
from reslora_diffusers.merge import merged_view
from tests.tiny_pipes import (
    call,
    exported_lora,
    saved_base_and_checkpoint,
    text_batches,
    tiny_sd_pipeline,
    tiny_sd_unet,
    tiny_sdxl_pipeline,
    tiny_sdxl_unet,
    train_forwards,
    unet_inputs,
)
from tests.toys import randomize_lora

TYPES = ["none", "is", "bs", "ms"]


@pytest.mark.parametrize("make_unet", [tiny_sd_unet, tiny_sdxl_unet])
@pytest.mark.parametrize("res_type", TYPES)
def test_attention_keeps_diffusers_processors_shares_q_k_v_products_and_removal_is_exact(make_unet, res_type):
    from reslora_diffusers.core.inject import get_state

    unet = make_unet()
    kwargs = unet_inputs(unet)
    before = call(unet, kwargs)
    processors = {name: type(p) for name, p in unet.attn_processors.items()}
    add_reslora(unet, ResLoRAConfig(rank=2, res_type=res_type, pre_num=2))
    assert {name: type(p) for name, p in unet.attn_processors.items()} == processors
    randomize_lora(unet, scale=0.2)
    traced = call(unet, kwargs)  # the tracing pass: every projection applies its own A
    groups = get_state(unet).inputs.describe()
    # self-attention's q, k, v read the hidden states; cross-attention's k, v the text (``is``:
    # and their predecessors read one tensor too, so they fold x_n + c x_{n-1} once)
    suffixes = sorted({tuple(p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1] for p in g) for g in groups})
    assert suffixes == [("attn1.to_q", "attn1.to_k", "attn1.to_v"), ("attn2.to_k", "attn2.to_v")]
    torch.testing.assert_close(call(unet, kwargs), traced, rtol=1e-5, atol=1e-6)
    assert (traced - before).abs().max() > 1e-3
    remove_reslora(unet)
    assert torch.equal(call(unet, kwargs), before)


def test_unet_chains_follow_down_mid_up_and_break_at_resolution_changes():
    unet = add_reslora(tiny_sd_unet(), ResLoRAConfig(rank=2, res_type="is"))
    call(unet, unet_inputs(unet))
    chains = chain_structure(unet)
    q = chains["attn1.to_q"]
    assert [m.split(".attentions")[0] for m in q["modules"]] == (
        ["down_blocks.0"] * 2
        + ["down_blocks.1"] * 2
        + ["mid_block"]
        + ["up_blocks.0"] * 3
        + ["up_blocks.1"] * 3
    )
    # 16 channels | 32 channels (down 1, mid, up 0) | 16 channels
    assert [len(s) for s in q["segments"]] == [2, 6, 3]
    # cross-attention keys and values read the text states everywhere: one unbroken chain
    assert [len(s) for s in chains["attn2.to_k"]["segments"]] == [11]


def _export_trained_unet(out, res_type: str, pre_num: int, merge: str, **kwargs):
    """The report of a tiny UNet with random LoRA weights after training passes, exported with
    ``merge``: calibrated on two batches, measured on a third."""
    unet = add_reslora(
        tiny_sd_unet(), ResLoRAConfig(rank=2, res_type=res_type, pre_num=pre_num, record_norms=True)
    )
    randomize_lora(unet, scale=0.2)
    batches = [unet_inputs(unet, seed=s) for s in range(3)]
    train_forwards(unet, batches)
    calib, held_out = {"unet": batches[:2]}, {"unet": batches[2:]}
    return export_lora(out, unet=unet, merge=merge, calibration=calib, eval_inputs=held_out, **kwargs)


@pytest.mark.parametrize("res_type,pre_num", [("is", 1), ("ms", 2)])
def test_cross_attention_kv_merges_are_exact(tmp_path, res_type, pre_num):
    report = _export_trained_unet(tmp_path / "out", res_type, pre_num, "calibrated")
    methods = report["components"]["unet"]["methods"]
    # is: x_{n-1} = x_n gives alpha = 1 exactly; ms: only the calibrated merge is exact, since the
    # paper's scalar assumes A_{n-k} x ~ alpha A_n x, which differing A matrices break
    exact = ("input", "calibrated") if res_type == "is" else ("calibrated",)
    for method in exact:
        for chain in ("attn2.to_k", "attn2.to_v"):
            assert methods[method]["chains"][chain] < 1e-5, (method, chain)
    # self-attention chains are not exact: the report must say so
    assert methods["input"]["chains"]["attn1.to_q"] > 1e-4

    # without the per-chain part: the same totals, measured on the same inputs
    brief = _export_trained_unet(tmp_path / "brief", res_type, pre_num, "calibrated", chain_report=False)
    brief = brief["components"]["unet"]["methods"]
    assert brief == {m: {"total": result["total"]} for m, result in methods.items()}


def _pipe_with_reslora(make_pipe, tmp_path, res_type, pre_num=2, targets=None):
    pipe = make_pipe(tmp_path)
    config = ResLoRAConfig(
        rank=2, alpha=4, res_type=res_type, pre_num=pre_num, target_modules=targets, record_norms=True
    )
    add_reslora(pipe, config, train_text_encoder=True)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            randomize_lora(module, scale=0.1)
    unet_b = [unet_inputs(pipe.unet, seed=s) for s in range(3)]
    text_b = text_batches(3)
    train_forwards(pipe.unet, unet_b)
    train_forwards(pipe.text_encoder, text_b)
    if getattr(pipe, "text_encoder_2", None) is not None:
        train_forwards(pipe.text_encoder_2, text_b)
    return pipe, unet_b, text_b


def _export(pipe, out, unet_b, text_b, merge):
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        comps["text_encoder_2"] = pipe.text_encoder_2
    calib = {k: (unet_b[:2] if k == "unet" else text_b[:2]) for k in comps}
    held = {k: (unet_b[2:] if k == "unet" else text_b[2:]) for k in comps}
    return export_lora(out, merge=merge, calibration=calib, eval_inputs=held, **comps)


@pytest.mark.slow
@pytest.mark.parametrize("res_type", TYPES)
def test_load_lora_weights_reproduces_merged_model(tmp_path, res_type):
    pipe, unet_b, text_b = _pipe_with_reslora(tiny_sd_pipeline, tmp_path, res_type)
    out = tmp_path / "lora"
    report = _export(pipe, out, unet_b, text_b, "calibrated")
    assert json.loads((out / "merge_report.json").read_text()) == json.loads(json.dumps(report))

    fresh = tiny_sd_pipeline(tmp_path)
    fresh.load_lora_weights(str(out))  # no extra arguments
    for name, batch in (("unet", unet_b[2]), ("text_encoder", text_b[2])):
        module, loaded = getattr(pipe, name), getattr(fresh, name)
        reslora_out = call(module, batch)
        with merged_view(module, exported_lora(out, name, module)):
            merged_out = call(module, batch)
        got = call(loaded, batch)
        torch.testing.assert_close(got, merged_out, rtol=1e-4, atol=1e-5)
        err = float((got - reslora_out).norm() / reslora_out.norm())
        if res_type in ("none", "bs"):
            assert err < 1e-5
        else:
            assert err <= report["components"][name]["output_error"] * 1.001 + 1e-6
            assert err > 1e-6  # the approximation is real, and reported


@pytest.mark.parametrize("res_type", ["is", "bs", "ms"])
def test_scale_zero_exports_exactly_and_loads_with_load_lora_weights(tmp_path, res_type):
    pipe, unet_b, text_b = _pipe_with_reslora(tiny_sd_pipeline, tmp_path, res_type)
    for name in ("unet", "text_encoder"):
        set_shortcut_scale(getattr(pipe, name), 0.0)
    out = tmp_path / "lora"
    report = _export(pipe, out, unet_b, text_b, "calibrated")
    fresh = tiny_sd_pipeline(tmp_path)
    fresh.load_lora_weights(str(out))
    for name, batch in (("unet", unet_b[2]), ("text_encoder", text_b[2])):
        assert report["components"][name]["ranks"] == [2]  # bs at c = 0: rank r, not (m+1) r
        assert report["components"][name]["output_error"] < 1e-5
        reslora_out, got = call(getattr(pipe, name), batch), call(getattr(fresh, name), batch)
        assert float((got - reslora_out).norm() / reslora_out.norm()) < 1e-5, name


@pytest.mark.slow
def test_sequential_merge_is_reported_and_exact_on_cross_attention(tmp_path):
    report = _export_trained_unet(tmp_path / "out", "ms", 2, "sequential")
    unet_report = report["components"]["unet"]
    methods = unet_report["methods"]
    assert report["merge"] == "sequential" and set(methods) == {"input", "weight", "calibrated", "sequential"}
    assert unet_report["output_error"] == methods["sequential"]["total"] > 0
    for chain in ("attn2.to_k", "attn2.to_v"):  # the text states are the same for every layer
        assert methods["sequential"]["chains"][chain] < 1e-5, chain


@pytest.mark.slow
@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline])
def test_kohya_file_loads_to_the_same_weights(tmp_path, make_pipe):
    # attention and feed-forward layers: the training script's default targets
    targets = [*UNET_TARGETS, *UNET_FEEDFORWARD_TARGETS]
    pipe, unet_b, text_b = _pipe_with_reslora(make_pipe, tmp_path, "bs", targets=targets)
    out = tmp_path / "lora"
    _export(pipe, out, unet_b, text_b, "input")
    with safe_open(str(out / "lora_kohya.safetensors"), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        downs = {f.get_slice(k).get_shape()[0] for k in keys if k.endswith("lora_down.weight")}
    assert len(downs) == 1 and meta["ss_network_dim"] == str(downs.pop())
    assert meta["reslora_res_type"] == "bs" and meta["reslora_merge"] == "input"
    assert set(json.loads(meta["reslora_output_error"])) >= {"unet", "text_encoder"}
    if make_pipe is tiny_sdxl_pipeline:
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0.alpha" in keys
        assert "lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_k.lora_up.weight" in keys
        assert "lora_unet_output_blocks_2_1_transformer_blocks_0_ff_net_0_proj.lora_up.weight" in keys
        assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
        assert any(k.startswith("lora_te2_") for k in keys)
    else:
        assert meta["ss_base_model_version"] == "sd_v1"
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2.lora_down.weight" in keys
        assert "lora_te_text_model_encoder_layers_2_self_attn_out_proj.lora_up.weight" in keys

    via_diffusers, via_kohya = make_pipe(tmp_path), make_pipe(tmp_path)
    via_diffusers.load_lora_weights(str(out))
    via_kohya.load_lora_weights(str(out / "lora_kohya.safetensors"))
    for p in (via_diffusers, via_kohya):
        p.fuse_lora()
    for name in ("unet", "text_encoder", "text_encoder_2"):
        a, b = getattr(via_diffusers, name, None), getattr(via_kohya, name, None)
        if a is None:
            continue
        sa, sb = a.state_dict(), b.state_dict()
        base_keys = [k for k in sa if "lora" not in k]
        assert base_keys and all(torch.equal(sa[k], sb[k]) for k in base_keys), name


def test_a_pass_does_not_walk_the_unet_modules(monkeypatch):
    """The checkpointing check reads the flags found at attach: diffusers' own
    ``is_gradient_checkpointing`` walks every module, about 1 ms a pass on a small UNet (under
    torch.compile the root hooks run outside the graph, so that was the compiled gap to PEFT)."""
    unet = add_reslora(tiny_sd_unet(), ResLoRAConfig(rank=2, res_type="is"))
    kwargs = unet_inputs(unet)
    unet.train()(**kwargs)  # the tracing pass
    walks = []
    real = torch.nn.Module.modules
    monkeypatch.setattr(
        torch.nn.Module, "modules", lambda self: walks.append(type(self).__name__) or real(self)
    )
    unet(**kwargs)
    assert walks == []
    unet.enable_gradient_checkpointing()  # still seen
    unet(**kwargs)
    assert get_state(unet).recomputed


def test_pipeline_removal_restores_text_encoder_and_unet(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    kwargs, ids = unet_inputs(pipe.unet), text_batches(1)[0]
    before = call(pipe.unet, kwargs), call(pipe.text_encoder, ids)
    add_reslora(pipe, ResLoRAConfig(rank=2, res_type="ms"), train_text_encoder=True)
    randomize_lora(pipe.unet)
    randomize_lora(pipe.text_encoder)
    assert not torch.equal(call(pipe.text_encoder, ids), before[1])
    remove_reslora(pipe)
    assert torch.equal(call(pipe.unet, kwargs), before[0])
    assert torch.equal(call(pipe.text_encoder, ids), before[1])


def test_merge_cli_writes_files_and_a_fused_pipeline(tmp_path, capsys):
    base_dir, ckpt, pipe = saved_base_and_checkpoint(tmp_path)
    out = tmp_path / "merged"
    assert (
        merge_main([str(ckpt), "--base", str(base_dir), "--output", str(out), "--fuse", "--rank", "4"]) == 0
    )
    assert {p.name for p in out.iterdir()} == {
        "pytorch_lora_weights.safetensors",
        "lora_kohya.safetensors",
        "merge_report.json",
        "fused_pipeline",
    }
    report = json.loads((out / "merge_report.json").read_text())
    assert report["components"]["unet"]["ranks"] == [2, 4]  # bs pre_num 2 stacks to 6, truncated to 4
    fused = DiffusionPipeline.from_pretrained(str(out / "fused_pipeline"))
    base = DiffusionPipeline.from_pretrained(str(base_dir))
    # exactly the base architecture: same modules, same parameter count, same processors
    assert [type(m) for m in fused.unet.modules()] == [type(m) for m in base.unet.modules()]
    assert sum(p.numel() for p in fused.unet.parameters()) == sum(p.numel() for p in base.unet.parameters())
    kwargs = unet_inputs(pipe.unet)
    with merged_view(pipe.unet, exported_lora(out, "unet", pipe.unet)):
        want = call(pipe.unet, kwargs)
    torch.testing.assert_close(call(fused.unet, kwargs), want, rtol=1e-4, atol=1e-5)


def test_merge_cli_refuses_other_base_and_writes_nothing(tmp_path, capsys):
    _, ckpt, _ = saved_base_and_checkpoint(tmp_path)
    other_dir = tmp_path / "other"
    tiny_sdxl_pipeline(tmp_path).save_pretrained(str(other_dir))
    out = tmp_path / "merged"
    assert merge_main([str(ckpt), "--base", str(other_dir), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "key 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A'" in err
        or "key 'unet." in err
    )
    assert not out.exists()


def test_export_argument_errors(tmp_path):
    unet = add_reslora(tiny_sd_unet(), ResLoRAConfig(rank=2, res_type="bs"))
    with pytest.raises(RuntimeError, match="forward"):
        export_lora(tmp_path / "x", unet=unet)
    call(unet, unet_inputs(unet))
    with pytest.raises(ValueError, match="formats"):
        export_lora(tmp_path / "x", unet=unet, formats=("ckpt",))
    assert not (tmp_path / "x").exists()
