"""benchmarks/compare_methods.py and compare_lm.py: the summary maths on hand-made runs."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.scripts import load_benchmark

compare = load_benchmark("compare_methods")


def _run(losses, accuracy, unmerged=None, merge_error=None):
    return {
        "loss": losses,
        "accuracy": dict(zip([0, 10, 20], accuracy)),
        "unmerged_accuracy": unmerged,
        "merge_error": merge_error,
        "seconds": 60.0,
    }


def test_summary_pairs_losses_by_seed_and_finds_steps_to_the_baseline():
    base = [_run([1.0] * 20, [0.0, 0.2, 0.4]), _run([3.0] * 20, [0.0, 0.2, 0.6])]
    # 0.1 and 0.3 below the same seed's baseline: a paired difference of -0.2 +- 0.1, although the
    # losses themselves spread by 0.9 between seeds
    other = [
        _run([1.0] * 10 + [0.9] * 10, [0.0, 0.5, 0.5], 0.7, 1e-3),
        _run([3.0] * 10 + [2.7] * 10, [0.0, 0.6, 0.7], 0.5, 2e-3),
    ]
    table = compare.summarise({"peft-lora": dict(enumerate(base)), "ms": dict(enumerate(other))})
    ms = table["ms"]
    assert ms["final_loss"] == pytest.approx((1.8, 0.9))
    assert ms["loss_vs_baseline"] == pytest.approx((-0.2, 0.1))
    assert table["peft-lora"]["loss_vs_baseline"] == pytest.approx((0.0, 0.0))
    assert ms["unmerged_accuracy"] == pytest.approx((0.6, 0.1))
    assert table["peft-lora"]["unmerged_accuracy"] is None
    # the baseline ends at a mean 0.5; ms's mean curve (0, 0.55, 0.6) reaches it at step 10
    assert ms["steps_to_baseline"] == 10 and table["peft-lora"]["steps_to_baseline"] == 20

    args = argparse.Namespace(seeds=[0, 1], max_train_steps=20, num_validation_images=1, validation_steps=10)
    text = compare.markdown(table, args)
    assert (
        "| ms | 0, 1 | 1.8000 +- 0.9000 | -0.20000 +- 0.10000 | 60.0% +- 10.0% | 60.0% +- 10.0% | 10 | 2.0e-03 (max) |"
        in text
    )


def test_bootstrap_interval_on_written_out_distributions():
    # constant values: every resample has the same mean
    assert compare.bootstrap_interval([0.5] * 5) == (0.5, 0.5, 0.5)
    # two values: resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5 %
    # and 97.5 % quantiles are 0 and 1
    assert compare.bootstrap_interval([0.0, 1.0]) == (0.5, 0.0, 1.0)
    # one 1 in four: the number of 1s in a resample is Binomial(4, 1/4); P(0) = 0.316 covers the
    # 2.5 % quantile, P(<= 2) = 0.949 < 0.975 <= P(<= 3) = 0.996 puts the 97.5 % one at 3/4
    assert compare.bootstrap_interval([0.0, 0.0, 0.0, 1.0]) == (0.25, 0.0, 0.75)
    with pytest.raises(ValueError, match="non-empty"):
        compare.bootstrap_interval([])


def _measured(step_accuracies: dict[str, dict[str, float]]) -> dict:
    return {
        "measurements": {
            step: {kind: {"prompt_accuracy": acc} for kind, acc in kinds.items()}
            for step, kinds in step_accuracies.items()
        }
    }


def test_intervals_pair_each_seed_with_the_baseline_run_of_the_same_seed():
    # three seeds; the baseline's exported accuracy spreads 0.5..0.6 between seeds
    base = {
        seed: _measured({s: {"calibrated": a, "unmerged": a} for s in ("4", "8")})
        for seed, a in zip((0, 1, 2), (0.5, 0.5, 0.6))
    }
    # given in another order than the baseline's: pairs go by seed
    runs = {
        seed: _measured({s: {"calibrated": e, "distill": d, "unmerged": u} for s in ("4", "8")})
        for seed, (e, d, u) in zip((2, 0, 1), ((0.7, 0.7, 0.7), (0.6, 0.6, 0.7), (0.5, 0.6, 0.7)))
    }
    assert compare.paired_differences(runs, base, "8", "calibrated") == pytest.approx([0.1, 0.0, 0.1])
    assert compare.paired_differences(runs, base, "8", "distill") == pytest.approx([0.1, 0.1, 0.1])
    table = compare.interval_table({"peft-lora": base, "is": runs}, [4, 8])
    assert set(table) == {"peft-lora", "is", "is+distill"}
    cells = table["is"]["8"]
    # differences 0.1, 0, 0.1: a resample of three is all zeros with probability 1/27 = 0.037
    # (> 2.5 %, so the low end is 0) and zero-free with probability 8/27 (the high end is 0.1)
    assert cells["vs_baseline"] == pytest.approx((0.2 / 3, 0.0, 0.1))
    assert cells["unmerged"] == pytest.approx((0.7, 0.7, 0.7))
    assert table["is+distill"]["4"]["vs_baseline"] == pytest.approx((0.1, 0.1, 0.1))
    assert table["peft-lora"]["8"]["vs_baseline"] == (0.0, 0.0, 0.0)
    text = compare.interval_markdown(table, [4, 8], 60)
    assert "| is+distill | 0, 1, 2 | 63.3 [60.0, 70.0] | 70.0 [70.0, 70.0] | +10.0 [+10.0, +10.0] |" in text
    assert "60 images per accuracy" in text


def test_intervals_in_the_nearest_template_reading_pair_that_reading():
    def run(base_open, base_near, unmerged_near):
        return {
            "measurements": {
                "8": {
                    "calibrated": {"prompt_accuracy": base_open, "prompt_accuracy_lenient": base_near},
                    "unmerged": {"prompt_accuracy": base_open, "prompt_accuracy_lenient": unmerged_near},
                }
            }
        }

    base = {0: run(0.0, 0.5, 0.5), 1: run(0.1, 0.5, 0.5)}
    ms = {0: run(0.0, 0.7, 0.8), 1: run(0.1, 0.9, None)}  # the second measured before both were kept
    near = compare.interval_table({"peft-lora": base, "ms": ms}, [8], "prompt_accuracy_lenient")
    assert near["ms"]["8"]["vs_baseline"] == pytest.approx((0.3, 0.2, 0.4))
    assert near["ms"]["8"]["exported"] == pytest.approx((0.8, 0.7, 0.9))
    assert near["ms"]["8"]["unmerged"] is None
    assert compare.interval_table({"peft-lora": base, "ms": ms}, [8])["ms"]["8"]["vs_baseline"] == (0, 0, 0)
    text = compare.interval_markdown(near, [8], 80, "nearest-template")
    assert text.startswith("Nearest-template reading.")
    assert "| ms | 0, 1 | 80.0 [70.0, 90.0] | n/a | +30.0 [+20.0, +40.0] |" in text


def test_a_finished_result_json_resumes_without_its_run_folder(tmp_path):
    # every measurement is there: nothing is trained, exported or read from train_log.jsonl
    cell = {"prompt_accuracy": 0.5, "prompt_accuracy_lenient": 0.75}
    result = {"measurements": {step: {"unmerged": cell, "calibrated": cell} for step in ("4", "8")}}
    args = argparse.Namespace(max_train_steps=8, compare_step=4)
    compare.measure_run(None, "bs", [], result, args, tmp_path)
    assert result["measurements"]["8"]["calibrated"] == cell
    assert list(tmp_path.iterdir()) == []


def test_a_run_kept_in_the_results_dir_counts_as_done(tmp_path):
    cell = {"prompt_accuracy": 0.25, "prompt_accuracy_lenient": 0.5}
    kept = {
        "loss": [1.0, 0.9],
        "accuracy": {"4": 0.25},
        "accuracy_lenient": {"4": 0.5},
        "merge_error": 0.0,
        "seconds": 1.0,
        "unmerged_accuracy": 0.25,
        "measurements": {step: {"unmerged": cell, "calibrated": cell} for step in ("4", "8")},
    }
    (tmp_path / "kept" / "bs-seed3").mkdir(parents=True)
    (tmp_path / "kept" / "bs-seed3" / "result.json").write_text(json.dumps(kept))
    args = compare.parse_args(
        ["--max_train_steps", "8", "--validation_steps", "4", "--compare_step", "4"]
        + ["--output_dir", str(tmp_path / "out"), "--results_dir", str(tmp_path / "kept")]
    )
    result = compare.run_one("bs", 3, args)  # a trained run would leave its log and weights in out/
    assert result["accuracy"] == {4: 0.25} and result["measurements"]["8"]["calibrated"] == cell
    assert [p.name for p in (tmp_path / "out" / "bs-seed3").iterdir()] == ["result.json"]
    assert (
        json.loads((tmp_path / "kept" / "bs-seed3" / "result.json").read_text())["measurements"]
        == (kept["measurements"])
    )


def test_the_locon_cosine_recipe_reaches_the_training_script_and_the_users_flags_win(tmp_path):
    script = compare.load_train_script()
    common = ["--output_dir", str(tmp_path)]
    plain = script.parse_args(compare.train_argv("bs", 0, compare.parse_args(common)))
    assert plain.target_modules is None and plain.lr_scheduler == "constant"  # the script's defaults
    args = compare.parse_args([*common, "--recipe", "locon-cosine"])
    locon = script.parse_args(compare.train_argv("bs", 0, args))
    expected = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    expected += ["conv1", "conv2", "conv_shortcut", "conv"]
    assert locon.target_modules == expected and locon.lr_scheduler == "cosine"
    assert locon.res_type == "bs" and locon.seed == 0
    args = compare.parse_args([*common, "--recipe", "locon-cosine", "--", "--lr_scheduler", "linear"])
    assert script.parse_args(compare.train_argv("peft-lora", 1, args)).lr_scheduler == "linear"


def test_the_locon_cosine_recipe_refuses_a_base_without_a_unet(tmp_path, capsys):
    for base, found in (("dit", "transformer"), (str(tmp_path), None)):
        with pytest.raises(SystemExit):
            compare.parse_args(["--recipe", "locon-cosine", "--base", base])
        assert f"is for a base with a unet; --base {base} has a {found}" in capsys.readouterr().err
    (tmp_path / "unet").mkdir()
    assert compare.parse_args(["--recipe", "locon-cosine", "--base", str(tmp_path)]).base == str(tmp_path)


def test_the_dit_recipe_trains_both_streams_with_a_cosine_rate_on_dit_bases_only(tmp_path, capsys):
    script = compare.load_train_script()
    args = compare.parse_args(["--output_dir", str(tmp_path), "--base", "dit", "--recipe", "dit-ff-cosine"])
    dit = script.parse_args(compare.train_argv("ms-cosine", 2, args))
    attention = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    feedforward = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    assert dit.target_modules == attention + feedforward and dit.lr_scheduler == "cosine"
    assert dit.res_type == "ms" and dit.shortcut_schedule == "cosine" and dit.seed == 2
    folder = tmp_path / "base"
    (folder / "transformer").mkdir(parents=True)
    assert compare.parse_args(["--recipe", "dit-ff-cosine", "--base", str(folder)]).base == str(folder)
    with pytest.raises(SystemExit):
        compare.parse_args(["--recipe", "dit-ff-cosine", "--base", "unet"])
    assert "is for a base with a transformer; --base unet has a unet" in capsys.readouterr().err


def test_report_only_pairs_each_method_over_the_seeds_it_has_finished(tmp_path, capsys):
    def result(loss: float, open_set: float, distill: bool = False) -> dict:
        cell = {"prompt_accuracy": open_set, "prompt_accuracy_lenient": 2 * open_set}
        kinds = ["unmerged", "calibrated"] + (["distill"] if distill else [])
        return {
            "loss": [loss, loss],
            "accuracy": {"0": 0.0, "4": open_set, "8": open_set},
            "accuracy_lenient": {"0": 0.0, "4": 2 * open_set, "8": 2 * open_set},
            "merge_error": 0.0,
            "seconds": 60.0,
            "unmerged_accuracy": open_set,
            "unmerged_accuracy_lenient": 2 * open_set,
            "measurements": {step: {kind: cell for kind in kinds} for step in ("4", "8")},
        }

    def keep(folder: Path, name: str, value: dict) -> None:
        (folder / name).mkdir(parents=True)
        (folder / name / "result.json").write_text(json.dumps(value))

    out, kept = tmp_path / "out", tmp_path / "kept"
    for seed, acc in enumerate((0.1, 0.2, 0.3)):  # the baseline has seeds 0-2, in the results folder
        keep(kept, f"peft-lora-seed{seed}", result(1.0, acc))
    keep(out, "ms-seed2", result(0.5, 0.6, distill=True))  # ms: seeds 0 and 2, in the run folders
    keep(out, "ms-seed0", result(0.7, 0.2, distill=True))
    keep(out, "ms-seed1", {**result(0.7, 0.2), "measurements": {}})  # an unfinished run: left out
    keep(out, "is-seed0", result(0.7, 0.2, distill=True))  # one seed: no interval, left out
    args = compare.parse_args(
        ["--methods", "peft-lora", "ms", "is", "--seeds", "0", "1", "2", "--max_train_steps", "8"]
        + ["--validation_steps", "4", "--compare_step", "4", "--num_validation_images", "1"]
        + ["--output_dir", str(out), "--results_dir", str(kept), "--report_only"]
    )
    results = compare.finished_runs(args)
    assert {m: sorted(runs) for m, runs in results.items()} == {"peft-lora": [0, 1, 2], "ms": [0, 2]}
    compare.report(results, args)
    intervals = (out / "compare_intervals.md").read_text()
    # ms - peft-lora by seed: 0.2 - 0.1 and 0.6 - 0.3; the nearest-template reading doubles them
    assert "| ms | 0, 2 | 40.0 [20.0, 60.0] | 40.0 [20.0, 60.0] | +20.0 [+10.0, +30.0] |" in intervals
    assert "| ms | 0, 2 | 80.0 [40.0, 120.0] | 80.0 [40.0, 120.0] | +40.0 [+20.0, +60.0] |" in intervals
    assert "| peft-lora | 0, 1, 2 | 20.0 [10.0, 30.0] |" in intervals
    summary = json.loads((out / "compare_methods.json").read_text())["table"]
    # losses paired by seed: (0.7 - 1.0) and (0.5 - 1.0)
    assert summary["ms"]["loss_vs_baseline"] == pytest.approx([-0.4, 0.1])
    assert (out / "compare_methods.png").read_bytes().startswith(b"\x89PNG")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # written through temporary names
    assert not (out / "ms-seed1" / "train_log.jsonl").exists()  # nothing was trained


bench_load = load_benchmark("bench_load")


def test_bench_load_times_steps_from_the_log_and_reports_the_ratios():
    # cumulative times as train_log.jsonl writes them; validation records carry no loss
    records = [{"step": s, "loss": 0.1, "time": 0.5 * s + (0.25 if s >= 12 else 0.0)} for s in range(1, 15)]
    records.insert(3, {"kind": "validation", "step": 3, "validation_grid": "x.png"})
    assert bench_load.step_times(records) == pytest.approx([0.5, 0.75, 0.5, 0.5])  # steps 11..14

    medians = {
        ("old", "idle"): 600.0,
        ("old", "busy"): 2400.0,
        ("new", "idle"): 600.0,
        ("new", "busy"): 900.0,
    }
    text = bench_load.summarize(medians, ["old", "new"])
    assert "| old | 600 | 2400 | 4.00x | 1.00x | 1.00x |" in text
    assert "| new | 600 | 900 | 1.50x | 1.00x | 0.38x |" in text

    # the wait policy goes in the environment; only the script's defaults leave both unset
    (old, old_env), (new, new_env) = bench_load.command("old", ["--seed", "1"]), bench_load.command("new", [])
    assert old[1:] == [str(bench_load.SCRIPT), "--seed", "1", "--cpu_threads", "torch"]
    assert new[1:] == [str(bench_load.SCRIPT)] and "OMP_WAIT_POLICY" not in {**old_env, **new_env}
    passive, env = bench_load.command("passive-auto", [])
    assert passive[2:] == ["--cpu_threads", "auto"] and env["OMP_WAIT_POLICY"] == "PASSIVE"


bench_gpu = load_benchmark("bench_gpu")


@pytest.mark.slow
def test_bench_gpu_runs_every_variant_at_toy_size_on_cpu(capsys):
    """The smoke run of ``--device cpu --scale 0.1`` (eager only, one round): every variant has a
    row, ratios are to the same mode's PEFT and floor rows, CPU has no peak-memory counter."""
    bench_gpu.main(
        ["--device", "cpu", "--scale", "0.1", "--configs", "sd15-512-1"]
        + ["--modes", "eager", "--rounds", "1", "--warmup", "1"]
    )
    out = capsys.readouterr().out
    assert "sd15 UNet (scale 0.1), 64 px, batch 1, rank 8" in out
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in out.splitlines()
        if "| eager |" in line
    }
    labels = ["floor", "PEFT LoRA", "ResLoRA none", "ResLoRA is"]
    labels += [f"ResLoRA {t} m={m}" for t in ("bs", "ms") for m in (1, 5)]
    assert list(rows) == labels
    assert rows["PEFT LoRA"][3] == "1.000" and rows["floor"][4] == "1.000"
    assert all(r[-1].strip(" |") == "N/A" for r in rows.values())


