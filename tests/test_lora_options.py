"""LoRA's options through PEFT (glmtune/lora.py): DoRA, rsLoRA, gaussian/PiSSA/OLoRA initialization, LoRA+ and AdaLoRA.

Each option trains the tiny GLM a few steps through glmtune.workflow.run and predicts, then:
* the option is in adapter_config.json as PEFT writes it (PeftModel.from_pretrained reads it back);
* the adapter, reloaded by glmtune's loader, gives the trained model's logits and the same predictions;
* merged into the base (glmtune.lora.merge_and_save), it gives the adapter's logits with transformers alone.
LoRA+ and AdaLoRA's training-time parts are checked against computations made here.
"""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import TOY_DEV, TOY_TRAIN
from safetensors.torch import load_file
from test_trainer import run, train_flags
from test_warm_start import data_batch, logits_of, reloaded, train
from transformers import AutoModelForCausalLM, AutoTokenizer

from glmtune import workflow
from glmtune.arguments import IGNORE_INDEX
from glmtune.cli import main
from glmtune.lora import merge_and_save
from glmtune.parsing import parse_args

RANK = 4
COMMON = ["--lora_rank", str(RANK), "--lora_alpha", "8", "--lora_dropout", "0", "--learning_rate", "1e-2"]
PREDICT = ["--test_file", str(TOY_DEV), "--max_predict_samples", "4", "--max_new_tokens", "4"]
# option -> (flags, what adapter_config.json then holds)
OPTIONS = {
    "dora": (["--use_dora"], {"use_dora": True, "r": RANK}),
    "rslora": (["--use_rslora"], {"use_rslora": True, "r": RANK}),
    # how A started does not change what the trained adapter is: saved as true, which every PEFT version loads
    # (glmtune.adapter_config); run.json keeps the choice
    "gaussian": (["--init_lora_weights", "gaussian"], {"init_lora_weights": True}),
    # converted on save: a plain LoRA of twice the rank (and alpha) on the original base
    "pissa": (["--init_lora_weights", "pissa"], {"init_lora_weights": True, "r": 2 * RANK, "lora_alpha": 16}),
    "olora": (["--init_lora_weights", "olora"], {"init_lora_weights": True, "r": 2 * RANK, "lora_alpha": 16}),
    "loraplus": (["--loraplus_lr_ratio", "4"], {"peft_type": "LORA", "r": RANK}),
    "adalora": (
        ["--lora_variant", "adalora", "--adalora_init_rank", "6", "--adalora_tfinal", "1"],
        {"peft_type": "ADALORA", "target_r": RANK, "init_r": 6, "tfinal": 1, "total_step": 4},
    ),
}


def predictions(folder) -> list:
    return (folder / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("option", OPTIONS)
def test_option_trains_saves_reloads_predicts_and_merges(option, tiny_model_dir, tmp_path):
    flags, expected = OPTIONS[option]
    out = tmp_path / "out"
    steps = ["--save_strategy", "steps", "--save_steps", "4", "--do_predict", *PREDICT]
    config, model, _ = train("lora", tiny_model_dir, out, TOY_TRAIN, 4, *COMMON, *steps, *flags)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert expected.items() <= saved.items(), {key: saved.get(key) for key in expected}
    if "--init_lora_weights" in flags:
        identity = json.loads((out / "run.json").read_text())["trained_weights"]
        assert identity["init_lora_weights"] == flags[flags.index("--init_lora_weights") + 1]

    batch = data_batch(config)
    trained, base = logits_of(model, batch), logits_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch)
    assert (trained - base).abs().max() > 1e-3  # the adapter changes the model
    adapter = reloaded("lora", tiny_model_dir, out)
    torch.testing.assert_close(logits_of(adapter, batch), trained, atol=1e-5, rtol=1e-5)

    main("lora", [*_predict_flags(tiny_model_dir, tmp_path / "predict"), "--lora_checkpoint", str(out)])
    assert len(predictions(out)) == 4 and predictions(tmp_path / "predict") == predictions(out)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    merge_and_save(base, [str(out)], AutoTokenizer.from_pretrained(tiny_model_dir), str(tmp_path / "merged"), "2GB")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits_of(merged, batch), trained, atol=1e-5, rtol=1e-5)


