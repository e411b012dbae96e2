"""ResLoRA on transformers models: presets, forward formulas, generate, checkpointing,
the Trainer callback, and the PEFT export checked with PEFT's own loader."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import PeftModel
from safetensors.torch import load_file

from reslora_diffusers import (
    ResLoRAConfig,
    add_reslora,
    chain_structure,
    export_peft_adapter,
    load_reslora_checkpoint,
    merge_to_lora,
)
from reslora_diffusers.core import get_state, shortcut_scale
from reslora_diffusers.frontends import PRESETS
from reslora_diffusers.integrations.trainer import ResLoRACallback
from tests.reference import factors_of, reference_hooks
from tests.scripts import load_script
from tests.tiny_lms import V, ids, out, tiny, with_reslora

# models this small run fastest on one thread (and do not oversubscribe a shared CPU)
pytestmark = pytest.mark.usefixtures("one_thread")


def expected_targets(model: torch.nn.Module, suffixes: tuple[str, ...]) -> set[str]:
    return {
        name
        for name, mod in model.named_modules()
        if any(name.endswith("." + s) for s in suffixes) and hasattr(mod, "weight")
    }


# -- presets --------------------------------------------------------------------------
PRESET_CASES = [
    ("llama", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("mistral", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("qwen2", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("qwen3", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("gpt2", ("c_attn", "c_proj", "c_fc")),
    ("bert", ("query", "key", "value", "attention.output.dense")),
    ("roberta", ("query", "key", "value", "attention.output.dense")),
    ("clip_text_model", ("q_proj", "k_proj", "v_proj", "out_proj")),
]


@pytest.mark.parametrize("family,suffixes", PRESET_CASES)
def test_preset_targets_by_model_type(family, suffixes):
    base = tiny(family)
    want = expected_targets(base, suffixes)
    model = add_reslora(base, ResLoRAConfig(rank=2))
    state = get_state(model)
    per_layer = len(suffixes) + (family == "gpt2")  # GPT-2's c_proj: attention and MLP
    assert set(state.blocks) == want and len(want) == 3 * per_layer
    assert state.config.target_modules == list(suffixes)  # stored, so checkpoints carry them
    assert not any(name.endswith("output.dense") and "attention" not in name for name in state.blocks)


def test_clip_with_projection_has_a_preset_and_mlp_is_not_targeted():
    assert PRESETS["clip_text_model_with_projection"] == PRESETS["clip_text_model"]
    model = add_reslora(tiny("clip_text_model"), ResLoRAConfig(rank=2))
    assert not any("mlp" in path for path in get_state(model).blocks)


def test_unknown_model_type_names_it_and_the_presets():
    torch.manual_seed(0)
    config = tf.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    model = tf.GPTNeoXForCausalLM(config)
    with pytest.raises(ValueError, match=r"'gpt_neox'.*llama.*roberta"):
        add_reslora(model, ResLoRAConfig())
    add_reslora(model, ResLoRAConfig(target_modules=["query_key_value"]))  # user targets override
    assert len(get_state(model).blocks) == 2


def test_user_target_modules_override_preset():
    model = add_reslora(tiny("llama"), ResLoRAConfig(target_modules=["v_proj"]))
    assert sorted(get_state(model).blocks) == [f"model.layers.{i}.self_attn.v_proj" for i in range(3)]


def test_chains_follow_layer_order_one_per_role():
    model = with_reslora("gpt2", "bs")
    out(model, ids())
    chains = chain_structure(model)
    assert set(chains) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert chains["mlp.c_proj"]["modules"] == [f"transformer.h.{i}.mlp.c_proj" for i in range(3)]
    assert all(c["links"] == [False, True, True] for c in chains.values())


# -- forward --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "roberta"])
@pytest.mark.parametrize("res_type", ["none", "is", "bs", "ms"])
def test_forward_matches_written_out_formulas(family, res_type):
    model = with_reslora(family, res_type, pre_num=2)
    s = next(iter(get_state(model).blocks.values())).scaling
    x = ids()
    with reference_hooks(tiny(family), factors_of(model), s, res_type, pre_num=2) as ref:
        for _ in range(2):  # the traced pass and a frozen-structure pass
            torch.testing.assert_close(out(model, x), out(ref, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out(model, x), out(tiny(family), x))  # the branch is not zero


def test_conv1d_merge_orientation_fuses_into_transposed_weight():
    """GPT-2 stores W as (in, out): fusing the exported ``dW = B A`` (out, in) needs ``dW.T``."""
    model = with_reslora("gpt2", "bs", pre_num=1)
    x = ids()
    y = out(model, x)
    merged = merge_to_lora(model)
    fused = tiny("gpt2")
    with torch.no_grad():
        for path in get_state(model).blocks:
            a, b = merged.factors(path)
            conv = fused.get_submodule(path)
            assert conv.weight.shape == (a.shape[1], b.shape[0])  # (in, out)
            conv.weight += (b @ a).T
    torch.testing.assert_close(out(fused, x), y, rtol=1e-5, atol=1e-5)


# -- generate -------------------------------------------------------------------------
@pytest.mark.parametrize("family,res_type", [("llama", "is"), ("llama", "ms"), ("gpt2", "bs")])
def test_generate_with_cache_matches_full_forward(family, res_type):
    """Incremental passes (one token, KV cache) see the same x_{n-1} as the full forward."""
    model = with_reslora(family, res_type)
    x = ids(batch=2, length=4)
    gen = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=4,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    full = out(model, gen.sequences[:, :-1])
    for step, logits in enumerate(gen.logits):
        torch.testing.assert_close(logits, full[:, x.shape[1] - 1 + step], rtol=1e-4, atol=1e-4)


# -- gradient checkpointing -----------------------------------------------------------
def _enable_checkpointing(model):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def _lora_grads(model, x):
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("res_type", ["none", "is", "bs", "ms"])
def test_gradient_checkpointing_gives_the_same_gradients_without_deprecation_noise(res_type):
    model = with_reslora("llama", res_type)
    x = ids()
    out(model, x)  # trace
    checkpointed = copy.deepcopy(model)
    _enable_checkpointing(checkpointed)
    want = _lora_grads(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5 deprecates is_gradient_checkpointing
        got = _lora_grads(checkpointed, x)
    assert want.keys() == got.keys() and len(want) == 2 * 21
    for name in want:  # is: A_n x_n + c A_n x_{n-1} under checkpointing, A_n (x_n + c x_{n-1}) without
        assert float((got[name] - want[name]).norm() / want[name].norm()) < 1e-5, name


# -- Trainer --------------------------------------------------------------------------
class _Ids(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        self.x = ids(batch=n, length=6, seed=3)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


# transformers 5 renamed TrainingArguments.gradient_checkpointing (the old name warns)
_CHECKPOINTING_ARG = (
    "activation_checkpointing"
    if "activation_checkpointing" in tf.TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


def test_trainer_with_callback_and_checkpointing(tmp_path):
    model = with_reslora("llama", "bs")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        **{_CHECKPOINTING_ARG: True},
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = tf.Trainer(model=model, args=args, train_dataset=_Ids(), callbacks=[ResLoRACallback()])
    trainer.train()
    for sub in ("checkpoint-2", "checkpoint-4", "."):
        assert (tmp_path / sub / "reslora.safetensors").is_file()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    fresh = load_reslora_checkpoint(tiny("llama"), tmp_path / "reslora.safetensors")
    x = ids()
    torch.testing.assert_close(out(fresh, x), out(model.eval(), x), rtol=0, atol=0)


class _ScaleRecorder(tf.TrainerCallback):
    """Notes the model's shortcut scale at the start of every step (after ResLoRACallback set it)."""

    def __init__(self) -> None:
        self.scales = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.scales.append(shortcut_scale(model))