def test_fresh_compile_cache_compiles_every_model_of_one_class_past_dynamos_default_limit():
    """bench_gpu compiles ten UNets per size (floor, PEFT, eight ResLoRA variants): dynamo
    caches their graphs on the one code object of the class, and past its default limit of 8
    the later models would run eagerly; after ``fresh_compile_cache`` each gets its graph."""
    graphs: list[int] = []

    def counting_backend(gm, example_inputs):
        graphs.append(1)
        return gm.forward

    def compile_models(n: int) -> int:
        graphs.clear()
        for i in range(n):
            model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(i + 1)])
            torch.compile(model, backend=counting_backend)(torch.randn(2, 4))
        return len(graphs)

    with torch._dynamo.config.patch(recompile_limit=8):
        torch._dynamo.reset()
        assert compile_models(10) == 8  # the limit this helper lifts
        bench_gpu.fresh_compile_cache(10)
        assert compile_models(10) == 10
    torch._dynamo.reset()


def test_bench_gpu_variants_share_one_copy_of_the_frozen_weights():
    base = bench_gpu.UNet2DConditionModel(**bench_gpu.denoiser_config("sd15", 0.05)).requires_grad_(False)
    inputs = bench_gpu.make_inputs(base, 64, 1, torch.device("cpu"), torch.float32, 0.05)
    variants = bench_gpu.build_variants(base, inputs, 4, torch.device("cpu"), ["PEFT LoRA", "ResLoRA bs m=5"])
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    for v in variants:
        frozen = {p.data_ptr() for p in v.model.parameters() if not p.requires_grad}
        assert frozen == base_ptrs
        assert v.params and all(p.dtype == torch.float32 for p in v.params)
    assert bench_gpu.parse_config("sdxl-1024-1", 0.1) == ("sdxl", 128, 1)
    assert bench_gpu.parse_config("sd15-512-8", 1.0) == ("sd15", 512, 8)


