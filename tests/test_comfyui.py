"""The ComfyUI layout of FLUX.2 and Wan LoRAs (``lora_comfyui.safetensors``): every adapted
module under the name ComfyUI's model gives it, against a statement of ComfyUI's layout written
out here (the module names of its ``Flux2``/``WanModel`` classes, checked by hand with ComfyUI
v0.8.0), and loaded by diffusers' own converters to the weights of the diffusers file."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from reslora_diffusers import ResLoRAConfig, add_reslora, export_lora
from reslora_diffusers.export.loading import check_lora_file, load_lora_file, lora_file_components
from reslora_diffusers.frontends import frontend_for
from reslora_diffusers.merge.error import output_tensor
from reslora_diffusers.utils.safety import save_safetensors
from tests.tiny_flux2 import tiny_flux2_pipeline
from tests.tiny_pipes import tiny_sd_pipeline
from tests.tiny_wan import tiny_wan_pipeline
from tests.toys import randomize_lora

PIPES = {"flux2": tiny_flux2_pipeline, "wan": tiny_wan_pipeline}

#: ComfyUI's module for each diffusers module, per block kind (``{}``: the block index)
FLUX2_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
#: q, k and v are one linear in ComfyUI, its output rows q, then k, then v
FLUX2_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}
FLUX2_FUSED["txt_attn.qkv"] = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
FLUX2_OTHERS = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # (shift, scale) there, (scale, shift) here
}
WAN_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
WAN_OTHERS = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "proj_out": "head.head",
}


def expected_layout(family: str, model: nn.Module) -> dict[str, list[str]]:
    """``{ComfyUI module: [the diffusers modules it holds]}`` for every linear layer of ``model``
    (an adapted one by the path of the module it wraps)."""
    out = {}
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        path = path.removesuffix(".base_layer")
        parts = path.split(".")
        if family == "wan":
            if parts[0] == "blocks":
                out[f"blocks.{parts[1]}.{WAN_BLOCK['.'.join(parts[2:])]}"] = [path]
            else:
                out[WAN_OTHERS[path]] = [path]
        elif parts[0] == "single_transformer_blocks":
            out[f"single_blocks.{parts[1]}.{FLUX2_SINGLE['.'.join(parts[2:])]}"] = [path]
        elif parts[0] == "transformer_blocks":
            inner = ".".join(parts[2:])
            fused = next((c for c, members in FLUX2_FUSED.items() if inner in members), None)
            if fused:
                out[f"double_blocks.{parts[1]}.{fused}"] = [
                    f"transformer_blocks.{parts[1]}.{m}" for m in FLUX2_FUSED[fused]
                ]
            else:
                out[f"double_blocks.{parts[1]}.{FLUX2_DOUBLE[inner]}"] = [path]
        else:
            out[FLUX2_OTHERS[path]] = [path]
    return out


def _exported(family, tmp_path, targets=None):
    """The family's tiny pipeline with ResLoRA bs (exact merge) on ``targets`` (default: every
    linear layer), traced and exported in both formats."""
    pipe = PIPES[family](tmp_path)
    model = pipe.transformer
    if targets is None:
        targets = sorted({p for p, m in model.named_modules() if isinstance(m, nn.Linear)})
    add_reslora(model, ResLoRAConfig(rank=2, res_type="bs", target_modules=targets, exclude_modules=[]))
    randomize_lora(model, scale=0.1)
    with torch.no_grad():
        model(**frontend_for(model).synthetic_inputs(model, num=1)[0])
    out = tmp_path / "out"
    export_lora(out, transformer=model, chain_report=False)
    base = tmp_path / "base"
    PIPES[family](tmp_path).save_pretrained(base)
    return model, out, base


@pytest.mark.parametrize("family", PIPES)
def test_every_module_is_written_under_its_comfyui_name(family, tmp_path):
    model, out, _ = _exported(family, tmp_path)
    comfy = load_file(out / "lora_comfyui.safetensors")
    plain = {
        k.removeprefix("transformer."): v
        for k, v in load_file(out / "pytorch_lora_weights.safetensors").items()
    }
    layout = expected_layout(family, model)
    assert set(comfy) == {f"diffusion_model.{c}.lora_{ab}.weight" for c in layout for ab in "AB"}
    for name, members in layout.items():
        a, b = comfy[f"diffusion_model.{name}.lora_A.weight"], comfy[f"diffusion_model.{name}.lora_B.weight"]
        factors = [(plain[f"{m}.lora_A.weight"], plain[f"{m}.lora_B.weight"]) for m in members]
        if len(members) == 1 and name.endswith("adaLN_modulation.1"):
            half = b.shape[0] // 2
            torch.testing.assert_close(torch.cat([b[half:], b[:half]]), factors[0][1])
            torch.testing.assert_close(a, factors[0][0])
            continue
        # fused: B A is every member's update, stacked in output order
        torch.testing.assert_close(b @ a, torch.cat([fb @ fa for fa, fb in factors]), rtol=1e-5, atol=1e-7)
        assert a.shape[0] == sum(fa.shape[0] for fa, _ in factors)


def test_an_unadapted_projection_of_a_fused_linear_gets_zero_rows(tmp_path):
    model, out, _ = _exported("flux2", tmp_path, targets=["to_q", "to_v"])
    comfy = load_file(out / "lora_comfyui.safetensors")
    a, b = (
        comfy["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"],
        comfy["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"],
    )
    inner = model.transformer_blocks[0].attn.to_k.out_features  # not adapted
    assert a.shape[0] == 2 * 2 and b.shape == (3 * inner, 4)
    assert torch.equal(b[inner : 2 * inner], torch.zeros(inner, 4))


@pytest.mark.parametrize(
    ("family", "targets"),
    [
        ("flux2", None),  # every linear layer but the final norm's (see below)
        ("flux2", ["to_q", "to_v", "to_qkv_mlp_proj"]),
        ("wan", None),
        ("wan", ["to_q", "to_k"]),
    ],
)
def test_diffusers_loads_the_comfyui_file_to_the_diffusers_files_weights(family, targets, tmp_path):
    """Through ``_convert_non_diffusers_*_lora_to_diffusers``. FLUX.2's final norm is left out:
    diffusers' converter reads ``final_layer.adaLN_modulation.1`` without the (shift, scale) swap
    its own checkpoint converter makes, so only the ComfyUI order is right for ComfyUI there."""
    if targets is None:
        pipe = PIPES[family](tmp_path)
        targets = sorted(
            p
            for p, m in pipe.transformer.named_modules()
            if isinstance(m, nn.Linear) and p != "norm_out.linear"
        )
    model, out, base = _exported(family, tmp_path, targets)
    batch = frontend_for(model).synthetic_inputs(model, num=1, seed=5)[0]
    outputs = {}
    for name in ("pytorch_lora_weights.safetensors", "lora_comfyui.safetensors"):
        pipe = DiffusionPipeline.from_pretrained(base)
        load_lora_file(pipe, out / name)  # checked against the pipeline, then load_lora_weights
        with torch.no_grad():
            outputs[name] = output_tensor(pipe.transformer(**batch))
    with torch.no_grad():
        want = output_tensor(model(**batch))
    torch.testing.assert_close(
        outputs["lora_comfyui.safetensors"], outputs["pytorch_lora_weights.safetensors"]
    )
    torch.testing.assert_close(outputs["lora_comfyui.safetensors"], want, rtol=1e-4, atol=1e-5)


def test_a_comfyui_file_is_checked_against_the_pipeline(tmp_path):
    _, out, base = _exported("wan", tmp_path, targets=["to_q"])
    path = out / "lora_comfyui.safetensors"
    assert lora_file_components(path) == {"transformer"}
    pipe = DiffusionPipeline.from_pretrained(base)
    assert check_lora_file(pipe, path) == path
    wrong = load_file(path)
    wrong["diffusion_model.blocks.0.self_attn.q.lora_A.weight"] = torch.zeros(2, 5)
    save_safetensors(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(
        ValueError, match=r"key 'diffusion_model.blocks.0.self_attn.q.lora_A.weight' has shape \(2, 5\)"
    ):
        check_lora_file(pipe, tmp_path / "wrong.safetensors")
    save_safetensors(
        {"diffusion_model.blocks.9.self_attn.q.lora_A.weight": torch.zeros(2, 16)}, tmp_path / "x.safetensors"
    )
    with pytest.raises(ValueError, match="names no linear layer of this wan pipeline's transformer"):
        check_lora_file(pipe, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="no ComfyUI-layout file for stable_diffusion pipelines"):
        check_lora_file(tiny_sd_pipeline(tmp_path / "sd"), path)


def test_unet_families_write_no_comfyui_file(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    add_reslora(pipe.unet, ResLoRAConfig(rank=2, res_type="none"))
    with pytest.raises(ValueError, match="no ComfyUI-layout file for stable_diffusion pipelines"):
        export_lora(tmp_path / "out", unet=pipe.unet, formats=("comfyui",))
