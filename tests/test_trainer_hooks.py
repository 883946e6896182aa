"""The private parts of transformers' Trainer that glmtune relies on (glmtune/trainer.py, glmtune/speed/trainer.py).

Each test fails if transformers stops calling a private hook the way glmtune's override expects, or renames
the private state it reads: then the override would silently stop working instead of failing.
"""

import inspect
import json

import pytest
import torch
from conftest import TOY_DEV, TOY_TRAIN
from safetensors.torch import load_file
from test_loss import adapted, train_curve
from test_trainer import run
from transformers import Trainer

from glmtune.speed import FastStepTrainer
from glmtune.trainer import allow_quantized_base


def source(function) -> str:
    return inspect.getsource(function)


def test_checkpoint_saving_asks_get_output_dir_for_its_folder_and_saves_through_save_model():
    """GlmtuneTrainer._save_checkpoint stages a checkpoint by answering _get_output_dir, and saves the
    trained weights in save_model: Trainer._save_checkpoint must still ask for both."""
    code = source(Trainer._save_checkpoint)
    assert "self._get_output_dir(" in code and "self.save_model(output_dir, _internal_call=True)" in code
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]


def test_resume_and_best_model_load_through_the_overridden_hooks():
    assert "self._load_from_checkpoint(" in source(Trainer.train)
    assert "self._load_best_model()" in source(Trainer._finalize_training)


def test_the_best_prefix_is_loaded_at_the_end(tiny_model_dir, tmp_path):
    """--load_best_model_at_end with P-Tuning v2: the final prefix is the best checkpoint's. "Best" here is the
    highest eval loss, so the first checkpoint, not the last (Trainer alone would find no model file in it)."""
    run(
        "ptuning",
        tiny_model_dir,
        tmp_path / "out",
        "--do_train",
        "--train_file",
        str(TOY_TRAIN),
        "--do_eval",
        "--validation_file",
        str(TOY_DEV),
        "--max_eval_samples",
        "8",
        "--max_steps",
        "6",
        "--save_steps",
        "2",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--load_best_model_at_end",
        "--metric_for_best_model",
        "eval_loss",
        "--greater_is_better",
        "True",
        "--pre_seq_len",
        "4",
        "--learning_rate",
        "5e-2",
    )
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"].endswith("checkpoint-2")
    final = load_file(str(tmp_path / "out" / "prefix_encoder.safetensors"))
    best = load_file(str(tmp_path / "out" / "checkpoint-2" / "prefix_encoder.safetensors"))
    last = load_file(str(tmp_path / "out" / "checkpoint-6" / "prefix_encoder.safetensors"))
    torch.testing.assert_close(final, best, atol=0, rtol=0)
    assert not torch.equal(final["embedding.weight"], last["embedding.weight"])


class CountingTrainer(FastStepTrainer):
    clip_calls = 0

    def _clip_grad_norm(self, model):
        CountingTrainer.clip_calls += 1
        return super()._clip_grad_norm(model)


def test_gradient_clipping_goes_through_clip_grad_norm(model, tokenizer, tmp_path):
    """FastStepTrainer clips over the trained parameters in _clip_grad_norm: Trainer must call it every step."""
    CountingTrainer.clip_calls = 0
    train_curve(adapted(model, "lora"), tokenizer, tmp_path, steps=3, trainer_class=CountingTrainer, max_grad_norm=1.0)
    assert CountingTrainer.clip_calls == 3


def test_nan_filter_reads_trainers_running_loss_and_last_logged_step():
    """FastStepTrainer applies --logging_nan_inf_filter on the device with Trainer's own running sum and last
    logged step (tests/test_loss.py checks the logged values); both must still be what Trainer's filter uses."""
    loop = source(Trainer._inner_training_loop) + source(Trainer._run_epoch) + source(Trainer._maybe_log_save_evaluate)
    assert "self.args.logging_nan_inf_filter" in loop
    assert "self._tr_loss += self._tr_loss / (1 + self.state.global_step - self._globalstep_last_logged)" in loop
    assert "self._globalstep_last_logged = self.state.global_step" in loop


def test_training_step_sets_train_mode_with_model_train():
    """FastStepTrainer replaces the per-step model.train() walk by reading the flags (tests/test_loss.py checks
    that every layer still trains in every step)."""
    assert "model.train()" in source(Trainer.training_step)


def test_evaluation_gathers_through_gather_function():
    """GlmtuneTrainer.evaluation_loop sets gather_function to gather_for_metrics (each row once)."""
    assert "self.gather_function(" in source(Trainer.evaluation_loop)


@pytest.mark.parametrize("peft_loaded", [False, True])
def test_quantized_base_is_allowed_through_the_flag_trainer_reads(peft_loaded):
    """A quantized base carrying a prefix (or nothing, for evaluation) passes Trainer's check only with the
    private flag allow_quantized_base sets."""
    from transformers.trainer_utils import validate_quantization_for_training

    class QuantizedBase(torch.nn.Module):
        is_quantized = True

    model = QuantizedBase()
    if peft_loaded:
        allow_quantized_base(model)
        validate_quantization_for_training(model)
    else:
        with pytest.raises(ValueError, match="purely quantized"):
            validate_quantization_for_training(model)
