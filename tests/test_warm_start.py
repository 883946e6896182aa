"""Continued training (a warm start): --ptuning_checkpoint / --lora_checkpoint with --do_train start from the
checkpoint's weights and train them on new data, with a new optimizer and schedule (--resume_from_checkpoint
continues the same run instead: tests/test_trainer.py).

Each case trains a checkpoint on the toy training rows, then continues it on the dev rows: the weights at the start
are the checkpoint's, the first step's loss is the checkpoint's loss on the new data (computed here apart from the
Trainer), far below a fresh start's, and the continued weights reload to the model that trained them. On the tiny
GLM and on a tiny ChatGLM2 folder (original layout and tokenizer, from ../shared).
"""

import json
import shutil

import pytest
import torch
from conftest import GOLDEN, SHARED_MISSING, TOY_DEV, TOY_TRAIN, chatglm_folder
from safetensors.torch import load_file
from transformers import TrainerCallback

from glmtune import workflow
from glmtune.arguments import LoraArguments, ModelArguments, PtuningArguments
from glmtune.cli import main
from glmtune.data import Collator
from glmtune.lora import add_lora
from glmtune.model import load_base_model
from glmtune.parsing import parse_args
from glmtune.ptuning import add_prefix_encoder

ROWS = 8  # one batch of every row: a step's loss does not depend on the order of the rows
# Dropout off, so that the step's loss (in training mode) is the loss computed here in evaluation mode.
SHAPE_FLAGS = {"ptuning": ["--pre_seq_len", "4"], "lora": ["--lora_rank", "4", "--lora_dropout", "0"]}
TRAINING_FLAGS = {"ptuning": ["--prefix_dropout", "0", "--learning_rate", "3e-1"], "lora": ["--learning_rate", "5e-2"]}
WEIGHTS_FILE = {"ptuning": "prefix_encoder.safetensors", "lora": "adapter_model.safetensors"}


class Recorder(TrainerCallback):
    """The trained weights as training starts, and the model trained (a callback of the real run)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.start = trained_weights(model)


def trained_weights(model) -> dict:
    """name -> tensor of the trainable weights, named as in the saved file."""
    return {saved_name(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def saved_name(name: str) -> str:
    return name.replace(".default", "").removeprefix("prefix_encoder.")


def train(method, model_dir, out, data, steps, *flags, rows=ROWS):
    """A training run through glmtune.workflow.run; returns (its config, the trained model, weights at its start)."""
    argv = [
        "--do_train",
        "--model_name_or_path",
        str(model_dir),
        "--output_dir",
        str(out),
        "--train_file",
        str(data),
        "--max_train_samples",
        str(rows),
        "--per_device_train_batch_size",
        str(ROWS),
        "--max_steps",
        str(steps),
        "--max_source_length",
        "32",
        "--max_target_length",
        "16",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--lr_scheduler_type",
        "constant",
        "--report_to",
        "none",
        "--seed",
        "7",
        *flags,
    ]
    config, recorder = parse_args(method, argv), Recorder()
    workflow.run(config, callbacks=[recorder])
    return config, recorder.model.eval(), recorder.start


def losses(out) -> list:
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def reloaded(method, model_dir, checkpoint):
    """The base with the checkpoint loaded by glmtune's loaders, outside any Trainer."""
    base = load_base_model(ModelArguments(model_name_or_path=str(model_dir), torch_dtype="float32"))
    if method == "ptuning":
        return add_prefix_encoder(base, PtuningArguments(ptuning_checkpoint=str(checkpoint))).eval()
    return add_lora(base, LoraArguments(lora_checkpoint=str(checkpoint))).eval()


def data_batch(config) -> dict:
    """The run's training rows, tokenized and padded by glmtune (one batch)."""
    tokenizer, _, datasets = workflow.prepare_data(config)
    rows = [{k: row[k] for k in ("input_ids", "labels")} for row in datasets["train"]]
    return Collator(tokenizer.pad_token_id, "right")(rows)


def loss_of(model, batch) -> float:
    """transformers' loss (mean over the answer tokens) of the padded batch."""
    with torch.no_grad():
        return model(**batch).loss.item()


