"""A narrow Seq2SeqTrainer subclass: save and load only the trained weights, atomic checkpoints, generation.

Checkpoints (``checkpoint-N/`` and the final output folder):

* P-Tuning v2: ``prefix_encoder.safetensors`` + ``prefix_config.json`` (:func:`glmtune.ptuning.save_checkpoint`);
* LoRA: PEFT's ``adapter_model.safetensors`` + ``adapter_config.json`` (``PeftModel.from_pretrained`` loads it;
  the config rewritten so that PEFT 0.6 and later all load it: :mod:`glmtune.adapter_config`; a PiSSA/OLoRA
  run's final adapter converted to a plain LoRA, :func:`glmtune.lora.save_adapter`);
* full fine-tuning: a complete model folder, sharded safetensors + config (:func:`glmtune.finetune.save_model_folder`);
* all: tokenizer files, ``training_args.bin``, and in step checkpoints the optimizer, scheduler, RNG and
  ``trainer_state.json`` that ``--resume_from_checkpoint`` needs.

Private Trainer methods overridden here, each for the reason on its line; tests/test_trainer_hooks.py fails
if transformers stops calling them the way relied on:

* ``_save_checkpoint`` / ``_get_output_dir``: a step checkpoint appears complete or not at all;
* ``_load_from_checkpoint`` / ``_load_best_model``: Trainer knows only full models and PEFT adapters, not a prefix.

Trainer's own call of ``self.model.save_pretrained`` is relied on too (:func:`_embeddings_saved_once`).
"""

import contextlib
import functools
import glob
import json
import os
import shutil

import torch
from transformers import Seq2SeqTrainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from glmtune import adapter_config, finetune, lora, ptuning, runs, vocabulary
from glmtune.generation import blank_stop_tokens
from glmtune.metrics import decode_texts

PREDICTIONS_FILE = "generated_predictions.txt"


