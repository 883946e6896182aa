"""One run, composed of named steps: arguments -> data -> model -> trainer -> predictions and metrics.

Data is read and tokenized before the model loads, so bad data fails in seconds, and nothing is
written to --output_dir before every input has been checked.
"""

import json
import logging

from accelerate import PartialState
from transformers import set_seed

from glmtune import finetune, lora, report, runs, settings, speed, vocabulary
from glmtune.data import Collator, PaddingFreeCollator, load_split, tokenize
from glmtune.metrics import ComputeMetrics
from glmtune.model import empty_model, load_base_model, load_tokenizer
from glmtune.parsing import RunConfig
from glmtune.prompt import PromptFormat
from glmtune.ptuning import add_prefix_encoder
from glmtune.trainer import GlmtuneTrainer

logger = logging.getLogger(__name__)

SPLITS = {  # split -> (file flag, sample limit flag, task flag)
    "train": ("train_file", "max_train_samples", "do_train"),
    "eval": ("validation_file", "max_eval_samples", "do_eval"),
    "predict": ("test_file", "max_predict_samples", "do_predict"),
}


def run(config: RunConfig, callbacks=()) -> dict:
    """``callbacks``: Trainer callbacks (benchmarks, tests)."""
    set_seed(config.training.seed)
    if config.method == "lora":
        settle_lora_targets(config)
    config.training.resume_from_checkpoint = runs.resume_checkpoint(config)  # this run's, with steps left
    if config.method == "finetune" and config.training.do_train:
        finetune.check_layers_early(config.model, config.finetune.trainable_layers)
    tokenizer, prompt_format, datasets = prepare_data(config)
    model = build_model(config, len(tokenizer))
    return run_tasks(config, model, tokenizer, prompt_format, datasets, callbacks)


def settle_lora_targets(config: RunConfig) -> None:
    """--lora_target checked on the base's modules before anything loads; with --lora_checkpoint, the targets
    are the checkpoint's (so a warm start's identity names them)."""
    lora_args = config.lora
    if not lora_args.lora_checkpoint:
        if config.training.do_train:
            lora.check_targets_early(config.model, lora_args)
        return
    saved = settings.saved_lora_targets(lora_args.lora_checkpoint)
    if "lora_target" in config.given and lora_args.lora_target != saved:
        lora.check_targets_early(config.model, lora_args, saved)
    lora_args.lora_target = saved


def prepare_data(config: RunConfig) -> tuple:
    """The tokenizer, the prompt format and every split the tasks need, tokenized (before the model loads)."""
    tokenizer = load_tokenizer(config.model)
    check_embeddings_early(config, len(tokenizer))
    prompt_format = PromptFormat(config.data.prompt_template, tokenizer, config.data.source_prefix)
    return tokenizer, prompt_format, prepare_datasets(config, tokenizer, prompt_format)


def build_model(config: RunConfig, tokenizer_size: int):
    """The frozen base with the method attached, switched to the fast path where it applies."""
    speed.memory.check_before_loading(config)
    model = attach_method(config, load_base_model(config.model), tokenizer_size)
    speed.prepare(config, model)
    return model


def run_tasks(config: RunConfig, model, tokenizer, prompt_format: PromptFormat, datasets: dict, callbacks=()) -> dict:
    """Train, evaluate and predict, as asked; the metrics of each. ``callbacks``: Trainer callbacks (benchmarks)."""
    training = config.training
    train_collator = training_collator(config, tokenizer)
    identity = runs.identity(config)  # before the memory plan splits the effective batch its own way
    if training.do_train:
        speed.fit_memory(config, model, datasets["train"], train_collator)
        runs.move_previous_run_aside(config)
        PartialState().wait_for_everyone()  # the main process moved them; no rank writes before
    trainer = build_trainer(config, model, tokenizer, datasets, prompt_format, train_collator, identity)
    for callback in callbacks:
        trainer.add_callback(callback)
    results = {}
    if training.do_train:
        results.update(train(trainer, config, len(datasets["train"])))
    if training.do_eval:
        results.update(evaluate(trainer, len(datasets["eval"])))
    if training.do_predict:
        results.update(predict(trainer, datasets["predict"], bool(config.data.keep_columns)))
    return results


def prepare_datasets(config: RunConfig, tokenizer, prompt_format) -> dict:
    datasets = {}
    for split, (file_flag, limit_flag, task_flag) in SPLITS.items():
        if not getattr(config.training, task_flag):
            continue
        keep_columns = config.data.kept_columns() if split == "predict" else ()
        dataset = load_split(getattr(config.data, file_flag), config.data, keep_columns)
        limit = getattr(config.data, limit_flag)
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        encoded_as = "train" if split == "train" or not config.training.predict_with_generate else split
        datasets[split] = tokenize(dataset, tokenizer, prompt_format, config.data, encoded_as)
    if "train" in datasets:
        _log_example(tokenizer, datasets["train"][0])
    return datasets


def _log_example(tokenizer, example: dict) -> None:
    labels = [token for token in example["labels"] if token >= 0]
    logger.info(
        "First training sample:\n  input: %r\n  label: %r",
        tokenizer.decode(example["input_ids"]),
        tokenizer.decode(labels),
    )


