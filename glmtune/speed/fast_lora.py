"""LoRA's low-rank branch computed in the base's dtype and added inside one matrix product.

PEFT keeps the LoRA matrices in float32 and runs the branch in float32: every adapted linear layer
casts its input to float32 and writes a float32 ``[tokens, out_features]`` product, scales it and adds
it to the bf16 output -- five passes over the widest activation of the layer, forward and backward,
plus float32 copies of the inputs kept for backward. On a bf16 6B model at 8 x 512 tokens that cost
more time than the base's own matrix products did for P-Tuning v2 (docs/benchmarks.md).

Here the branch runs as mixed precision does: the float32 LoRA weights (which the optimizer updates)
are cast to the base's dtype for the product, and ``addmm_`` adds ``(dropout(x) A^T s) B^T`` to the
base output, in place, in the product's epilogue. Same parameters, same dropout draws, same function; with a
float32 base it is PEFT's computation, in bf16 it differs by bf16 rounding only.
"""

import types

import torch
import torch.nn.functional as F
from torch import nn


def lora_in_base_dtype(model) -> int:
    """Switch every plain (nn.Linear-based, non-DoRA) PEFT LoRA layer of ``model``; returns how many.

    Quantized layers (bitsandbytes) and LoRA variants keep PEFT's own forward.
    """
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    switched = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.get_base_layer()) is nn.Linear and not module.lora_variant:
            module.forward = types.MethodType(_forward_in_base_dtype, module)
            switched += 1
    return switched


def _forward_in_base_dtype(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = [name for name in self.active_adapters if name in self.lora_A]
    # Mixed-batch adapter names, merged or disabled adapters, LoRA biases: PEFT's own path.
    if args or kwargs or self.disable_adapters or self.merged or any(self.lora_B[n].bias is not None for n in active):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    dtype = result.dtype
    # In place: the base product is not kept for backward, and an out-of-place addmm first copies it whole.
    flat = result.view(-1, result.shape[-1])
    for name in active:
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        low_rank = F.linear(self.lora_dropout[name](x.to(dtype)), lora_A.weight.to(dtype)) * self.scaling[name]
        flat.addmm_(low_rank.reshape(-1, low_rank.shape[-1]), lora_B.weight.to(dtype).t())
    return result
