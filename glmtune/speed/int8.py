"""Training on an 8-bit base with its weights dequantized to the compute dtype, as a 4-bit base does.

bitsandbytes' 8-bit layers (LLM.int8()) quantize every activation to int8 on the fly, split out outlier
columns and multiply in int8 and float16; bfloat16 or float32 activations are cast to float16 first, with a
log line on every call (14,336 lines in 8 steps of the ancestors' recipe). Training a frozen base needs
none of that: each layer's weight (int8 with a float32 scale per output row) is dequantized to the compute
dtype and multiplied there, in the forward and again in the backward, where only the input's gradient is
needed. Activations stay in the compute dtype; nothing but the int8 weights and their scales is kept.

Evaluation and generation keep bitsandbytes' own int8 product (decoding is memory-bound: it reads one byte
per weight). The product differs from LLM.int8()'s only in that activations are not quantized.
"""

import types

import torch
import torch.nn.functional as F


class _DequantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        return F.linear(x, dequantize(weight, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        weight, scale = ctx.saved_tensors
        grad_input = grad_output @ dequantize(weight, scale, grad_output.dtype) if ctx.needs_input_grad[0] else None
        return grad_input, None, None, None  # the base is frozen: no weight, scale or bias gradients


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' int8 row quantization undone: ``weight * scale / 127`` per output row, in ``dtype``."""
    return weight.to(dtype).mul_((scale * (1.0 / 127.0)).unsqueeze(1))


def int8_weights(module) -> tuple:
    """The int8 matrix and its row scales of a bitsandbytes ``Linear8bitLt`` (they move from the weight to the
    layer's state at its first forward)."""
    scale = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
    return module.weight.data, scale


def dequantized_int8_training(model, dtype: torch.dtype) -> int:
    """Switch every frozen bitsandbytes 8-bit layer of ``model`` to the dequantized product while training, in
    ``dtype``; returns how many."""
    try:
        from bitsandbytes.nn import Linear8bitLt
    except ImportError:
        return 0
    switched = 0
    for module in model.modules():
        if isinstance(module, Linear8bitLt) and not module.state.has_fp16_weights:
            module.glmtune_compute_dtype = dtype
            module.forward = types.MethodType(_forward, module)
            switched += 1
    return switched


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    if not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, x)
    weight, scale = int8_weights(self)
    bias = None if self.bias is None else self.bias.to(self.glmtune_compute_dtype)
    return _DequantizedLinear.apply(x.to(self.glmtune_compute_dtype), weight, scale, bias)
