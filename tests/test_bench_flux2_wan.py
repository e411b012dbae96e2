"""The FLUX.2 and Wan rows of the benchmarks: ``bench_memory.py`` feeds each denoiser what the
training script does, and ``bench_step.py``'s PEFT LoRA adapts the very modules ResLoRA does."""

from __future__ import annotations

import pytest
import torch

from reslora_diffusers.core import get_state
from tests.scripts import load_benchmark

bench_memory = load_benchmark("bench_memory")
bench_step = load_benchmark("bench_step")


def test_bench_memory_feeds_flux2_and_wan_what_the_training_script_does():
    """FLUX.2: latents at pixels / 8 in 2 x 2 patches and 512 Mistral tokens; Wan: a clip of the
    script's 33 frames (9 latent frames) and 512 UMT5 tokens; built directly in bf16."""
    flux2 = bench_memory.build_denoiser("flux2", 0.05, torch.bfloat16)
    assert {p.dtype for p in flux2.parameters()} == {torch.bfloat16}
    inputs = bench_memory.make_inputs(flux2, "flux2", 128, 2)
    assert inputs["hidden_states"].shape[:2] == (2, 8 * 8) and inputs["img_ids"].shape == (64, 4)
    assert inputs["encoder_hidden_states"].shape[:2] == (2, 512) and inputs["txt_ids"].shape == (512, 4)
    wan = bench_memory.build_denoiser("wan", 0.05, torch.bfloat16)
    clip = bench_memory.make_inputs(wan, "wan", 128, 1)
    assert clip["hidden_states"].shape == (1, 16, 9, 16, 16)
    assert clip["encoder_hidden_states"].shape[:2] == (1, 512)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert flux2(**inputs).sample.shape == inputs["hidden_states"].shape
        assert wan(**clip).sample.shape == clip["hidden_states"].shape


def test_bench_step_peft_adapts_the_modules_reslora_does():
    """The default targets name FLUX.2's single blocks' ``attn.to_out`` linears, which a double
    block's ``attn.to_out`` (a ModuleList) shares a suffix with: PEFT gets their paths."""
    for model in ("flux2", "wan"):
        base, inputs = bench_step.make_model(model, bench_step.SIZES[model]["small"], "small")
        for targets in bench_step.TARGET_SETS[model].values():
            peft, _ = bench_step.peft_variant(base, 4, targets)
            reslora, _ = bench_step.reslora_variant(base, 4, "bs", 1, targets)
            with_lora = {
                p.removesuffix(".base_layer") for p, m in peft.named_modules() if hasattr(m, "lora_A")
            }
            assert with_lora == set(get_state(reslora).blocks), (model, targets)
        step = bench_step.Step(
            reslora, [p for b in get_state(reslora).blocks.values() for p in (b.lora_A, b.lora_B)], inputs
        )
        wall, cpu = step()
        assert wall > 0 and cpu > 0


def test_bench_step_names_the_variant_its_inference_forward_needs(monkeypatch, capsys):
    """The inference forward fuses the ``bs:5`` variant: without it, and without
    ``--no_inference``, the run stops before building a model, naming both."""
    argv = ["bench_step.py", "--model", "wan", "--sizes", "small", "--variants", "none:1"]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit):
        bench_step.main()
    assert "add bs:5 to --variants or pass --no_inference" in capsys.readouterr().err