class GlmtuneTrainer(Seq2SeqTrainer):
    def __init__(
        self,
        *args,
        eval_collator=None,
        generate_kwargs: dict | None = None,
        generate_eagerly=False,
        run_identity: dict | None = None,
        make_optimizer=None,
        **kwargs,
    ):
        """``generate_eagerly``: the decoder layers were compiled for training; with a KV cache they would be
        recompiled for every layer, so generation runs them eagerly. ``run_identity``: written beside the trained
        weights (glmtune.runs), so that a resume can tell this run's checkpoints from another's.
        ``make_optimizer(model, args)``: the method's own optimizer (LoRA+), instead of Trainer's."""
        allow_quantized_base(kwargs.get("model"))
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator or self.data_collator
        self.generate_kwargs = generate_kwargs or {}
        self.generation_stance = "force_eager" if generate_eagerly else "default"
        self.run_identity = run_identity
        self.make_optimizer = make_optimizer
        if self.args.device.type == "cpu" and self.args.device.index is not None:
            _load_cpu_indexed_storage()

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

    def create_optimizer(self, model=None):
        """Trainer's public hook for another optimizer; Trainer builds and resumes it as its own."""
        if self.optimizer is None and self.make_optimizer is not None:
            self.optimizer = self.make_optimizer(self.model if model is None else model, self.args)
        return super().create_optimizer(model)

    # ------------------------------------------------------------------ saving and loading

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """P-Tuning v2: only the prefix encoder (Trainer would save the whole base); LoRA: Trainer's own save,
        which for a PEFT model writes the adapter only; full fine-tuning: the whole model, in shards. All: the
        run's identity beside the weights."""
        output_dir = output_dir or self.args.output_dir
        self._save_trained_weights(output_dir, _internal_call)
        if self.run_identity is not None and self.args.should_save:
            runs.write_identity(self.run_identity, output_dir)

    def _save_trained_weights(self, output_dir: str, _internal_call: bool) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if finetune.is_fully_finetuned(model):
            return self._save_full_model(model, output_dir)
        if ptuning.is_prefix_tuned(model):
            with _gathered(model.prefix_encoder, self.is_deepspeed_enabled):
                if self.args.should_save:
                    ptuning.save_checkpoint(model, output_dir)
                    self._save_beside_weights(output_dir)
            return
        with _embeddings_saved_once(model):
            if lora.converts_on_save(model) and not _internal_call:  # the final adapter, not a step checkpoint's
                lora.save_adapter(model, output_dir, is_main_process=self.args.should_save)
                if self.args.should_save:
                    self._save_beside_weights(output_dir)
            else:
                super().save_model(output_dir, _internal_call)
        if self.args.should_save and os.path.isfile(os.path.join(output_dir, adapter_config.CONFIG_FILE)):
            adapter_config.make_portable(output_dir)  # PEFT 0.6-0.13 refuse the keys newer versions write

    def _save_beside_weights(self, output_dir: str) -> None:
        """What Trainer writes beside a model it saves: the tokenizer and the training arguments."""
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_full_model(self, model, output_dir: str) -> None:
        """Trainer's save writes one file of up to 50 GB; this one shards it (glmtune.finetune.MAX_SHARD_SIZE).
        Under DeepSpeed the engine's weights: ZeRO-3 gathers them from every process into the main one's 16-bit
        copy (stage3_gather_16bit_weights_on_model_save, which glmtune.parsing requires), so every rank calls this."""
        state_dict = self.accelerator.get_state_dict(self.deepspeed if self.is_deepspeed_enabled else self.model)
        if self.args.should_save:
            finetune.save_model_folder(model, output_dir, state_dict, self.processing_class)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

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
        # The folder Trainer._save_checkpoint writes checkpoint-N into: staging while _save_checkpoint runs.
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Resuming: Trainer would look for a full model or a PEFT adapter; a P-Tuning checkpoint holds a prefix.
        unwrapped = self.accelerator.unwrap_model(model or self.model)
        if not ptuning.is_prefix_tuned(unwrapped):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        ptuning.load_weights(unwrapped, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        # --load_best_model_at_end: the same, for the best checkpoint.
        model = self.accelerator.unwrap_model(self.model)
        if not ptuning.is_prefix_tuned(model):
            return super()._load_best_model()
        ptuning.load_weights(model, self.state.best_model_checkpoint)

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
        with torch.no_grad(), torch.compiler.set_stance(self.generation_stance):
            generated = self.model.generate(
                input_ids=prompt, attention_mask=inputs["attention_mask"], **{**self.generate_kwargs, **gen_kwargs}
            )
        kwargs = self.generate_kwargs
        new_tokens = blank_stop_tokens(generated[:, prompt.shape[1] :], kwargs["eos_token_id"], kwargs["pad_token_id"])
        return None, new_tokens, inputs.get("labels")

    def save_predictions(self, prediction_output, output_dir: str | None = None, kept: list | None = None) -> str:
        """Write ``generated_predictions.txt``: one ``{"labels", "predict"}`` JSON per input row, in order, after the
        row's ``kept`` fields (a dict per row: the --keep_columns of its record)."""
        path = os.path.join(output_dir or self.args.output_dir, PREDICTIONS_FILE)
        if not self.is_world_process_zero():
            return path
        predictions = decode_texts(self.processing_class, prediction_output.predictions)
        labels = decode_texts(self.processing_class, prediction_output.label_ids)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for row, (label, prediction) in enumerate(zip(labels, predictions)):
                fields = {**(kept[row] if kept else {}), "labels": label, "predict": prediction}
                f.write(json.dumps(fields, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)  # a reader never sees a half-written file
        return path


def allow_quantized_base(model) -> None:
    """Trainer refuses a quantized base that carries no PEFT adapter ("purely quantized models" cannot be
    fine-tuned); ours carries a prefix encoder (or nothing, when the base alone is evaluated), whose weights
    are float32 and trainable. The flag Trainer reads is private (``_hf_peft_config_loaded``), and
    tests/test_trainer_hooks.py checks that it still is the one."""
    if getattr(model, "is_quantized", False) and not hasattr(model, "peft_config"):
        model._hf_peft_config_loaded = True


@contextlib.contextmanager
def _embeddings_saved_once(model):
    """A LoRA adapter whose --modules_to_save hold the resized embeddings and output head saves them once.

    PEFT's save_pretrained (save_embedding_layers="auto") sees the resized vocabulary and saves the embedding
    layers as well, wrappers included: their trained copy again and the untrained original, 3 times the
    modules_to_save alone (4.9 GB instead of 1.6 GB for LLaMA-7B's 49,953 x 4,096 embeddings and head in
    float32). Trainer offers no way to pass
    save_embedding_layers, and calls ``self.model.save_pretrained``: for this save that is the same method with
    save_embedding_layers=False (tests/test_llama_recipe.py checks the saved keys)."""
    peft_config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    saved = getattr(peft_config, "modules_to_save", None)
    if not saved or vocabulary.unsaved_embeddings(model, saved):
        yield
        return
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=False)
    try:
        yield
    finally:
        del model.save_pretrained


@contextlib.contextmanager
def _gathered(module, deepspeed_enabled: bool):
    """Under DeepSpeed (ZeRO-3 partitions the prefix encoder too) the module's full weights, on every rank.
    Trainer would gather the whole model's state dict instead: all of the frozen base, to keep a few MB."""
    if not deepspeed_enabled:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        yield


@functools.cache  # once per process
def _load_cpu_indexed_storage() -> None:
    """accelerate names the device of each CPU process of a torchrun run ``cpu:N``, and Trainer resumes the
    optimizer with ``torch.load(map_location=args.device)``, which knows only ``cpu``: resuming several CPU
    processes failed. torch's public deserializer registry learns that ``cpu:N`` is the CPU."""

    def tagger(storage):  # tags nothing: saving is unchanged
        return None

    def deserializer(storage, location: str):
        if location.startswith("cpu:") and location[4:].isdigit():
            return storage.cpu()
        return None

    torch.serialization.register_package(5, tagger, deserializer)


def _publish(complete: str, final: str) -> None:
    """Rename a complete checkpoint folder to its final name (replacing an older save of the same step)."""
    if os.path.isdir(final):  # the same step saved again (resumed from an older checkpoint)
        shutil.rmtree(final)
    os.replace(complete, final)