def logits_of(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module", params=["glm", "chatglm2"])
def base(request, tiny_model_dir, tmp_path_factory):
    if request.param == "glm":
        return tiny_model_dir
    if not GOLDEN.is_dir():
        pytest.skip(SHARED_MISSING)
    return chatglm_folder("v2", tmp_path_factory.mktemp("chatglm2") / "model")


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_warm_start_trains_the_checkpoint_on_new_data(method, base, tmp_path, caplog):
    flags, checkpoint_flag = SHAPE_FLAGS[method] + TRAINING_FLAGS[method], f"--{method}_checkpoint"
    train(method, base, tmp_path / "first", TOY_TRAIN, 30, *flags, rows=8 * ROWS)  # token statistics, not rows
    checkpoint = tmp_path / "first"
    first = losses(checkpoint)
    assert first[-1] < first[0] - 0.5  # the checkpoint learned something

    caplog.set_level("INFO", logger="glmtune.workflow")
    warm = [checkpoint_flag, str(checkpoint), *TRAINING_FLAGS[method]]  # the shape comes from the checkpoint
    config, model, start = train(method, base, tmp_path / "next", TOY_DEV, 3, *warm)
    assert f"Continuing training from {checkpoint} (warm start: new optimizer and schedule)" in caplog.text
    saved = load_file(str(checkpoint / WEIGHTS_FILE[method]))
    assert start.keys() == saved.keys() and start
    for name, tensor in saved.items():  # it starts from the checkpoint's weights, all of them trainable
        torch.testing.assert_close(start[name], tensor, atol=0, rtol=0)

    batch = data_batch(config)
    continued, checkpoint_loss = losses(tmp_path / "next"), loss_of(reloaded(method, base, checkpoint), batch)
    assert continued[0] == pytest.approx(checkpoint_loss, rel=1e-4)  # step 1 is the checkpoint on the new rows
    train(method, base, tmp_path / "fresh", TOY_DEV, 1, *flags)
    fresh = losses(tmp_path / "fresh")
    assert fresh[0] - continued[0] > 0.5 * (first[0] - first[-1])  # most of what it learned carries over
    assert continued[0] == pytest.approx(first[-1], abs=0.5 * (first[0] - first[-1]))  # the checkpoint's level

    final = load_file(str(tmp_path / "next" / WEIGHTS_FILE[method]))
    assert any(not torch.equal(final[name], saved[name]) for name in saved)  # it trained
    torch.testing.assert_close(logits_of(reloaded(method, base, tmp_path / "next"), batch), logits_of(model, batch))
    identity = json.loads((tmp_path / "next" / "run.json").read_text())["trained_weights"]
    expected = {"pre_seq_len": 4} if method == "ptuning" else {"lora_rank": 4}
    assert expected.items() <= identity.items()  # the checkpoint's shape (no shape flag was given)


def test_a_warm_start_takes_the_checkpoints_settings_and_may_set_its_dropout(tiny_model_dir, lora_checkpoint, tmp_path):
    """No shape flag given: rank, alpha and targets are the adapter's (rank 4, alpha 32); --lora_dropout, a
    training setting, is the one given. The adapter loads trainable (PEFT loads adapters frozen by default)."""
    argv = ["--do_train", "--train_file", str(TOY_TRAIN), "--model_name_or_path", str(tiny_model_dir)]
    argv += ["--output_dir", str(tmp_path / "out"), "--lora_checkpoint", str(lora_checkpoint), "--lora_dropout", "0.3"]
    config = parse_args("lora", argv)
    assert (config.lora.lora_rank, config.lora.lora_alpha, config.lora.lora_dropout) == (4, 32.0, 0.3)
    base = load_base_model(ModelArguments(model_name_or_path=str(tiny_model_dir), torch_dtype="float32"))
    model = add_lora(base, config.lora, trainable=True)
    dropouts = {m.p for name, m in model.named_modules() if name.endswith("lora_dropout.default")}
    assert dropouts == {0.3}
    lora_weights = [p for name, p in model.named_parameters() if "lora_" in name]
    assert len(lora_weights) == 2 * 2 * 6 and all(p.requires_grad for p in lora_weights)


def test_an_adapter_with_peft_settings_glmtune_has_no_flag_for_loads_as_peft_wrote_it(
    tiny_model_dir, lora_checkpoint, tmp_path
):
    """init_lora_weights false (no --init_lora_weights value): irrelevant to a trained adapter, not refused."""
    folder = shutil.copytree(lora_checkpoint, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": False}))
    out = tmp_path / "predict"
    main(
        "lora",
        ["--do_predict", "--test_file", str(TOY_DEV), "--max_predict_samples", "2", "--max_new_tokens", "2"]
        + ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--lora_checkpoint", str(folder)],
    )
    assert len((out / "generated_predictions.txt").read_text().splitlines()) == 2
