"""A narrow Seq2SeqTrainer subclass: save/load only the trained weights, generate for evaluation.

Checkpoints (``checkpoint-N/`` and the final output folder):

* P-Tuning v2: ``prefix_encoder.safetensors`` + ``prefix_config.json`` (pre_seq_len, projection, shape);
* LoRA: PEFT's ``adapter_model.safetensors`` + ``adapter_config.json`` (``PeftModel.from_pretrained`` loads it);
* both: tokenizer files, ``training_args.bin``, and in step checkpoints the optimizer, scheduler, RNG and
  ``trainer_state.json`` that ``--resume_from_checkpoint`` needs.
"""

import contextlib
import glob
import json
import os
import shutil

import torch
from transformers import Seq2SeqTrainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from glmtune.adapters import is_prefix_tuned, load_prefix_weights, save_prefix_checkpoint
from glmtune.loss import TargetTokenLoss
from glmtune.metrics import blank_stop_tokens, decode_texts
from glmtune.model import base_causal_lm

PREDICTIONS_FILE = "generated_predictions.txt"


class GlmtuneTrainer(Seq2SeqTrainer):
    def __init__(
        self, *args, eval_collator=None, generate_kwargs: dict | None = None, target_token_loss=True, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator or self.data_collator
        self.generate_kwargs = generate_kwargs or {}
        causal_lm = base_causal_lm(self.model)
        # ZeRO-3 gathers a weight only inside its module's forward; the target-token loss reads the output
        # head's weight after the model's forward, so under ZeRO-3 transformers' own loss is used.
        zero3 = is_deepspeed_zero3_enabled()
        use_target_loss = target_token_loss and TargetTokenLoss.supports(causal_lm) and not zero3
        self.target_loss = TargetTokenLoss(causal_lm) if use_target_loss else None
        if zero3 and is_prefix_tuned(self.model):
            _gather_prefix_embedding_in_forward(self.model.prefix_encoder)
        # Trainer applies --logging_nan_inf_filter with bool(torch.isnan(loss)): a host sync after every
        # backward that idled the GPU for the host's whole optimizer-step and next-batch work (~10 ms a step
        # on an H100). training_step applies the same filter on the device instead.
        self.filter_nan_inf_losses, self.args.logging_nan_inf_filter = self.args.logging_nan_inf_filter, False

    # ------------------------------------------------------------------ host work per step
    # On a GPU the host must queue each step faster than the GPU runs it (LoRA's steps on an H100 were
    # host-bound: the GPU idled a third of each profiled step). Trainer walks every submodule or parameter
    # several times a step; with LoRA on every linear layer of a 28-layer model that is ~2,000 modules and
    # ~650 parameters per walk.

    def training_step(self, model, inputs, num_items_in_batch=None):
        with _train_mode_kept(model):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.filter_nan_inf_losses:  # a nan/inf step counts as the average of the steps logged so far (as Trainer)
            steps_since_log = 1 + self.state.global_step - self._globalstep_last_logged
            loss = torch.where(torch.isfinite(loss), loss, self._tr_loss / steps_since_log)
        return loss

    def floating_point_ops(self, inputs) -> int:
        """Trainer's count (6 x tokens x non-embedding parameters), with the parameters counted once, not every step."""
        if getattr(self, "_non_embedding_parameters", None) is None:
            self._non_embedding_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self._non_embedding_parameters

    def _clip_grad_norm(self, model):
        """Clip over the trained parameters only (the frozen base has no gradients: the same norm)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._clip_grad_norm(model)
        if getattr(self, "_trained_parameters", None) is None:
            self._trained_parameters = [p for p in model.parameters() if p.requires_grad]
        return self.accelerator.clip_grad_norm_(self._trained_parameters, self.args.max_grad_norm)

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training steps use the target-token loss (glmtune.loss); evaluation keeps transformers' own."""
        inputs = dict(inputs)
        target_index = inputs.pop("target_index", None)  # from the training collators (glmtune.data.target_index)
        if return_outputs or self.target_loss is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        with self.target_loss.capture():
            model(
                **inputs, logits_to_keep=1, use_cache=False
            )  # logits for one position only: the head runs in the loss
        loss = self.target_loss(labels, num_items_in_batch, target_index)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # num_items_in_batch counts every process's targets
        return loss

    # Generation needs left padding, training right padding: evaluation batches use their own collator.
    def get_eval_dataloader(self, eval_dataset=None):
        with self._collating_with(self.eval_collator):
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._collating_with(self.eval_collator):
            return super().get_test_dataloader(test_dataset)

    @contextlib.contextmanager
    def _collating_with(self, collator):
        train_collator, self.data_collator = self.data_collator, collator
        try:
            yield
        finally:
            self.data_collator = train_collator

    # ------------------------------------------------------------------ saving and loading

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not is_prefix_tuned(model):
            return super()._save(output_dir, state_dict)  # PEFT's save_pretrained writes the adapter only
        output_dir = output_dir or self.args.output_dir
        save_prefix_checkpoint(model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not (self.is_deepspeed_enabled and is_prefix_tuned(model)):
            return super().save_model(output_dir, _internal_call)
        # Trainer would gather the whole model's state dict under DeepSpeed (all of the frozen base, to keep
        # a prefix of a few MB); ZeRO-3 partitions the prefix encoder too, so gather only its weights.
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.prefix_encoder.parameters())):
            if self.args.should_save:
                self._save(output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        # Why: a run killed mid-save left a partial checkpoint-N, and --resume_from_checkpoint last
        # (get_last_checkpoint) resumed from it. So every file of step N is written to tmp-checkpoint-N
        # and renamed to checkpoint-N in one os.replace once complete. get_last_checkpoint and rotation
        # match only ^checkpoint-N$, so a tmp- leftover is never resumed from; the next save deletes it.
        # Trainer._save_checkpoint builds the folder name itself, so the one hook it offers is the folder
        # it asks for (_get_output_dir): super() writes tmp-checkpoint-N/checkpoint-N, we move that up.
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, staging = os.path.join(run_dir, name), os.path.join(run_dir, "tmp-" + name)
        if self.args.should_save:
            for leftover in glob.glob(os.path.join(run_dir, f"tmp-{PREFIX_CHECKPOINT_DIR}-*")):
                shutil.rmtree(leftover, ignore_errors=True)
        # Several processes: every rank writes its own files into the folder (rng_state_{rank}.pth, DeepSpeed's
        # shards), only the main process renames it, and no rank goes on before it is renamed.
        self.accelerator.wait_for_everyone()  # the leftovers are gone before anyone writes
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # writes staging/checkpoint-N (its rotation sees only that one)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every rank's files are complete
        if self.state.best_model_checkpoint == os.path.join(staging, name):  # found under staging: name its home
            self.state.best_model_checkpoint = final  # on every rank: each loads the best model at the end
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staging, name, TRAINER_STATE_NAME))
        if self.args.should_save:
            _publish(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()  # every rank sees checkpoint-N, not tmp-checkpoint-N

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model
        if is_prefix_tuned(self.accelerator.unwrap_model(model)):
            load_prefix_weights(self.accelerator.unwrap_model(model), resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if is_prefix_tuned(model):
            load_prefix_weights(model, self.state.best_model_checkpoint)
        else:
            super()._load_best_model()

    # ------------------------------------------------------------------ generation

    def evaluation_loop(self, *args, **kwargs):
        # Seq2SeqTrainer gathers with accelerator.gather ("we don't want to drop samples"), which keeps the rows
        # that the last batch repeats so that every process gets one: with several processes they were scored
        # and written twice. gather_for_metrics drops exactly those, so each row comes back once, in order.
        self.gather_function = self.accelerator.gather_for_metrics
        return super().evaluation_loop(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """Generate from the left-padded prompt and return only the new tokens (the prompt is cut off)."""
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        prompt = inputs["input_ids"]
        # ZeRO-3: every rank takes part in each forward, so all keep generating until the longest is done.
        gen_kwargs.setdefault("synced_gpus", is_deepspeed_zero3_enabled())
        # Compiled layers (--compile_layers) are compiled for training; the KV cache would recompile them per layer.
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            generated = self.model.generate(
                input_ids=prompt, attention_mask=inputs["attention_mask"], **{**self.generate_kwargs, **gen_kwargs}
            )
        kwargs = self.generate_kwargs
        new_tokens = blank_stop_tokens(generated[:, prompt.shape[1] :], kwargs["eos_token_id"], kwargs["pad_token_id"])
        return None, new_tokens, inputs.get("labels")

    def save_predictions(self, prediction_output, output_dir: str | None = None) -> str:
        """Write ``generated_predictions.txt``: one ``{"labels", "predict"}`` JSON per input row, in order."""
        path = os.path.join(output_dir or self.args.output_dir, PREDICTIONS_FILE)
        if not self.is_world_process_zero():
            return path
        predictions = decode_texts(self.processing_class, prediction_output.predictions)
        labels = decode_texts(self.processing_class, prediction_output.label_ids)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for label, prediction in zip(labels, predictions):
                f.write(json.dumps({"labels": label, "predict": prediction}, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)  # a reader never sees a half-written file
        return path


@contextlib.contextmanager
def _train_mode_kept(model):
    """Trainer.training_step calls ``model.train()`` every step, a walk that sets ``training`` on every
    submodule through ``nn.Module.__setattr__`` (slow Python). When every submodule is in training mode
    already, reading the flags is enough. All of them, not the top one: a PEFT wrapper is created in
    training mode around a base that from_pretrained left in eval mode."""
    if not all(module.training for module in model.modules()):
        yield
        return
    model.train = lambda mode=True: model if mode else type(model).train(model, mode)
    try:
        yield
    finally:
        del model.train


def _publish(complete: str, final: str) -> None:
    """Rename a complete checkpoint folder to its final name (replacing an older save of the same step)."""
    if os.path.isdir(final):  # the same step saved again (resumed from an older checkpoint)
        shutil.rmtree(final)
    os.replace(complete, final)


def _gather_prefix_embedding_in_forward(encoder) -> None:
    """ZeRO-3 partitions every weight and gathers a module's own weights for its forward; the prefix
    encoder reads its embedding's weight without calling the embedding, so it must gather that one too."""
    import deepspeed

    deepspeed.zero.register_external_parameter(encoder, encoder.embedding.weight)