def test_trainer_callback_decays_the_shortcuts_to_an_exact_peft_export(tmp_path):
    model = with_reslora("llama", "ms", pre_num=2)
    args = tf.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    recorder = _ScaleRecorder()
    callbacks = [ResLoRACallback(shortcut_schedule="cosine", decay_start=0.5), recorder]
    tf.Trainer(model=model, args=args, train_dataset=_Ids(), callbacks=callbacks).train()
    # steps 1, 2 before the decay start (2 of 4); step 3: p = 1/2; step 4: c = 0 exactly
    assert recorder.scales == pytest.approx([1.0, 1.0, 0.5, 0.0])
    x = ids()
    y = out(model.eval(), x)
    merged = export_peft_adapter(model, tmp_path / "adapter", eval_inputs=[{"input_ids": x}])
    assert merged.report.shortcuts_off and merged.report.output_error < 1e-6
    torch.testing.assert_close(out(_load_peft("llama", tmp_path / "adapter"), x), y, rtol=1e-5, atol=1e-5)


# -- PEFT export ----------------------------------------------------------------------
def _load_peft(family: str, path, head: str = "lm"):
    return PeftModel.from_pretrained(tiny(family, head), str(path)).eval()


@pytest.mark.parametrize("family,res_type", [("llama", "bs"), ("llama", "none"), ("gpt2", "bs")])
def test_peft_round_trip_exact(tmp_path, family, res_type):
    model = with_reslora(family, res_type, pre_num=2)
    x = ids()
    y = out(model, x)
    merged = export_peft_adapter(model, tmp_path, eval_inputs=[{"input_ids": x}])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    paths = sorted(get_state(model).blocks)
    assert set(tensors) == {f"base_model.model.{p}.lora_{ab}.weight" for p in paths for ab in "AB"}
    assert config["task_type"] == "CAUSAL_LM" and config["lora_alpha"] == config["r"] == 2
    assert config["fan_in_fan_out"] is (family == "gpt2")
    if res_type == "bs":  # ranks 2, 4, 6 along each chain of 3 layers
        assert sorted(set(config["rank_pattern"].values())) == [4, 6]
        assert config["alpha_pattern"] == config["rank_pattern"]
    report = json.loads((tmp_path / "merge_report.json").read_text())
    assert report["output_error"] == merged.report.output_error < 1e-6

    peft = _load_peft(family, tmp_path)
    torch.testing.assert_close(out(peft, x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out(peft.merge_and_unload(), x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("res_type", ["is", "ms"])
def test_peft_round_trip_within_reported_merge_error(tmp_path, res_type):
    model = with_reslora("llama", res_type, scale=0.05)
    calib = [{"input_ids": ids(4, 8, seed=s)} for s in (5, 6)]
    held_out = ids(2, 8, seed=7)
    y = out(model, held_out).double()
    merged = export_peft_adapter(model, tmp_path, "calibrated", calibration=calib, eval_inputs=[held_out])
    output_error = merged.report.output_error
    assert 0 < output_error < 0.5  # an approximation (x_{n-1} is not linear in x_n here)
    for peft_model in (_load_peft("llama", tmp_path), _load_peft("llama", tmp_path).merge_and_unload()):
        err = float((out(peft_model, held_out).double() - y).norm() / y.norm())
        assert err == pytest.approx(output_error, rel=1e-3)
    assert json.loads((tmp_path / "merge_report.json").read_text())["method"] == "calibrated"


def test_peft_sequence_classification_saves_the_trained_head(tmp_path):
    model = with_reslora("roberta", "bs", head="cls")
    model.classifier.requires_grad_(True)
    with torch.no_grad():  # "training" moved the head away from the base's
        for p in model.classifier.parameters():
            p.add_(torch.randn_like(p))
    x = ids()
    y = out(model, x)
    export_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.classifier.out_proj.weight" in keys
    peft = _load_peft("roberta", tmp_path, head="cls")
    torch.testing.assert_close(out(peft, x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out(peft.merge_and_unload(), x), y, rtol=1e-5, atol=1e-5)


def test_generate_after_export_matches_reslora(tmp_path):
    model = with_reslora("llama", "bs")
    x = ids(batch=2, length=4)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    want = model.generate(input_ids=x, **kwargs)
    export_peft_adapter(model, tmp_path)
    assert torch.equal(_load_peft("llama", tmp_path).generate(input_ids=x, **kwargs), want)


def test_export_errors_leave_existing_adapter_untouched(tmp_path):
    model = with_reslora("llama", "is")
    out(model, ids())
    export_peft_adapter(model, tmp_path, "weight")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="calibration"):
        export_peft_adapter(model, tmp_path, "calibrated")
    with pytest.raises(ValueError, match="contains the ResLoRA layer"):
        export_peft_adapter(model, tmp_path, "weight", modules_to_save=["layers.0"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# -- examples -------------------------------------------------------------------------
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    return load_script(EXAMPLES / f"{name}.py")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,metric", [("nlu_classification", "accuracy"), ("nlg_causal_lm", "exact_match")]
)
def test_examples_run_end_to_end(tmp_path, name, metric):
    argv = ["--max_train_steps", "2", "--max_train_samples", "64", "--max_eval_samples", "8"]
    argv += ["--merge", "calibrated", "distill", "--distill_steps", "2"]
    results = _example(name).main([*argv, "--res_type", "none", "ms", "--output_dir", str(tmp_path)])
    assert results["none"][f"peft_{metric}"] == results["none"][metric]  # plain LoRA exports exactly
    assert results["ms"]["merge_error"] > 0
    for method in ("none", "ms"):
        assert (tmp_path / method / "reslora.safetensors").is_file()  # ResLoRACallback at train end
        # one adapter per --merge, the first in peft_adapter; the top-level scores are the first's
        exports = results[method]["exports"]
        assert list(exports) == ["calibrated", "distill"]
        assert results[method]["merge_error"] == exports["calibrated"]["merge_error"]
        for merge, folder in (("calibrated", "peft_adapter"), ("distill", "peft_adapter_distill")):
            report = json.loads((tmp_path / method / folder / "merge_report.json").read_text())
            assert report["method"] == merge
            assert report["output_error"] == pytest.approx(exports[merge]["merge_error"])
