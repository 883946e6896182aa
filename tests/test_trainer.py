"""Through the real entry point, in-process: what a checkpoint holds, that it reloads to the same
predictions, and that --resume_from_checkpoint continues to the same weights as an uninterrupted run."""

import json
import shutil

import pytest
import torch
from conftest import TOY_DEV, TOY_TRAIN
from safetensors.torch import load_file

from glmtune.cli import main

METHOD_FLAGS = {
    "ptuning": ["--pre_seq_len", "4", "--learning_rate", "1e-2"],
    "lora": ["--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2"],
    "finetune": ["--learning_rate", "1e-3"],
}


def run(method, model_dir, output_dir, *flags):
    return main(method, argv(model_dir, output_dir, *flags))


def argv(model_dir, output_dir, *flags) -> list:
    """The command line the tests' runs share (small lengths and samples), then ``flags``."""
    common = [
        "--model_name_or_path",
        str(model_dir),
        "--output_dir",
        str(output_dir),
        "--max_source_length",
        "32",
        "--max_target_length",
        "16",
        "--max_new_tokens",
        "8",
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "4",
        "--max_train_samples",
        "48",
        "--max_predict_samples",
        "6",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--seed",
        "7",
        "--dataloader_num_workers",
        "0",
    ]
    return common + list(flags)


def train_flags(method, steps=6, save_steps=3):
    return [
        "--do_train",
        "--train_file",
        str(TOY_TRAIN),
        "--max_steps",
        str(steps),
        "--save_steps",
        str(save_steps),
        *METHOD_FLAGS[method],
    ]


PREDICT = ["--do_predict", "--test_file", str(TOY_DEV)]


def trained_weights(folder, method):
    names = {
        "ptuning": "prefix_encoder.safetensors",
        "lora": "adapter_model.safetensors",
        "finetune": "model.safetensors",
    }
    return load_file(str(folder / names[method]))


def test_ptuning_checkpoint_holds_only_the_prefix_encoder(tiny_model_dir, tmp_path):
    run("ptuning", tiny_model_dir, tmp_path / "out", *train_flags("ptuning"))
    for folder in (tmp_path / "out", tmp_path / "out" / "checkpoint-3"):
        assert set(trained_weights(folder, "ptuning")) == {"embedding.weight"}
        assert not list(folder.glob("model*.safetensors")) and not list(folder.glob("pytorch_model*"))
        config = json.loads((folder / "prefix_config.json").read_text())
        assert config["pre_seq_len"] == 4 and config["num_layers"] == 2 and config["kv_heads"] == 2
    assert trained_weights(tmp_path / "out", "ptuning")["embedding.weight"].shape == (4, 2 * 2 * 2 * 32)
    step_files = {p.name for p in (tmp_path / "out" / "checkpoint-3").iterdir()}
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= step_files


def test_lora_checkpoint_is_a_peft_adapter_with_only_lora_weights(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run("lora", tiny_model_dir, tmp_path / "out", *train_flags("lora"))
    weights = trained_weights(tmp_path / "out", "lora")
    assert weights and all("lora_A" in key or "lora_B" in key for key in weights)
    adapted = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in weights}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}  # all linear layers
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, tmp_path / "out")  # the standard PEFT loader
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained, not the zero init


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_reloaded_checkpoint_predicts_what_the_trained_model_predicted(tiny_model_dir, tmp_path, method):
    run(method, tiny_model_dir, tmp_path / "out", *train_flags(method), *PREDICT)
    checkpoint_flag = "--ptuning_checkpoint" if method == "ptuning" else "--lora_checkpoint"
    run(method, tiny_model_dir, tmp_path / "reloaded", *PREDICT, checkpoint_flag, str(tmp_path / "out"))
    in_memory = (tmp_path / "out" / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    reloaded = (tmp_path / "reloaded" / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    assert len(in_memory) == 6 and reloaded == in_memory
    scores = json.loads((tmp_path / "reloaded" / "predict_results.json").read_text())
    assert {"predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4"} <= scores.keys()


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_resume_from_checkpoint_reaches_the_uninterrupted_weights(tiny_model_dir, tmp_path, method):
    run(method, tiny_model_dir, tmp_path / "full", *train_flags(method))
    # What an interrupted run leaves behind: only checkpoint-3 of the same run.
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "cut" / "checkpoint-3")
    run(method, tiny_model_dir, tmp_path / "cut", *train_flags(method), "--resume_from_checkpoint", "last")
    state = json.loads((tmp_path / "cut" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4, 5, 6]
    full, resumed = trained_weights(tmp_path / "full", method), trained_weights(tmp_path / "cut", method)
    start = trained_weights(tmp_path / "full" / "checkpoint-3", method)
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(full[key], start[key]) for key in full)  # steps 4-6 did change the weights
