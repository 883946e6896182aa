"""The fast training path, switched on by :func:`glmtune.workflow.run` through :func:`prepare`.

Nothing here changes what is computed, only how fast and in how much memory (each piece has a CPU test
that compares it with the plain path):

* ``attention`` - flash routes and padding-free batches (``--padding_free``), with or without a prefix;
* ``loss`` - logits and loss at answer tokens only (``--target_token_loss``);
* ``fast_lora`` - LoRA's branch in the base dtype inside one matrix product (training on a GPU);
* ``int8`` - an 8-bit base's weights dequantized to the compute dtype while training, as a 4-bit base does;
* ``trainer`` - :class:`~glmtune.speed.trainer.FastStepTrainer`: the loss above, no host syncs, less host work;
* ``memory`` - the run's peak memory, and the micro-batch and checkpointing that fit a budget (``--max_memory_gib``);
* :func:`compile_decoder_layers` - every decoder layer compiled (``--compile_layers``).

Loading a base model (``glmtune.model``) imports none of it.
"""

import logging

import torch

from glmtune.errors import GlmtuneError
from glmtune.model import base_causal_lm, select_dtype
from glmtune.speed import memory
from glmtune.speed.attention import supports_padding_free, use_fast_attention
from glmtune.speed.fast_lora import lora_in_base_dtype
from glmtune.speed.int8 import dequantized_int8_training
from glmtune.speed.memory import fit_training as fit_memory
from glmtune.speed.trainer import FastStepTrainer

logger = logging.getLogger(__name__)

__all__ = ["FastStepTrainer", "compile_decoder_layers", "fit_memory", "memory", "prepare"]


def prepare(config, model) -> None:
    """Switch the model and the run's settings to the fast path that ``config`` asks for (or defaults to).

    Settles ``config.run.padding_free`` and ``config.generation.cache_implementation`` (``None``: decided here,
    with the model loaded)."""
    training = config.training
    config.run.padding_free = _padding_free(config.run.padding_free, model)
    if config.run.padding_free:
        use_fast_attention(model)  # it keeps the samples of a padding-free batch apart
    if training.do_train and config.model.quantization_bit == 8:
        dequantized_int8_training(model, select_dtype(config.model.torch_dtype))
    if training.do_train and torch.cuda.is_available() and select_dtype(config.model.torch_dtype) != torch.float32:
        lora_in_base_dtype(model)  # float32 would be PEFT's own computation
    if config.run.compile_layers:
        compile_decoder_layers(model)
    if torch.cuda.is_available() and training.dataloader_pin_memory:
        # accelerate copies each batch to the GPU with non_blocking=False by default: a stream sync per tensor,
        # which drained the GPU's queue before every step's forward. From pinned memory the copy can be async.
        training.accelerator_config.non_blocking = True
    if config.generation.cache_implementation is None:
        config.generation.cache_implementation = _cache_for_generation(config, model)


def _cache_for_generation(config, model) -> str:
    """Static where transformers compiles the decoding step with it: CUDA, its own model classes, and decoder
    layers not compiled for training in this run (generation then runs eagerly: glmtune.trainer)."""
    causal_lm = base_causal_lm(model)
    native = type(causal_lm).__module__.startswith("transformers.")
    return "static" if torch.cuda.is_available() and native and not config.run.compile_layers else "dynamic"


def _padding_free(wanted, model) -> bool:
    """--padding_free as given, or by default where the model supports it, checked against the model."""
    causal_lm = base_causal_lm(model)
    supported = supports_padding_free(causal_lm)
    if wanted and not supported:
        raise GlmtuneError(
            f"--padding_free: {type(causal_lm).__name__} does not pass the sample boundaries to its "
            "attention (it derives positions or masks its own way); use --padding_free False"
        )
    if wanted is None:
        wanted = supported
        logger.info(
            "Padding-free training batches: %s",
            "on" if wanted else f"off ({type(causal_lm).__name__} does not support them)",
        )
    return wanted


def compile_decoder_layers(model) -> None:
    """The fast training path: glmtune's attention, LoRA in the base dtype, each decoder layer compiled.

    * the fast attention function (:mod:`glmtune.speed.attention`) gives right-padded training batches no
      mask, so attention runs the flash kernel instead of a masked one;
    * LoRA branches compute in the base's dtype inside one ``addmm`` (:mod:`glmtune.speed.fast_lora`);
    * ``torch.compile`` with dynamic shapes on every decoder layer: the layers share their code, so it
      compiles once (about a minute) and serves every layer and batch length; it fuses the element-wise
      work around the matrix products (norms, rotary, activation) that eager runs as separate kernels;
    * the embeddings' output requires grad, so the first layer's input is like every other layer's: compiled code
      is guarded on its inputs' ``requires_grad``, and a frozen embedding made the first layer a graph of its own
      (compiled again for every batch shape class, about 15 s each on an H200). The price is the gradient of
      the first layer's input, which nothing reads: one matrix product's worth, about 0.2% of a step.
    """
    use_fast_attention(model)
    lora_in_base_dtype(model)
    causal_lm = base_causal_lm(model)
    causal_lm.enable_input_require_grads()
    for layer in causal_lm.get_decoder().layers:
        layer.compile(dynamic=True)