def _predict_flags(model_dir, out) -> list:
    return [
        "--do_predict",
        "--model_name_or_path",
        str(model_dir),
        "--output_dir",
        str(out),
        "--max_source_length",
        "32",
        "--max_target_length",
        "16",
        "--report_to",
        "none",
        *PREDICT,
    ]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_step_checkpoint_keeps_peft_form_and_reloads_by_redoing_the_decomposition(init, tiny_model_dir, tmp_path):
    """checkpoint-N holds PEFT's own PiSSA/OLoRA adapter (what resuming loads into the run's changed base); loaded
    alone, PEFT decomposes the base again: the same model as the one trained, and the same as the converted one."""
    out = tmp_path / "out"
    steps = ["--save_strategy", "steps", "--save_steps", "2"]
    config, model, _ = train("lora", tiny_model_dir, out, TOY_TRAIN, 2, *COMMON, *steps, "--init_lora_weights", init)
    saved = json.loads((out / "checkpoint-2" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == init and saved["r"] == RANK
    batch = data_batch(config)
    trained = logits_of(model, batch)
    for folder in (out / "checkpoint-2", out):
        adapter = reloaded("lora", tiny_model_dir, folder)
        torch.testing.assert_close(logits_of(adapter, batch), trained, atol=1e-5, rtol=0)


def test_adalora_reallocates_ranks_down_to_its_budget(tiny_model_dir, tmp_path):
    """AdaLoRA's callback runs PEFT's update_and_allocate after each step: after the budget phase, the layers keep
    --lora_rank ranks on average (without it no rank would ever be pruned)."""
    flags = OPTIONS["adalora"][0]
    train("lora", tiny_model_dir, tmp_path / "out", TOY_TRAIN, 4, *COMMON, *flags)
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    kept = [sum(mask) for mask in saved["rank_pattern"].values()]
    assert len(kept) == 2 * 6 and sum(kept) == RANK * len(kept) and set(kept) != {RANK}


def test_adalora_trains_on_peft_loss_with_its_orthogonality_penalty(tiny_model_dir, tmp_path):
    """glmtune's target-token loss would drop AdaLoRA's penalty (PEFT adds it to the loss it computes from labels):
    an AdaLoRA run uses transformers' loss, and the training loss is cross-entropy + 0.5 x the mean penalty."""
    config = parse_args(
        "lora",
        [
            "--do_train",
            "--train_file",
            str(TOY_TRAIN),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_train_samples",
            "4",
            "--max_steps",
            "4",
            "--max_source_length",
            "32",
            "--max_target_length",
            "16",
            *COMMON,
            *OPTIONS["adalora"][0],
        ],
    )
    assert config.run.target_token_loss is False
    tokenizer, prompt_format, datasets = workflow.prepare_data(config)
    model = workflow.build_model(config, len(tokenizer)).train()
    collator = workflow.training_collator(config, tokenizer)
    trainer = workflow.build_trainer(config, model, tokenizer, datasets, prompt_format, collator)
    assert trainer.target_loss is None
    batch = collator([datasets["train"][i] for i in range(4)])
    loss = trainer.compute_loss(model, batch).item()

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:].reshape(-1)
    cross_entropy = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels, ignore_index=IGNORE_INDEX)
    penalty = torch.stack([_orthogonality(name, p) for name, p in model.named_parameters() if _in_svd_form(name)])
    assert len(penalty) == 2 * 2 * 6 and penalty.mean() > 0.1
    assert loss == pytest.approx(cross_entropy.item() + 0.5 * penalty.mean().item(), rel=1e-5)


def _in_svd_form(name: str) -> bool:
    return "lora_A" in name or "lora_B" in name


