"""A new LoRA file format is one file: defined here alone (keys ``<component>.<path>.down`` /
``.up``, for UNet pipelines only) and registered, it is written by ``export_lora`` and
``reslora-merge``, listed by the run folder and the model card, read back, checked and loaded
by ``load_lora_file``, and refused for the families it does not apply to."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from reslora_diffusers import ResLoRAConfig, add_reslora, export_lora, save_reslora_checkpoint
from reslora_diffusers.cli import merge_main
from reslora_diffusers.export import LoRAFormat, register_format, unregister_format
from reslora_diffusers.export.loading import check_lora_file, load_lora_file, lora_file_components
from reslora_diffusers.training.card import files_text
from reslora_diffusers.training.run_folder import RunFolder
from reslora_diffusers.utils.safety import save_safetensors
from tests.tiny_dits import tiny_sd3_pipeline
from tests.tiny_pipes import tiny_sd_pipeline, unet_inputs
from tests.toys import randomize_lora


class DownUpFormat(LoRAFormat):
    """``<component>.<path>.down`` (A) and ``.up`` (B), for pipelines with a ``unet``."""

    name = "downup"
    file_name = "lora_downup.safetensors"
    description = "down/up keys"
    key_names = "down/up"

    def applies_to(self, family):
        return family.denoiser == "unet"

    def write(self, path, loras, components, report, metadata=None):
        tensors = {}
        for component, lora in loras.items():
            for key, value in lora.items():
                path_, factor = key.removesuffix(".weight").rsplit(".lora_", 1)
                suffix = "down" if factor == "A" else "up"
                tensors[f"{component}.{path_}.{suffix}"] = value.detach().cpu().contiguous()
        save_safetensors(tensors, path)

    def owns(self, keys):
        return any(k.endswith((".down", ".up")) for k in keys)

    def components(self, keys):
        return {k.partition(".")[0] for k in keys if k.endswith((".down", ".up"))}

    def check(self, pipe, filename, shapes):
        for key in sorted(shapes):
            if getattr(pipe, key.partition(".")[0], None) is None:
                raise ValueError(f"{filename}: key {key!r} is for a component this pipeline lacks")

    def load(self, pipe, path):
        as_diffusers = {
            k.removesuffix(".down") + ".lora_A.weight"
            if k.endswith(".down")
            else k.removesuffix(".up") + ".lora_B.weight": v
            for k, v in load_file(str(path)).items()
        }
        pipe.load_lora_weights(as_diffusers)


@pytest.fixture
def downup():
    fmt = register_format(DownUpFormat())
    yield fmt
    unregister_format(fmt.name)


def _exported(tmp_path: Path) -> tuple[DiffusionPipeline, Path, Path]:
    """A tiny SD pipeline saved as the base, its UNet with ResLoRA ``bs`` (exact merge), traced."""
    pipe = tiny_sd_pipeline(tmp_path)
    base = tmp_path / "base"
    pipe.save_pretrained(str(base))
    add_reslora(pipe.unet, ResLoRAConfig(rank=2, res_type="bs"))
    randomize_lora(pipe.unet)
    with torch.no_grad():
        pipe.unet(**unet_inputs(pipe.unet))
    return pipe, base, tmp_path / "out"


def test_a_format_defined_in_one_file_is_written_read_and_loaded(tmp_path, downup):
    pipe, base, out = _exported(tmp_path)
    export_lora(out, unet=pipe.unet, formats=("diffusers", "downup"))
    assert (out / "lora_downup.safetensors").is_file()
    assert lora_file_components(out / "lora_downup.safetensors") == {"unet"}

    loaded = {}
    for name in ("pytorch_lora_weights.safetensors", "lora_downup.safetensors"):
        fresh = DiffusionPipeline.from_pretrained(str(base))
        assert load_lora_file(fresh, out / name) == out / name
        with torch.no_grad():
            loaded[name] = fresh.unet(**unet_inputs(fresh.unet)).sample
    torch.testing.assert_close(loaded["lora_downup.safetensors"], loaded["pytorch_lora_weights.safetensors"])

    lacking = tmp_path / "bad.safetensors"
    save_safetensors({"transformer.x.down": torch.zeros(2, 2)}, lacking)
    with pytest.raises(ValueError, match="key 'transformer.x.down' is for a component this pipeline lacks"):
        check_lora_file(DiffusionPipeline.from_pretrained(str(base)), lacking)


@pytest.mark.slow
def test_the_merge_cli_run_folder_and_model_card_know_a_registered_format(tmp_path, downup, capsys):
    pipe, base, _ = _exported(tmp_path)
    checkpoint = save_reslora_checkpoint({"unet": pipe.unet}, tmp_path / "reslora.safetensors")
    out = tmp_path / "merged"
    assert merge_main([str(checkpoint), "--base", str(base), "--output", str(out), "--format", "downup"]) == 0
    assert {p.name for p in out.iterdir()} == {"lora_downup.safetensors", "merge_report.json"}
    argv = [str(checkpoint), "--base", str(base), "--output", str(out), "--format", "both", "--overwrite"]
    assert merge_main(argv) == 0
    names = {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "lora_downup.safetensors"}
    assert {p.name for p in out.iterdir()} == {*names, "merge_report.json"}
    assert {p.name for p in RunFolder(out).outputs("logs")} == {*names, "merge_report.json"}
    # every registered format's file name, written or not (ComfyUI's is for FLUX.2 and Wan)
    assert {p.name for p in RunFolder(out).lora_files().values()} == {*names, "lora_comfyui.safetensors"}

    args = argparse.Namespace(use_peft=False, checkpointing_steps=0, report_to="none", logging_dir="logs")
    assert "`lora_downup.safetensors` (down/up keys)" in files_text(args, ("diffusers", "downup"))


def test_a_format_is_refused_for_the_families_it_does_not_apply_to(tmp_path, downup):
    pipe = tiny_sd3_pipeline(tmp_path)
    add_reslora(pipe.transformer, ResLoRAConfig(rank=2, res_type="none"))
    with pytest.raises(ValueError, match="no downup file for stable_diffusion_3 pipelines"):
        export_lora(tmp_path / "out", transformer=pipe.transformer, formats=("downup",))
    assert not (tmp_path / "out").exists()
