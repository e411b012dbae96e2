"""merge="distill": the calibrated merge refined by gradient steps on the ResLoRA model's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from reslora_diffusers import ResLoRAConfig, add_reslora, export_lora, export_peft_adapter, merge_to_lora
from reslora_diffusers.cli import merge_main
from reslora_diffusers.merge import merged_view, relative_error
from tests.tiny_lms import ids, out, tiny, with_reslora
from tests.tiny_pipes import (
    call,
    exported_lora,
    saved_base_and_checkpoint,
    tiny_sd_pipeline,
    train_forwards,
    unet_inputs,
)
from tests.toys import ResidualStack, randomize_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("res_type", ["is", "ms"])
def test_distill_lowers_the_error_where_the_calibrated_merge_is_inexact(res_type):
    torch.manual_seed(0)
    config = ResLoRAConfig(rank=3, alpha=6, res_type=res_type, pre_num=2, target_modules=["proj"])
    model = add_reslora(ResidualStack(), config)
    randomize_lora(model, 0)
    calib = [torch.randn(128, 8) for _ in range(2)]
    held_out = [torch.randn(128, 8) for _ in range(2)]
    model(calib[0])  # trace the chains
    calibrated = merge_to_lora(model, "calibrated", calibration=calib, eval_inputs=held_out)
    distilled = merge_to_lora(model, "distill", calibration=calib, eval_inputs=held_out, distill_steps=60)
    info = distilled.report.distill
    assert calibrated.report.output_error > 0.05  # x_{n-1} is not linear in x_n: inexact
    # the fit starts from the calibrated merge, measured on the same batches by a second path
    assert info["calibration_error_before"] == pytest.approx(relative_error(model, calibrated, calib))
    assert info["held_out_error_before"] == pytest.approx(calibrated.report.output_error)
    assert info["calibration_error_after"] < 0.8 * info["calibration_error_before"]
    assert distilled.report.output_error == info["held_out_error_after"] < calibrated.report.output_error
    assert {k: v.shape for k, v in distilled.items()} == {k: v.shape for k, v in calibrated.items()}
    # the ResLoRA model itself is untouched and its parameters got no gradient
    assert all(p.grad is None for p in model.parameters())


def test_distill_is_skipped_where_the_merge_is_exact():
    model = add_reslora(ResidualStack(), ResLoRAConfig(rank=3, res_type="bs", target_modules=["proj"]))
    randomize_lora(model, 0)
    x = torch.randn(16, 8)
    model(x)
    merged = merge_to_lora(model, "distill", eval_inputs=[x])
    assert merged.report.distill == {} and merged.report.output_error < 1e-6


@pytest.mark.slow
def test_distilled_diffusers_file_loads_to_the_distilled_model(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    unet = add_reslora(pipe.unet, ResLoRAConfig(rank=2, res_type="is"))
    randomize_lora(unet, scale=0.2)
    batches = [unet_inputs(unet, seed=s) for s in range(3)]
    train_forwards(unet, batches)
    out_dir = tmp_path / "lora"
    report = export_lora(
        out_dir,
        unet=unet,
        merge="distill",
        calibration={"unet": batches[:2]},
        distill_steps=15,
        eval_inputs={"unet": batches[2:]},
    )
    comp = report["components"]["unet"]
    assert (
        json.loads((out_dir / "merge_report.json").read_text())["components"]["unet"]["distill"]
        == comp["distill"]
    )
    assert comp["distill"]["calibration_error_after"] < comp["distill"]["calibration_error_before"]
    assert comp["output_error"] == comp["methods"]["distill"]["total"]
    fresh = tiny_sd_pipeline(tmp_path)
    fresh.load_lora_weights(str(out_dir))
    with merged_view(unet, exported_lora(out_dir, "unet", unet)):
        want = call(unet, batches[2])
    torch.testing.assert_close(call(fresh.unet, batches[2]), want, rtol=1e-4, atol=1e-5)
    reslora = call(unet, batches[2])
    err = float((call(fresh.unet, batches[2]) - reslora).norm() / reslora.norm())
    assert err == pytest.approx(comp["output_error"], rel=1e-3)


def test_distilled_peft_adapter_loads_to_the_distilled_model(tmp_path):
    model = with_reslora("llama", "ms", scale=0.05)
    calib = [{"input_ids": ids(4, 8, seed=s)} for s in (5, 6)]
    held_out = ids(2, 8, seed=7)
    y = out(model, held_out).double()
    calibrated = merge_to_lora(model, "calibrated", calibration=calib, eval_inputs=[held_out])
    merged = export_peft_adapter(
        model, tmp_path, "distill", calibration=calib, eval_inputs=[held_out], distill_steps=30
    )
    assert (
        merged.report.distill["calibration_error_after"] < merged.report.distill["calibration_error_before"]
    )
    peft = PeftModel.from_pretrained(tiny("llama"), str(tmp_path)).eval()
    err = float((out(peft, held_out).double() - y).norm() / y.norm())
    assert err == pytest.approx(merged.report.output_error, rel=1e-3)
    assert merged.report.output_error < calibrated.report.output_error
    assert json.loads((tmp_path / "merge_report.json").read_text())["distill"]["steps"] == 30


@pytest.mark.slow
def test_merge_cli_distills_a_saved_checkpoint(tmp_path, capsys):
    base_dir, ckpt, _ = saved_base_and_checkpoint(tmp_path, res_type="is")
    out_dir = tmp_path / "merged"
    argv = [str(ckpt), "--base", str(base_dir), "--output", str(out_dir), "--no_chain_report"]
    assert merge_main([*argv, "--merge", "distill", "--distill_steps", "5"]) == 0
    report = json.loads((out_dir / "merge_report.json").read_text())
    assert report["merge"] == "distill"
    for name in ("unet", "text_encoder"):
        info = report["components"][name]["distill"]
        assert info["steps"] == 5
        assert info["calibration_error_after"] <= info["calibration_error_before"]
    assert merge_main([*argv, "--overwrite", "--merge", "distill", "--distill_steps", "-1"]) == 2
    assert "--distill_steps -1 must be >= 0" in capsys.readouterr().err
