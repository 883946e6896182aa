"""LoRA's low-rank branch computed in the base's dtype and added inside one matrix product.

PEFT keeps the LoRA matrices in float32 and runs the branch in float32: every adapted linear layer
casts its input to float32 and writes a float32 ``[tokens, out_features]`` product, scales it and adds
it to the bf16 output -- five passes over the widest activation of the layer, forward and backward,
plus float32 copies of the inputs kept for backward. On a bf16 6B model at 8 x 512 tokens that cost
more time than the base's own matrix products did for P-Tuning v2 (docs/benchmarks.md).

Here the branch runs as mixed precision does: the float32 LoRA weights (which the optimizer updates)
are cast to the base's dtype for the product, and ``addmm_`` adds ``(dropout(x) A^T s) B^T`` to the
base output, in place, in the product's epilogue. Same parameters, same dropout draws, same function; with a
float32 base it is PEFT's computation, in bf16 it differs by bf16 rounding only. On a 4/8-bit base
(bitsandbytes) the base output is in the compute dtype too, and the branch is added to it the same way.
"""

import collections
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def lora_in_base_dtype(model, quantized: bool = True) -> int:
    """Switch every PEFT LoRA layer of ``model`` on a plain or (``quantized``) bitsandbytes linear base; returns how
    many.

    rsLoRA changes only the scale, which this path reads from PEFT (``scaling``). LoRA variants keep PEFT's own
    forward, and the log says so: DoRA (its magnitude rescales the whole adapted weight, so the branch is not a
    sum), AdaLoRA's SVD layers (a third matrix and a rank normalization), adapters on other layer types.
    ``quantized=False`` leaves bitsandbytes layers to PEFT too: scripts/benchmark.py compares the two there (on
    an H200 the bf16 branch took 26% less memory and ran 13.8% slower for nf4 LoRA at 8 x 512, run 19)."""
    switched, kept = 0, collections.Counter()
    lora_layers = _lora_layer_types(quantized)
    for module in model.modules():
        if not hasattr(module, "lora_A"):
            continue
        base = lora_layers.get(type(module))
        if base is not None and type(module.get_base_layer()) is base and not module.lora_variant:
            module.forward = types.MethodType(_forward_in_base_dtype, module)
            switched += 1
        else:
            kept[_kind(module)] += 1
    if kept:
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(kept.items()))
        logger.info("LoRA in the base dtype: %d layers; PEFT's own forward kept for %s", switched, kinds)
    return switched


def _kind(module) -> str:
    variants = getattr(module, "lora_variant", None)
    return type(next(iter(variants.values()))).__name__ if variants else type(module).__name__


def _lora_layer_types(quantized: bool) -> dict:
    """PEFT's LoRA layer class -> the base layer class it wraps (bitsandbytes' too, when ``quantized``)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return {}
    types_ = {LoraLinear: nn.Linear}
    if not quantized:
        return types_
    try:
        import bitsandbytes as bnb
        from peft.tuners.lora import bnb as lora_bnb
    except ImportError:
        return types_
    return {**types_, lora_bnb.Linear8bitLt: bnb.nn.Linear8bitLt, lora_bnb.Linear4bit: bnb.nn.Linear4bit}


def _forward_in_base_dtype(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = [name for name in self.active_adapters if name in self.lora_A]
    # Mixed-batch adapter names, merged or disabled adapters, LoRA biases: PEFT's own path.
    if args or kwargs or self.disable_adapters or self.merged or any(self.lora_B[n].bias is not None for n in active):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    dtype = result.dtype
    # In place: the base product is not kept for backward, and an out-of-place addmm first copies it whole.
    # bitsandbytes' products come out of custom autograd functions, whose outputs cannot be changed in place.
    in_place = type(self.get_base_layer()) is nn.Linear
    shape, flat = result.shape, result.view(-1, result.shape[-1])
    for name in active:
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        low_rank = F.linear(self.lora_dropout[name](x.to(dtype)), lora_A.weight.to(dtype)) * self.scaling[name]
        low_rank, up = low_rank.reshape(-1, low_rank.shape[-1]), lora_B.weight.to(dtype).t()
        flat = flat.addmm_(low_rank, up) if in_place else torch.addmm(flat, low_rank, up)
    return flat.view(shape)