@pytest.mark.slow
def test_profile_step_prints_the_top_operators_of_an_eager_step(capsys):
    load_benchmark("profile_step").main(
        ["--modes", "eager", "--steps", "1", "--rows", "4", "--scale", "0.05"]
    )
    out = capsys.readouterr().out
    assert "### eager step, top 4 operators" in out and "Self CPU" in out
    assert "aten::" in out


merge_error = load_benchmark("merge_error")


def test_merge_error_study_measures_the_error_against_the_whole_output_and_the_adapters_change():
    """Both ratios against a second path: the merged LoRA fused into a copy of the base's weights
    (``W + B' A'``) and the untouched base itself."""
    import copy

    from reslora_diffusers import ResLoRAConfig, add_reslora, merge_to_lora
    from tests.toys import ResidualStack

    torch.manual_seed(0)
    base = ResidualStack(d=8, n_layers=4)
    model = add_reslora(
        copy.deepcopy(base), ResLoRAConfig(rank=2, res_type="is", target_modules=["proj"], record_norms=True)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.train()
    batches = [{"x": torch.randn(5, 8)} for _ in range(3)]
    for batch in batches:  # the traced pass and the input merge's norm windows
        model(**batch)
    merged = merge_to_lora(model, merge="input")

    fused = copy.deepcopy(base)
    with torch.no_grad():
        for i, layer in enumerate(fused.layers):
            a, b = merged[f"layers.{i}.proj.lora_A.weight"], merged[f"layers.{i}.proj.lora_B.weight"]
            layer.proj.weight += b @ a
    model.eval()
    with torch.no_grad():
        ref = torch.cat([model(**b) for b in batches]).double()
        got = torch.cat([fused(**b) for b in batches]).double()
        plain = torch.cat([base(**b) for b in batches]).double()
    out_err, delta_err = merge_error.delta_error(model, merged, batches)
    assert out_err == pytest.approx(float((got - ref).norm() / ref.norm()), rel=1e-6)
    assert delta_err == pytest.approx(float((got - ref).norm() / (ref - plain).norm()), rel=1e-6)
    assert 0 < out_err < delta_err  # an `is` merge is approximate; the adapters change less than the output

    results = [
        {
            "base": "unet",
            "method": "is",
            "seed": s,
            "merges": {"input": {"output_error": e, "delta_error": 2 * e}},
        }
        for s, e in ((0, 0.1), (1, 0.3))
    ]
    args = argparse.Namespace(bases=["unet"], methods=["is"], merges=["input"])
    assert "| unet | is | 0.200 +- 0.141 / 0.400 +- 0.283 |" in merge_error.markdown(results, args)


def test_bench_step_pairs_each_round_with_peft_of_the_same_round():
    bench_step = load_benchmark("bench_step")
    # the machine halves its speed in the second round: both variants slow alike, the paired
    # ratio stays 1.1 while the ratio of the two medians would mix the rounds
    assert bench_step.paired_ratio([1.1, 2.2, 1.1], [1.0, 2.0, 1.0]) == "1.100 [1.100, 1.100]"
    # ratios 1, 2, 3: the median is 2; resampled medians range over the three values
    assert bench_step.paired_ratio([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]) == "2.000 [1.000, 3.000]"
    with pytest.raises(ValueError):
        bench_step.paired_ratio([1.0], [1.0, 2.0])


def test_rotated_order_puts_every_variant_in_every_slot_once_per_cycle():
    rotated = load_benchmark("bench_gpu").rotated
    variants = ["peft", "none", "bs5", "ms5"]
    orders = [rotated(variants, i) for i in range(len(variants))]
    for order in orders:
        assert sorted(order) == sorted(variants)  # each round runs each variant once
    for slot in range(len(variants)):
        assert sorted(order[slot] for order in orders) == sorted(variants)
    assert rotated(variants, 5) == ["none", "bs5", "ms5", "peft"]  # cycles on
    assert variants == ["peft", "none", "bs5", "ms5"]  # the caller's list is not reordered


def test_bench_step_variants_share_the_frozen_weights_and_train_their_own():
    # the full-width sizes fit in memory only because every variant reads one copy of the base
    bench_step = load_benchmark("bench_step")
    base, _ = bench_step.make_model("sd3", (1, 64, 8, 1))
    peft, peft_params = bench_step.peft_variant(base, 4, ["to_q"])
    reslora, reslora_params = bench_step.reslora_variant(base, 4, "bs", 1, ["to_q"])
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    for model, trained in ((peft, peft_params), (reslora, reslora_params)):
        trained_ptrs = {p.data_ptr() for p in trained}
        frozen_ptrs = {p.data_ptr() for p in model.parameters()} - trained_ptrs
        assert frozen_ptrs == base_ptrs
        assert not trained_ptrs & base_ptrs and trained_ptrs
    assert not any(p.requires_grad for p in base.parameters())  # the shared base stays frozen


def test_bench_is_groups_builds_is_with_its_q_k_v_groups_and_without_them():
    from reslora_diffusers.core.inject import get_state

    bench_step = load_benchmark("bench_step")  # bench_is_groups imports it by name
    groups = load_benchmark("bench_is_groups")
    base, inputs = bench_step.make_model("unet", ((32, 64), 8, 1))
    targets = bench_step.TARGET_SETS["unet"]["attention"]
    built = {name: groups.variant(base, 4, name, 1, targets)[0] for name in ("is", groups.UNGROUPED)}
    for unet in built.values():
        unet(**inputs)  # the tracing pass forms the groups
    grouped, ungrouped = (get_state(built[name]).inputs.describe() for name in ("is", groups.UNGROUPED))
    assert grouped and all(len(g) in (2, 3) for g in grouped)
    assert all(any(p.endswith("to_k") for p in g) for g in grouped)  # every group holds a to_k
    assert ungrouped == []


def test_bench_step_counts_the_extra_products_of_a_block_shortcut():
    bench_step = load_benchmark("bench_step")
    base, inputs = bench_step.make_model("sd3", (2, 64, 8, 1))  # 2 blocks: one bs link on to_q
    rank, width, tokens = 4, 64, (8 // 2) ** 2  # 2 x 2 patches of an 8 x 8 latent
    peft = bench_step.Step(*bench_step.peft_variant(base, rank, ["to_q"]), inputs)
    none = bench_step.Step(*bench_step.reslora_variant(base, rank, "none", 1, ["to_q"]), inputs)
    bs = bench_step.Step(*bench_step.reslora_variant(base, rank, "bs", 1, ["to_q"]), inputs)
    assert none.flops() == peft.flops()
    # the second block's branch has r more rows in A and columns in B: forward 2 T r (in + out),
    # backward twice that (weight and input gradients of both products)
    assert bs.flops() - peft.flops() == 3 * 2 * tokens * rank * (width + width)
    assert all(p.grad is None for p in bs.opt.param_groups[0]["params"])


def test_bench_step_checkpointing_cost_is_the_variants_ratio_over_peft_lora_s_per_round():
    bench_step = load_benchmark("bench_step")
    ck = bench_step.CHECKPOINTED
    # round 1: checkpointing costs PEFT 1.2x and bs 1.5x -> 1.25; round 2 (machine twice as slow
    # for every step) the same ratios -> 1.25; round 3: 1.2x and 1.2x -> 1.0
    times = {
        "PEFT LoRA": [(1.0, 1.0), (2.0, 1.0), (1.0, 1.0)],
        "PEFT LoRA" + ck: [(1.2, 1.0), (2.4, 1.0), (1.2, 1.0)],
        "bs": [(1.0, 1.0), (2.0, 1.0), (1.0, 1.0)],
        "bs" + ck: [(1.5, 2.0), (3.0, 2.0), (1.2, 2.0)],
    }
    assert bench_step.checkpointing_cost(times, "bs") == "1.250 [1.000, 1.250]"
    # CPU time (the second clock): checkpointing doubles bs's and leaves PEFT LoRA's alone
    assert bench_step.checkpointing_cost(times, "bs", clock=1) == "2.000 [2.000, 2.000]"


def test_bench_step_runs_plain_and_checkpointed_side_by_side(capsys):
    bench_step = load_benchmark("bench_step")
    bench_step.bench_size("sd3", "small", 2, 4, ["to_q"], [("ms", 1)], inference=False, checkpointing="both")
    out = capsys.readouterr().out
    ck = bench_step.CHECKPOINTED
    for label in ("PEFT LoRA", "ResLoRA ms m=1", "PEFT LoRA" + ck, "ResLoRA ms m=1" + ck):
        assert f"| {label} |" in out
    assert "gradient checkpointing both" in out
    cost = out.split("What checkpointing costs")[1]
    assert "| ResLoRA ms m=1 |" in cost and "PEFT LoRA |" not in cost


def test_bench_step_checkpointed_step_runs_the_blocks_again_in_backward():
    bench_step = load_benchmark("bench_step")
    base, inputs = bench_step.make_model("sd3", (2, 64, 8, 1))
    plain = bench_step.Step(*bench_step.reslora_variant(base, 4, "ms", 1, ["to_q"]), inputs)
    ck = bench_step.Step(*bench_step.reslora_variant(base, 4, "ms", 1, ["to_q"]), inputs, checkpointed=True)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in plain.unet.modules())
    assert any(getattr(m, "gradient_checkpointing", False) for m in ck.unet.modules())
    # a forward of each checkpointed block again: more FLOPs than the plain step, less than two
    assert plain.flops() < ck.flops() < 2 * plain.flops()


def test_bootstrap_interval_of_the_median():
    # values 0, 0, 1: a resample's median is 1 when it holds two or three 1s, P = 7/27 > 2.5 %
    median, low, high = compare.bootstrap_interval([0.0, 0.0, 1.0], statistic=np.median)
    assert (median, low, high) == (0.0, 0.0, 1.0)


# -- benchmarks/compare_lm.py -----------------------------------------------------------
compare_lm = load_benchmark("compare_lm")


def _lm_run(trained, exports):
    return {
        "trained": trained,
        "exports": {m: {"exported": e, "merge_error": err} for m, (e, err) in exports.items()},
        "seconds": 1.0,
    }


def test_lm_intervals_pair_each_export_with_the_baseline_of_its_seed():
    lora = [_lm_run(0.5, {"calibrated": (0.5, 0.0)}), _lm_run(0.7, {"calibrated": (0.7, 0.0)})]
    is_runs = [
        _lm_run(0.8, {"calibrated": (0.6, 0.3), "distill": (0.7, 0.1)}),
        _lm_run(0.9, {"calibrated": (0.6, 0.5), "distill": (0.9, 0.2)}),
    ]
    rows = compare_lm.interval_rows({"lora": lora, "is": is_runs})
    assert list(rows) == ["lora", "is", "is+distill"]
    assert rows["is"]["trained"][0] == pytest.approx(0.85)
    # paired: (0.6 - 0.5, 0.6 - 0.7) and (0.7 - 0.5, 0.9 - 0.7)
    assert rows["is"]["vs_baseline"][0] == pytest.approx(0.0)
    assert rows["is"]["vs_baseline"][1:] == pytest.approx((-0.1, 0.1))
    assert rows["is+distill"]["vs_baseline"] == pytest.approx((0.2, 0.2, 0.2))
    assert rows["is+distill"]["merge_error"][0] == pytest.approx(0.15)
    assert rows["lora"]["vs_baseline"] == (0.0, 0.0, 0.0)
    text = compare_lm.markdown({"nlg": rows}, [0, 1])
    assert (
        "| is+distill | 0.850 [0.800, 0.900] | 0.800 [0.700, 0.900] | +0.200 [+0.200, +0.200] | 1.50e-01 |"
        in text
    )


def test_each_method_trains_at_its_own_learning_rate_over_the_common_flags(tmp_path, capsys):
    nlg = compare_lm.load_example("nlg_causal_lm")
    argv = ["--examples", "nlg", "--output_dir", str(tmp_path), "--method_lr", "lora=6e-3", "bs=0.003"]
    args = compare_lm.parse_args([*argv, "--", "--learning_rate", "1e-3", "--max_train_steps", "30"])
    assert args.method_lr == {"lora": 6e-3, "bs": 3e-3}
    lora = nlg.parse_args(compare_lm.example_argv("nlg", "lora", 4, args))
    assert (lora.learning_rate, lora.max_train_steps, lora.seed, lora.res_type) == (6e-3, 30, 4, ["none"])
    assert nlg.parse_args(compare_lm.example_argv("nlg", "bs", 4, args)).learning_rate == 3e-3
    assert nlg.parse_args(compare_lm.example_argv("nlg", "ms-cosine", 4, args)).learning_rate == 1e-3
    text = compare_lm.markdown({}, [4], args.method_lr)
    assert "Learning rates of their own: lora 0.006, bs 0.003." in text
    for bad, message in (
        ("lora", "expected METHOD=LR"),
        ("lora=fast", "expected METHOD=LR"),
        ("dora=1e-3", "unknown method 'dora'"),
    ):
        with pytest.raises(SystemExit):
            compare_lm.parse_args(["--method_lr", bad])
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_lm_comparison_runs_the_examples_and_resumes(tmp_path):
    argv = ["--examples", "nlu", "--methods", "lora", "is", "--seeds", "0", "--output_dir", str(tmp_path)]
    argv += ["--", "--max_train_steps", "2", "--max_train_samples", "32", "--max_eval_samples", "8"]
    argv += ["--distill_steps", "1"]
    tables = compare_lm.main(argv)
    assert set(tables["nlu"]) == {"lora", "is", "is+distill"}
    result = tmp_path / "nlu" / "is-seed0" / "result.json"
    assert (tmp_path / "nlu" / "is-seed0" / "is" / "peft_adapter_distill" / "adapter_config.json").is_file()
    # a finished run is read back, not run again: its folder's result is what the table shows
    saved = json.loads(result.read_text())
    saved["trained"] = 0.25
    result.write_text(json.dumps(saved))
    again = compare_lm.main(argv)
    assert again["nlu"]["is"]["trained"][0] == 0.25
    assert (tmp_path / "compare_lm.md").read_text().count("| is") == 2


bench_memory = load_benchmark("bench_memory")


@pytest.mark.parametrize("preset", ["sd15", "sdxl", "sd3", "flux"])
def test_bench_memory_feeds_each_denoiser_what_the_training_script_does(preset):
    """Latents at pixels / 8 (Flux: packed 2 x 2), 77 CLIP tokens (SD3 + 256 T5, Flux 512 T5),
    SDXL's time ids of a square crop at the full size; built directly in bf16."""
    model = bench_memory.build_denoiser(preset, 0.05, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    inputs = bench_memory.make_inputs(model, preset, 128, 2)
    latent, want_tokens = 16, {"sd15": 77, "sdxl": 77, "sd3": 77 + 256, "flux": 512}[preset]
    assert inputs["encoder_hidden_states"].shape[:2] == (2, want_tokens)
    if preset == "flux":
        assert inputs["hidden_states"].shape[:2] == (2, (latent // 2) ** 2)
        assert inputs["img_ids"].shape[0] == (latent // 2) ** 2
    else:
        key = "hidden_states" if preset == "sd3" else "sample"
        assert inputs[key].shape[-2:] == (latent, latent)
    if preset == "sdxl":
        assert inputs["added_cond_kwargs"]["time_ids"].tolist() == [[128, 128, 0, 0, 128, 128]] * 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**inputs)


@pytest.mark.slow
def test_bench_memory_measures_each_variant_in_its_own_process_and_resumes(tmp_path, capsys, monkeypatch):
    """A toy run (PEFT and is, plain and checkpointed): one row each with ratios to PEFT in the
    same mode and checkpointing's effect; the stored rows are reused, not measured again; a
    variant over the memory limit is reported as such."""
    argv = ["--scale", "0.05", "--configs", "sd3-64-1", "--variants", "peft", "is", "--warmup", "0"]
    argv += ["--steps", "1", "--results_dir", str(tmp_path)]
    bench_memory.main(argv)
    out = capsys.readouterr().out
    rows = {
        tuple(c.strip() for c in line.split("|")[1:3]): line
        for line in out.splitlines()
        if "| Res" in line or "| PEFT" in line
    }
    assert set(rows) == {
        (label, mode) for label in ("PEFT LoRA", "ResLoRA is") for mode in ("plain", "checkpointed")
    }
    assert rows[("PEFT LoRA", "plain")].split("|")[4].strip() == "1.000"
    assert rows[("ResLoRA is", "checkpointed")].split("|")[7].strip() != "-"
    stored = sorted(tmp_path.rglob("*.json"))
    assert len(stored) == 4 and all(json.loads(p.read_text())["peak_rss_gib"] > 0.1 for p in stored)

    def no_new_process(*args, **kwargs):
        raise AssertionError("a stored measurement was made again")

    monkeypatch.setattr(bench_memory.subprocess, "run", no_new_process)
    bench_memory.main(argv)
    assert capsys.readouterr().out.count("| 1.000 |") >= 2
    monkeypatch.undo()
    args = argparse.Namespace(
        scale=0.05,
        rank=8,
        dtype="bf16",
        device="cpu",
        warmup=0,
        steps=1,
        memory_limit_gib=0.05,
        targets=None,
        results_dir=str(tmp_path / "tight"),
    )
    row = bench_memory.run_one(args, "sd15-64-1", "floor", "plain")
    assert row["over_limit_gib"] == 0.05
    assert "over 0.1" in bench_memory.table("sd15-64-1", {("floor", "plain"): row})


# -- benchmarks/depth_study.py ----------------------------------------------------------
depth_study = load_benchmark("depth_study")

_DEPTH_ARGV = ["--widths", "16", "--depths", "2", "--steps", "4", "--evals", "4", "--batch_size", "8"]
_DEPTH_ARGV += ["--tokens", "4", "--train_size", "32", "--eval_size", "8"]


def test_depth_study_runs_both_stacks_writes_one_file_per_run_and_resumes(tmp_path, capsys):
    argv = [*_DEPTH_ARGV, "--results_dir", str(tmp_path), "--archs", "residual", "plain"]
    argv += ["--methods", "peft-lora", "is", "ms-m3-cosine"]
    argv += ["--seeds", "0", "1", "--tune_seeds", "7", "--lrs", "1e-3", "1e-2", "--lr_extensions", "0"]
    depth_study.main(argv)
    tune = sorted(tmp_path.glob("*/tune/*.json"))
    evaluated = sorted(tmp_path.glob("*/eval/*.json"))
    # 2 architectures x 3 methods x 2 rates x 1 tuning seed; 2 x 3 methods x 2 seeds at one rate each
    assert len(tune) == 12 and len(evaluated) == 12
    assert {p.parent.parent.name for p in evaluated} == {"residual-w16-d2", "plain-w16-d2"}
    for path in evaluated:
        run = json.loads(path.read_text())
        assert run["steps"] == [0, 1, 2, 3, 4]
        # B = 0 at step 0: the student is the base, whose loss is the unit
        assert run["trained"][0] == pytest.approx(1.0) and run["exported"][0] == pytest.approx(1.0)
        if run["method"] == "peft-lora":  # PEFT's LoRA is its own export
            assert run["exported"] == run["trained"] and run["merge_error"] is None
        if run["method"] == "ms-m3-cosine":  # shortcut scale 0 at the last step: an exact export
            assert run["exported"][-1] == pytest.approx(run["trained"][-1], rel=1e-3)
            assert run["merge_error"] < 1e-4
    assert all("exported" not in json.loads(p.read_text()) for p in tune)
    assert (tmp_path / "depth_study.md").is_file() and (tmp_path / "depth_study_w16.png").is_file()
    # the same command again runs nothing: every run is finished
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*/*.json")}
    args = depth_study.parse_args(argv)
    assert depth_study.run_study(args) == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*/*.json")} == before
    # a result made with other settings is refused by name, not mixed in
    with pytest.raises(
        SystemExit, match=r"seed7\.json: made with other settings \(steps 4; this study: steps 8\)"
    ):
        depth_study.main([*argv, "--steps", "8", "--report_only"])


_SD3_BLOCK = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_SD3_BLOCK += ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


@pytest.mark.parametrize(
    "arch, per_block, last_block",
    [
        ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None),
        # SD3's last joint block updates the image stream only: no context output or feed-forward
        ("sd3", _SD3_BLOCK, [t for t in _SD3_BLOCK if t != "to_add_out" and not t.startswith("ff_context")]),
    ],
)
def test_depth_study_library_models_adapt_every_block_and_start_at_the_base(
    tmp_path, arch, per_block, last_block
):
    argv = [
        *_DEPTH_ARGV,
        "--results_dir",
        str(tmp_path),
        "--archs",
        arch,
        "--seeds",
        "0",
        "--tune_seeds",
        "7",
    ]
    argv += ["--lrs", "1e-3", "--lr_extensions", "0"]
    args = depth_study.parse_args(argv)
    cell = depth_study.Cell(arch, 16, 2)
    task = depth_study.make_task(cell, 0, depth_study.settings_of(args))
    # the teacher changes, and each student adapts, every targeted projection of both blocks
    blocks = "layers" if arch == "llama" else "transformer_blocks"
    expected = {(0, t) for t in per_block} | {(1, t) for t in last_block or per_block}
    names = {m: n for n, m in task.base.named_modules()}
    found = set()
    for layer in depth_study.target_layers(task.base, arch):
        name = names[layer]
        index = int(re.search(rf"{blocks}\.(\d+)\.", name)[1])
        found |= {(index, t) for t in per_block if name.endswith("." + t)}
    assert found == expected and len(list(depth_study.target_layers(task.base, arch))) == len(expected)
    for method in ("peft-lora", "ms"):
        model, params = depth_study.student(task, depth_study.METHODS[method], 4, 0)
        assert len(params) == 2 * len(expected)  # one A and one B per projection
    depth_study.main(argv)
    # the library models run PEFT LoRA, the default and the stacks' best unless told otherwise
    assert sorted(p.name for p in tmp_path.glob(f"{cell.name}/eval/*.json")) == sorted(
        f"{m}-lr0.001-seed0.json" for m in ("peft-lora", "ms", "ms-cosine", "bs")
    )
    for path in tmp_path.glob(f"{cell.name}/eval/*.json"):
        run = json.loads(path.read_text())
        # B = 0 at step 0: the student is the base, whose distance to the teacher is the unit
        assert run["trained"][0] == pytest.approx(1.0) and run["exported"][0] == pytest.approx(1.0)
        assert run["trained"][-1] != run["trained"][0]  # it trained
        if run["method"] == "ms-cosine":  # shortcut scale 0 at the last step: an exact export
            assert run["exported"][-1] == pytest.approx(run["trained"][-1], rel=1e-3)
    text = (tmp_path / "depth_study.md").read_text()
    assert f"## {arch}, width 16, trained" in text and f"| {cell.name} | 4 (done) | 4/4 |" in text


def test_depth_study_steps_to_reach_interpolates_in_log_loss():
    steps = [0, 25, 50]
    # crossing 0.3 between (25, 0.5) and (50, 0.2): 25 + 25 (ln 0.5 - ln 0.3) / (ln 0.5 - ln 0.2)
    expected = 25 + 25 * (np.log(0.5) - np.log(0.3)) / (np.log(0.5) - np.log(0.2))
    assert depth_study.steps_to_reach(steps, [1.0, 0.5, 0.2], 0.3) == pytest.approx(expected)
    assert depth_study.steps_to_reach(steps, [1.0, 0.5, 0.2], 0.2) == pytest.approx(50)
    assert depth_study.steps_to_reach(steps, [1.0, 0.5, 0.4], 0.3) is None
    assert depth_study.steps_to_reach(steps, [1.0, 0.5, 0.4], 1.0) == 0


def _depth_run(args, cell, method, lr, seed, trained, exported=None):
    """Write a hand-made result file where the study keeps it."""
    phase = "tune" if exported is None else "eval"
    run = {
        "cell": cell._asdict(),
        "method": method,
        "lr": lr,
        "seed": seed,
        "settings": dict(zip(depth_study.SETTINGS, depth_study.settings_of(args))),
        "steps": [0, 1, 2, 3, 4],
        "trained": trained,
        "seconds": 1.0,
    }
    if exported is not None:
        run.update(exported=exported, merge_error=0.01)
    path = depth_study.run_path(args.results_dir, cell, phase, method, lr, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run))


def test_depth_study_report_pairs_each_seed_with_peft_lora_and_tunes_on_the_mean_log_loss(tmp_path):
    seeds = [0, 1, 2, 3, 4]
    args = depth_study.parse_args(
        [*_DEPTH_ARGV, "--results_dir", str(tmp_path), "--archs", "residual", "--methods", "peft-lora", "is"]
        + [
            "--seeds",
            *map(str, seeds),
            "--tune_seeds",
            "7",
            "8",
            "--lrs",
            "0.001",
            "0.01",
            "--lr_extensions",
            "0",
        ]
    )
    cell = depth_study.Cell("residual", 16, 2)
    # tuning: final losses (0.1, 0.9) at 0.001 and (0.35, 0.35) at 0.01. The mean log loss picks
    # 0.001 (ln 0.3 < ln 0.35) where the mean loss would pick 0.01 (0.5 > 0.35); PEFT LoRA's
    # (0.2, 0.2) at 0.01 beats its (0.3, 0.3) at 0.001
    for seed, (a, b) in zip([7, 8], [(0.1, 0.35), (0.9, 0.35)]):
        _depth_run(args, cell, "is", 0.001, seed, [1, 1, 1, 1, a])
        _depth_run(args, cell, "is", 0.01, seed, [1, 1, 1, 1, b])
        _depth_run(args, cell, "peft-lora", 0.001, seed, [1, 1, 1, 1, 0.3])
        _depth_run(args, cell, "peft-lora", 0.01, seed, [1, 1, 1, 1, 0.2])
    assert depth_study.best_lrs(cell, args) == {"peft-lora": 0.01, "is": 0.001}
    # evaluation: PEFT LoRA's loss halves every step from k (seed k: k = 1 + seed / 10); is runs
    # ahead by a factor c_s^-1 per step at the trained model, and its export is PEFT LoRA's curve
    for seed in seeds:
        k = 1 + seed / 10
        peft = [k * 0.5**i for i in range(5)]
        peft[0] = 1.0
        _depth_run(args, cell, "peft-lora", 0.01, seed, peft, peft)
        trained = [1.0] + [k * 0.4**i for i in range(1, 5)]
        _depth_run(args, cell, "is", 0.001, seed, trained, peft)
    _depth_run(args, cell, "is", 0.001, 9, [1, 1, 1, 1, 1], [1, 1, 1, 1, 1])  # no PEFT run: not paired
    table = depth_study.cell_table(cell, args)
    row = table["rows"]["is"]
    assert row["paired"] == seeds
    # loss ratios (k 0.4^i) / (k 0.5^i) = 0.8^i, at step 1 (25 %), 2 (50 %) and 4 (100 %), in every seed
    for measure, i in (("0.25", 1), ("0.5", 2), ("1.0", 4)):
        assert row["trained"][measure] == pytest.approx((0.8**i,) * 3)
        assert row["exported"][measure] == pytest.approx((1.0, 1.0, 1.0))
    # PEFT LoRA reaches its final loss k 0.5^4 at step 4; is crosses it between steps 3 and 4:
    # 3 + (ln (k 0.4^3) - ln (k 0.5^4)) / (ln (k 0.4^3) - ln (k 0.4^4)), the same for every k
    crossing = 3 + (3 * np.log(0.4) - 4 * np.log(0.5)) / (3 * np.log(0.4) - 4 * np.log(0.4))
    assert row["trained"]["steps"] == pytest.approx((crossing / 4,) * 3)
    assert row["exported"]["steps"] == pytest.approx((1.0, 1.0, 1.0)) and row["exported"]["censored"] == 0
    # PEFT LoRA's own final loss, median over seeds k = 1 .. 1.4: 1.2 / 16
    assert table["baseline_loss"]["1.0"][0] == pytest.approx(1.2 / 16)
    found = depth_study.verdicts({cell: table})
    assert len(found["gain"]) == 4 and found["loss"] == []  # the trained model's 3 losses and steps
    text = (depth_study.report(args), (tmp_path / "depth_study.md").read_text())[1]
    assert f"| 2 | is | 0.001 (edge) | 5 | **{0.8:.3g} [{0.8:.3g}, {0.8:.3g}]** |" in text
    assert "| residual-w16-d2 | 8 (done) | 10/10 |" in text  # seed 9 is not an evaluation seed


def test_depth_study_tunes_beyond_the_grid_end_that_wins(tmp_path):
    args = depth_study.parse_args(
        [*_DEPTH_ARGV, "--results_dir", str(tmp_path), "--archs", "residual", "--methods", "peft-lora"]
        + ["--tune_seeds", "100", "--lrs", "0.002", "0.004", "--lr_extensions", "2"]
    )
    cell = depth_study.Cell("residual", 16, 2)
    planned = depth_study.planned_runs(args)
    assert [next(planned)[3] for _ in range(2)] == [0.002, 0.004]
    _depth_run(args, cell, "peft-lora", 0.002, 100, [1, 1, 1, 1, 0.2])
    _depth_run(args, cell, "peft-lora", 0.004, 100, [1, 1, 1, 1, 0.3])
    # the lower end wins: 0.001 is tuned next, and it wins too: 0.0005, the last extension
    assert next(planned)[2:] == ("peft-lora", 0.001, 100)
    _depth_run(args, cell, "peft-lora", 0.001, 100, [1, 1, 1, 1, 0.1])
    assert depth_study.tuning(cell, "peft-lora", args) == (None, 0.0005, False)
    assert next(planned)[2:] == ("peft-lora", 0.0005, 100)
    _depth_run(args, cell, "peft-lora", 0.0005, 100, [1, 1, 1, 1, 0.05])
    # still the lowest after 2 extensions: chosen, marked as an edge; the evaluation runs follow
    assert depth_study.tuning(cell, "peft-lora", args) == (0.0005, None, True)
    assert next(planned) == (cell, "eval", "peft-lora", 0.0005, 0)
    # a rate inside the tried ones is no edge
    _depth_run(args, cell, "peft-lora", 0.0005, 100, [1, 1, 1, 1, 0.5])
    assert depth_study.tuning(cell, "peft-lora", args) == (0.001, None, False)


def test_depth_study_median_interval_and_verdicts_need_enough_seeds():
    # two values a < b: a resample's median is a, (a + b) / 2 or b with P 1/4, 1/2, 1/4
    assert depth_study.median_interval([0.5, 0.9]) == pytest.approx((0.7, 0.5, 0.9))
    assert depth_study.median_interval([0.5]) is None
    assert depth_study.verdict((0.8, 0.7, 0.9), 5) == "gain"
    assert depth_study.verdict((1.2, 1.1, 1.3), 5) == "loss"
    assert depth_study.verdict((0.8, 0.7, 1.1), 5) is None
    assert depth_study.verdict((0.8, 0.7, 0.9), 4) is None  # too few seeds to call it