def _orthogonality(name: str, p: torch.Tensor) -> torch.Tensor:
    """||P P^T - I|| for AdaLoRA's right singular vectors (lora_A), ||Q^T Q - I|| for its left ones (lora_B)."""
    gram = p @ p.T if "lora_A" in name else p.T @ p
    return torch.linalg.matrix_norm(gram.detach() - torch.eye(len(gram)))


def test_loraplus_moves_b_ratio_times_as_far_in_the_first_step(tiny_model_dir, tmp_path):
    """LoRA+ (PEFT's create_loraplus_optimizer as Trainer's optimizer): B's learning rate is the ratio times A's.
    In the first step B starts at zero, so A's gradient is zero and A stays; Adam's first update is lr x g / |g|,
    so B moves exactly ratio times as far as with one learning rate."""
    weights = {}
    for ratio in (None, 16):
        out = tmp_path / str(ratio)
        extra = [] if ratio is None else ["--loraplus_lr_ratio", str(ratio)]
        run("lora", tiny_model_dir, out, *train_flags("lora", steps=1, save_steps=10), "--lora_dropout", "0", *extra)
        weights[ratio] = load_file(str(out / "adapter_model.safetensors"))
    plain, plus = weights[None], weights[16]
    for name in plain:
        if "lora_A" in name:
            torch.testing.assert_close(plus[name], plain[name], atol=0, rtol=0)
        else:
            assert plain[name].abs().max() > 0
            torch.testing.assert_close(plus[name], 16 * plain[name], atol=1e-7, rtol=1e-4)


def test_loraplus_resumes_to_the_uninterrupted_weights(tiny_model_dir, tmp_path):
    """Trainer saves and resumes LoRA+'s optimizer (its four parameter groups) as its own."""
    flags = [*train_flags("lora"), "--loraplus_lr_ratio", "16"]
    run("lora", tiny_model_dir, tmp_path / "full", *flags)
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "cut" / "checkpoint-3")
    run("lora", tiny_model_dir, tmp_path / "cut", *flags, "--resume_from_checkpoint", "last")
    full = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    start = load_file(str(tmp_path / "full" / "checkpoint-3" / "adapter_model.safetensors"))
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(full[name], start[name]) for name in full)


def test_a_pissa_run_resumes_to_the_uninterrupted_adapter(tiny_model_dir, tmp_path):
    """Resuming rebuilds the PiSSA start from the base (the same decomposition) and loads checkpoint-3, kept in
    PEFT's form, into it: the final adapter, converted on save, is the uninterrupted run's."""
    flags = [*train_flags("lora"), "--lora_dropout", "0", "--init_lora_weights", "pissa"]
    run("lora", tiny_model_dir, tmp_path / "full", *flags)
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "cut" / "checkpoint-3")
    run("lora", tiny_model_dir, tmp_path / "cut", *flags, "--resume_from_checkpoint", "last")
    full = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert full.keys() == resumed.keys() and all(t.shape[0] == 2 * RANK for k, t in full.items() if "lora_A" in k)
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=1e-5)


def test_adalora_step_does_not_depend_on_the_micro_batch_split(tiny_model_dir, tmp_path):
    """AdaLoRA's orthogonality penalty is added to each micro-batch's loss: one optimizer step over the same 8
    samples as 8 x 1 or 2 x 4 must still give the same update (the memory plan may choose either)."""
    from test_memory_plan import one_step

    flags = ["--lora_variant", "adalora", "--adalora_init_rank", "4", "--lora_dropout", "0"]
    whole = one_step("lora", tiny_model_dir, tmp_path / "whole", 8, 1, *flags)
    split = one_step("lora", tiny_model_dir, tmp_path / "split", 2, 4, *flags)
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-5)
    saved = json.loads((tmp_path / "split" / "adapter_config.json").read_text())
    assert saved["orth_reg_weight"] == 0.5  # PEFT's weight, not the one scaled while accumulating
