"""The fast training path, switched on by :func:`glmtune.workflow.run` through :func:`prepare`.

Nothing here changes what is computed, only how fast and in how much memory (each piece has a CPU test
that compares it with the plain path):

* ``attention`` - flash routes and padding-free batches (``--padding_free``), with or without a prefix;
* ``loss`` - logits and loss at answer tokens only (``--target_token_loss``);
* ``fast_lora`` - LoRA's branch in the base dtype inside one matrix product (``--compile_layers``);
* ``trainer`` - :class:`~glmtune.speed.trainer.FastStepTrainer`: the loss above, no host syncs, less host work;
* :func:`compile_decoder_layers` - every decoder layer compiled (``--compile_layers``).

Loading a base model (``glmtune.model``) imports none of it.
"""

import logging

import torch

from glmtune.errors import GlmtuneError
from glmtune.model import base_causal_lm
from glmtune.speed.attention import supports_padding_free, use_fast_attention
from glmtune.speed.fast_lora import lora_in_base_dtype
from glmtune.speed.trainer import FastStepTrainer

logger = logging.getLogger(__name__)

__all__ = ["FastStepTrainer", "compile_decoder_layers", "prepare"]


def prepare(config, model) -> None:
    """Switch the model and the run's settings to the fast path that ``config`` asks for (or defaults to).

    Settles ``config.run.padding_free`` (``None``: decided here, with the model loaded)."""
    config.run.padding_free = _padding_free(config.run.padding_free, model)
    if config.run.padding_free:
        use_fast_attention(model)  # it keeps the samples of a padding-free batch apart
    if config.run.compile_layers:
        compile_decoder_layers(model)
    training = config.training
    if torch.cuda.is_available() and training.dataloader_pin_memory:
        # accelerate copies each batch to the GPU with non_blocking=False by default: a stream sync per tensor,
        # which drained the GPU's queue before every step's forward. From pinned memory the copy can be async.
        training.accelerator_config.non_blocking = True


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
      work around the matrix products (norms, rotary, activation) that eager runs as separate kernels.
    """
    use_fast_attention(model)
    lora_in_base_dtype(model)
    for layer in base_causal_lm(model).get_decoder().layers:
        layer.compile(dynamic=True)