def check_embeddings_early(config: RunConfig, tokenizer_size: int) -> None:
    """A tokenizer with more tokens than the base's embeddings (glmtune.vocabulary), checked on an empty copy of
    the base before the data is tokenized: only LoRA can train and save the rows a resize adds."""
    if config.method == "finetune":  # every row trains and is saved with the model
        return
    model = empty_model(config.model)
    if model is None:
        return
    if config.method == "lora" and (config.training.do_train or config.lora.lora_checkpoint):
        lora.check_vocabulary(model, config.lora, tokenizer_size)
    elif config.method == "ptuning" and (config.training.do_train or config.ptuning.ptuning_checkpoint):
        vocabulary.refuse_frozen(model, tokenizer_size, vocabulary.FROZEN)
    else:
        vocabulary.refuse_frozen(model, tokenizer_size, vocabulary.BASE_ALONE)


def attach_method(config: RunConfig, model, tokenizer_size: int):
    """The method on the loaded base; the embeddings checked again (the early check needs an empty copy, which not
    every base can build); add_lora checks its own."""
    training = config.training
    if config.method == "finetune" and not training.do_train:
        return model  # a fully fine-tuned model is a model folder: --model_name_or_path names it
    checkpoint = config.ptuning.ptuning_checkpoint or config.lora.lora_checkpoint
    if not training.do_train and not checkpoint:
        vocabulary.refuse_frozen(model, tokenizer_size, vocabulary.BASE_ALONE)
        logger.warning("No checkpoint given: evaluating the base model alone (the 'before' of a comparison)")
        return model
    if training.do_train and checkpoint and not training.resume_from_checkpoint:
        logger.info("Continuing training from %s (warm start: new optimizer and schedule)", checkpoint)
    if config.method == "ptuning":
        vocabulary.refuse_frozen(model, tokenizer_size, vocabulary.FROZEN)
        model = add_prefix_encoder(model, config.ptuning)
    elif config.method == "lora":
        model = lora.add_lora(
            model, config.lora, tokenizer_size, trainable=training.do_train, total_steps=training.max_steps
        )
    else:
        vocabulary.resize(model, tokenizer_size)
        model = finetune.add_full_finetuning(model, config.finetune)
    log_trainable(model)
    return model


def log_trainable(model) -> None:
    trainable = sum(_size(p) for p in model.parameters() if p.requires_grad)
    total = sum(_size(p) for p in model.parameters())
    logger.info("Trainable parameters: %s of %s (%.4f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)


def _size(parameter) -> int:
    """Elements of a parameter; ZeRO-3 partitions a base as it loads, leaving numel() 0 and the size in ds_numel."""
    return getattr(parameter, "ds_numel", parameter.numel())


def training_collator(config: RunConfig, tokenizer):
    if config.run.padding_free:
        return PaddingFreeCollator()
    return Collator(tokenizer.pad_token_id, "right", with_target_index=True)


def build_trainer(
    config: RunConfig, model, tokenizer, datasets: dict, prompt_format: PromptFormat, train_collator, identity=None
) -> GlmtuneTrainer:
    training = config.training
    generating = training.predict_with_generate
    generate_kwargs = config.generation.to_generate_kwargs(config.data.val_max_target_length)
    generate_kwargs.update(prompt_format.generation_ids(), use_cache=True)
    ratio = config.lora.loraplus_lr_ratio if config.method == "lora" else None
    return speed.FastStepTrainer(
        model=model,
        args=training,
        train_dataset=datasets.get("train"),
        eval_dataset=datasets.get("eval"),
        processing_class=tokenizer,
        data_collator=train_collator,
        eval_collator=Collator(tokenizer.pad_token_id, "left" if generating else "right"),
        compute_metrics=ComputeMetrics(tokenizer) if generating else None,
        generate_kwargs=generate_kwargs,
        generate_eagerly=bool(config.run.compile_layers),
        run_identity=identity,
        target_token_loss=config.run.target_token_loss,
        make_optimizer=lora.loraplus_optimizer(ratio) if ratio else None,
        callbacks=[report.LossCurve(), *lora.training_callbacks(model)] if training.do_train else None,
    )


def train(trainer: GlmtuneTrainer, config: RunConfig, samples: int) -> dict:
    speed.memory.reset_peak()
    result = trainer.train(resume_from_checkpoint=config.training.resume_from_checkpoint)
    peak = speed.memory.peak_metrics("train")  # users compare it with their card
    trainer.save_model()  # the final trained weights, in --output_dir itself
    metrics = {**result.metrics, **peak, "train_samples": samples}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        print(report.training_summary(config), flush=True)
    return metrics


def evaluate(trainer: GlmtuneTrainer, samples: int) -> dict:
    metrics = {**trainer.evaluate(metric_key_prefix="eval"), "eval_samples": samples}
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics


def predict(trainer: GlmtuneTrainer, dataset, keep: bool = False) -> dict:
    """``keep``: write each row's --keep_columns fields beside its prediction."""
    output = trainer.predict(dataset, metric_key_prefix="predict")
    metrics = {**output.metrics, "predict_samples": len(dataset)}
    trainer.log_metrics("predict", metrics)
    trainer.save_metrics("predict", metrics)
    kept = [json.loads(fields) for fields in dataset["keep"]] if keep else None
    path = trainer.save_predictions(output, kept=kept)
    logger.info("Wrote %d predictions to %s", len(dataset), path)
    return metrics
