"""GPU memory: the run's peak, and fitting training into a budget by choosing the micro-batch and checkpointing.

The effective batch the user asks for (``--per_device_train_batch_size`` x ``--gradient_accumulation_steps``,
BATCH_SIZE x GRAD_ACCUM in train.sh) is kept; what :func:`fit` chooses is how it is split into micro-batches
and how many decoder layers are checkpointed (transformers' ``every_n_layers``: every layer, every second, ...,
or none). The ancestors' recipe, 1 x 16 on a 6B model, runs a micro-batch of one sample at a time; on a large
card 16 x 1 gives the same update many times faster.

The update does not depend on the choice: the loss is normalised per target token of the whole effective
batch (transformers' ``num_items_in_batch``, which glmtune's target-token loss uses too), so one optimizer
step over the same samples is the same whatever the split (tests/test_memory_plan.py). The ancestors'
Trainer averaged per micro-batch instead, which made 1 x 16 and 16 x 1 differ; dropout draws differ between
splits, as they do between runs.

How: a few forward/backward passes on the longest training samples measure the peak memory and time at
two micro-batch sizes, with and without checkpointing; both grow linearly with the micro-batch, and
between "none" and "every layer" with the share of layers checkpointed. The fastest plan predicted to
fit is checked with one more measured pass before it is used.
"""

import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from glmtune.errors import GlmtuneError
from glmtune.model import base_causal_lm
from glmtune.speed.loss import TargetTokenLoss

logger = logging.getLogger(__name__)

GIB = 2**30
MARGIN_GIB = 1.0  # left free on the card by the default budget (the CUDA context, other processes' growth)
HEADROOM = 0.05  # of the budget, kept out of plans: training's varying batch shapes fragment the allocator's blocks


@dataclass(frozen=True)
class Probe:
    """One measured forward/backward: the peak memory reserved and the seconds it took (None: out of memory)."""

    micro_batch: int
    checkpointed: float  # share of decoder layers checkpointed, 0 to 1
    peak_bytes: int | None
    seconds: float | None


@dataclass(frozen=True)
class Plan:
    micro_batch: int
    accumulation: int
    every_n_layers: int | None  # None: no checkpointing; n: every n-th decoder layer (1: all)
    peak_bytes: float  # predicted, or measured once verified
    samples_per_s: float  # predicted

    def describe(self, num_layers: int) -> str:
        if self.every_n_layers is None:
            checkpointing = "no gradient checkpointing"
        else:
            checkpointing = (
                f"{checkpointed_layers(num_layers, self.every_n_layers)} of {num_layers} layers checkpointed"
            )
        return (
            f"micro-batch {self.micro_batch} x {self.accumulation} accumulation steps, {checkpointing}; "
            f"expected peak {self.peak_bytes / GIB:.2f} GiB, about {self.samples_per_s:.1f} samples/s"
        )


def checkpointed_layers(num_layers: int, every_n_layers: int | None) -> int:
    return 0 if every_n_layers is None else math.ceil(num_layers / every_n_layers)


# ----------------------------------------------------------------------------- choosing (pure)


def candidates(effective_batch: int, num_layers: int, every_n_layers=...) -> list:
    """(micro_batch, every_n_layers) pairs: micro-batches that divide the effective batch, and every distinct
    share of checkpointed layers (``every_n_layers``: a value to keep it fixed, as set by hand)."""
    micro_batches = [m for m in range(1, effective_batch + 1) if effective_batch % m == 0]
    if every_n_layers is not ...:
        choices = [every_n_layers]
    else:
        by_count = {}
        for n in range(num_layers, 0, -1):  # largest n first: the fewest layers for each count
            by_count.setdefault(checkpointed_layers(num_layers, n), n)
        choices = [None] + sorted(by_count.values(), reverse=True)
    return [(m, n) for m in micro_batches for n in choices]


def predict(probes: list, micro_batch: int, checkpointed: float) -> tuple | None:
    """(peak bytes, seconds per micro-step) from the probes: linear in the micro-batch at each measured share of
    checkpointed layers, and linear in the share between "none" (0) and "every layer" (1). None: not predictable."""
    measured = {p.checkpointed for p in probes}
    if checkpointed in measured:
        line = _line(probes, checkpointed)
        if line is None:
            return None
        peak, seconds = _at(line, micro_batch)
    else:
        ends = [_line(probes, share) for share in (0.0, 1.0)]
        if None in ends:
            return None
        (peak0, time0), (peak1, time1) = (_at(end, micro_batch) for end in ends)
        peak, seconds = peak0 + checkpointed * (peak1 - peak0), time0 + checkpointed * (time1 - time0)
    steady = _checkpointed_time(probes, micro_batch, checkpointed)
    return peak, seconds if steady is None else steady


def _checkpointed_time(probes: list, micro_batch: int, checkpointed: float) -> float | None:
    """Seconds per micro-step from the line without checkpointing, times the recomputation's measured overhead.

    Small probes are bound by fixed per-step costs and their times are noisy (2026-12-03, bf16 on an H200:
    0.203 s at micro-batch 2 and 0.185 s at 4 with every layer checkpointed), so the checkpointed line's own
    slope can come out flat and predict checkpointing faster than none. The micro-batch's effect is taken from
    the line without checkpointing; checkpointing only adds its overhead ratio, measured at the largest
    micro-batch probed both ways. None when fewer than two probes without checkpointing fitted: one point gives
    no slope, and the line through the origin would say a larger micro-batch gains nothing (2026-12-03, nf4 LoRA
    within 5.3 GiB: that chose 1 x 16 at 5.1 samples/s over 8 x 2 checkpointed at 29); the checkpointed
    line's own times are used then."""
    if len(_fitted(probes, 0.0)) < 2:
        return None
    line = _line(probes, 0.0)
    seconds = _at(line, micro_batch)[1]
    if checkpointed == 0.0:
        return seconds
    both = [
        (p.micro_batch, p.seconds, q.seconds)
        for p in probes
        for q in probes
        if p.micro_batch == q.micro_batch and p.checkpointed == 0.0 and q.checkpointed == 1.0
        if p.seconds and q.seconds
    ]
    if not both:
        return None
    _, plain, recomputed = max(both)
    return seconds * (1 + checkpointed * max(0.0, recomputed / plain - 1))


def _at(line: tuple, micro_batch: int) -> tuple:
    peak, peak_slope, seconds, time_slope = line
    return peak + micro_batch * peak_slope, seconds + micro_batch * time_slope


def _line(probes: list, share: float):
    """Intercept and per-sample slope of peak memory and of time at one share, through its two largest probes
    that fitted; through the origin when only one fitted (an overestimate: larger micro-batches do not fit)."""
    fitted = _fitted(probes, share)
    if not fitted:
        return None
    if len(fitted) == 1:
        only = fitted[0]
        return 0.0, only.peak_bytes / only.micro_batch, 0.0, only.seconds / only.micro_batch
    low, high = fitted[-2], fitted[-1]
    span = high.micro_batch - low.micro_batch
    peak_slope = (high.peak_bytes - low.peak_bytes) / span
    time_slope = max(0.0, (high.seconds - low.seconds) / span)
    return (
        low.peak_bytes - low.micro_batch * peak_slope,
        peak_slope,
        max(0.0, low.seconds - low.micro_batch * time_slope),
        time_slope,
    )


def _fitted(probes: list, share: float) -> list:
    """The probes at one share of checkpointed layers that fitted, smallest micro-batch first."""
    return sorted(
        (p for p in probes if p.checkpointed == share and p.peak_bytes is not None), key=lambda p: p.micro_batch
    )


def choose(
    probes: list, effective_batch: int, num_layers: int, budget_bytes: float, extra_bytes: float = 0, every_n_layers=...
) -> list:
    """Every plan predicted to fit ``budget_bytes`` (with ``extra_bytes`` added: the optimizer's state), fastest
    first. ``every_n_layers``: checkpointing fixed by hand (None for off), else chosen too."""
    plans = []
    for micro_batch, n in candidates(effective_batch, num_layers, every_n_layers):
        share = checkpointed_layers(num_layers, n) / num_layers
        predicted = predict(probes, micro_batch, share)
        if predicted is None:
            continue
        peak, seconds = predicted
        if peak + extra_bytes <= budget_bytes:
            plans.append(
                Plan(
                    micro_batch, effective_batch // micro_batch, n, peak + extra_bytes, micro_batch / max(seconds, 1e-9)
                )
            )
    # fastest first; among equals the smaller peak
    return sorted(plans, key=lambda plan: (-round(plan.samples_per_s, 6), plan.peak_bytes))


# ----------------------------------------------------------------------------- measuring (CUDA)


class Prober:
    """Forward/backward passes of the training loss on ``batches(m)`` (the m longest training samples,
    collated as in training), measured on the GPU."""

    def __init__(self, model, batches, loss_fn, num_layers: int):
        self.model, self.batches, self.loss_fn, self.num_layers = model, batches, loss_fn, num_layers

    def __call__(self, micro_batch: int, every_n_layers: int | None, repeats: int = 2) -> Probe:
        probe = self._measure(micro_batch, every_n_layers, repeats)
        memory = (
            "out of memory" if probe.peak_bytes is None else f"{probe.peak_bytes / GIB:.2f} GiB, {probe.seconds:.3f} s"
        )
        logger.info(
            "Memory probe: micro-batch %d, %s: %s",
            micro_batch,
            f"every {every_n_layers} layers checkpointed" if every_n_layers else "no checkpointing",
            memory,
        )
        return probe

    def _measure(self, micro_batch: int, every_n_layers: int | None, repeats: int) -> Probe:
        share = checkpointed_layers(self.num_layers, every_n_layers) / self.num_layers
        set_checkpointing(self.model, every_n_layers)
        batch = self.batches(micro_batch)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        seconds = None
        try:
            for _ in range(repeats):  # the first pass warms up (allocator, kernels, compilation)
                torch.cuda.synchronize()
                start = time.perf_counter()
                self.loss_fn(self.model, batch).backward()
                torch.cuda.synchronize()
                seconds = time.perf_counter() - start
        except torch.OutOfMemoryError:
            return Probe(micro_batch, share, None, None)
        finally:
            for parameter in self.model.parameters():
                parameter.grad = None
        return Probe(micro_batch, share, torch.cuda.max_memory_reserved(), seconds)


def _probe_line(prober: Prober, effective_batch: int, every_n_layers: int | None) -> list:
    """Probes for the line at one checkpointing setting: micro-batches 4 and 2 (the effective batch's size if
    smaller), and 1 only where fewer than two of them fitted. Largest first, and 1 left out where it can be:
    the first call compiles the decoder layers for shapes in general, a micro-batch of one sample gets code of
    its own (its sample boundaries are a single one), about 20 s of compiling on an H200 that a plan of two or
    more samples never runs."""
    sizes = sorted({min(effective_batch, 4), min(effective_batch, 2)}, reverse=True)
    probes = [prober(micro_batch, every_n_layers) for micro_batch in sizes]
    if sizes[-1] > 1 and len(_fitted(probes, probes[0].checkpointed)) < 2:
        probes.append(prober(1, every_n_layers))
    return probes


def set_checkpointing(model, every_n_layers: int | None) -> None:
    """transformers' gradient checkpointing on every ``every_n_layers``-th decoder layer (None: off)."""
    if every_n_layers is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False}, every_n_layers=every_n_layers)


def fit(
    prober: Prober,
    effective_batch: int,
    budget_bytes: float,
    extra_bytes: float = 0,
    every_n_layers=...,
    budget_gib: float | None = None,
) -> Plan:
    """The fastest plan that fits ``budget_bytes``, measured; a GlmtuneError naming what would fit otherwise."""
    probes = []
    shares = [every_n_layers] if every_n_layers is not ... else [None, 1]
    for n in shares:
        probes += _probe_line(prober, effective_batch, n)
    for plan in choose(probes, effective_batch, prober.num_layers, budget_bytes, extra_bytes, every_n_layers)[:3]:
        measured = prober(plan.micro_batch, plan.every_n_layers, repeats=1)
        if measured.peak_bytes is not None and measured.peak_bytes + extra_bytes <= budget_bytes:
            return Plan(
                plan.micro_batch,
                plan.accumulation,
                plan.every_n_layers,
                measured.peak_bytes + extra_bytes,
                plan.samples_per_s,
            )
    smallest = [p for p in probes if p.micro_batch == 1] or [prober(1, n) for n in shares]
    smallest = [p for p in smallest if p.peak_bytes is not None]
    needed = min((p.peak_bytes for p in smallest), default=None)
    need = f"needs {(needed + extra_bytes) / GIB:.1f} GiB here" if needed else "does not fit at all here"
    raise GlmtuneError(
        f"--max_memory_gib {budget_gib or budget_bytes / GIB:g}: no micro-batch fits; the smallest run (micro-batch 1"
        f"{', every layer checkpointed' if every_n_layers is ... else ''}) {need}: give a larger budget, "
        "a 4-bit base (QUANTIZATION_BIT=4) or shorter MAX_SOURCE_LENGTH / MAX_TARGET_LENGTH"
    )


# ----------------------------------------------------------------------------- a training run


def fit_training(config, model, train_dataset, collator) -> Plan | None:
    """--fit_memory: measure, choose and set the micro-batch, accumulation and checkpointing of this run in
    ``config.training`` (the effective batch kept). None where it does not apply (CPU, several processes,
    DeepSpeed, --fit_memory False)."""
    training = config.training
    reason = _not_planned(config)
    if reason:
        logger.info("Micro-batch and checkpointing as given (%s)", reason)
        return None
    effective = training.per_device_train_batch_size * training.gradient_accumulation_steps
    budget = _budget_bytes(config.run.max_memory_gib)
    _move_to_gpu(model, training.device)
    held = torch.cuda.memory_allocated() + _optimizer_bytes(model)
    if held > budget * (1 - HEADROOM):
        raise GlmtuneError(
            f"--max_memory_gib {budget / GIB:g}: the base and the trained weights alone take {held / GIB:.1f} GiB "
            "here, before any sample: give a larger budget, or a 4-bit base (QUANTIZATION_BIT=4)"
        )
    causal_lm = base_causal_lm(model)
    num_layers = len(causal_lm.get_decoder().layers)
    target_loss = (
        TargetTokenLoss(causal_lm) if config.run.target_token_loss and TargetTokenLoss.supports(causal_lm) else None
    )
    batches = _longest_batches(train_dataset, collator, model.device)
    prober = Prober(model, batches, lambda m, batch: _loss(m, batch, target_loss), num_layers)
    pinned = _checkpointing_set_by_hand(config)
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):  # probes leave the run's dropout draws alone
        plan = fit(prober, effective, budget * (1 - HEADROOM), _optimizer_bytes(model), pinned, budget_gib=budget / GIB)
    model.train(was_training)
    set_checkpointing(model, None)  # Trainer switches it on again from the arguments below
    torch.cuda.empty_cache()  # what the probes left cached is not the run's
    training.per_device_train_batch_size = plan.micro_batch
    training.gradient_accumulation_steps = plan.accumulation
    training.gradient_checkpointing = plan.every_n_layers is not None
    training.gradient_checkpointing_kwargs = {"use_reentrant": False, "every_n_layers": plan.every_n_layers or 1}
    logger.info(
        "Memory plan for %.1f GiB on %s (effective batch %d): %s",
        budget / GIB,
        torch.cuda.get_device_name(),
        effective,
        plan.describe(num_layers),
    )
    return plan


def _move_to_gpu(model, device) -> None:
    """A 16/32-bit base is loaded on the CPU and moved by the Trainer; it is measured where it will train
    (moving it first is what the Trainer would do: it leaves a model already on its device where it is)."""
    if model.device.type != "cuda":
        model.to(device)


def _not_planned(config) -> str | None:
    training = config.training
    if not config.run.fit_memory:
        return "--fit_memory False"
    if not training.do_train or not torch.cuda.is_available():
        return "no CUDA GPU" if training.do_train else "not training"
    if training.world_size > 1:
        return "several processes: set BATCH_SIZE, GRAD_ACCUM and --gradient_checkpointing by hand"
    if training.deepspeed:
        return "DeepSpeed shards the model after it is measured here"
    return None


def _budget_bytes(max_memory_gib: float | None) -> float:
    """--max_memory_gib, or what the GPU has free now (plus what this process holds) less a margin."""
    if max_memory_gib is not None:
        return max_memory_gib * GIB
    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - MARGIN_GIB * GIB


def _checkpointing_set_by_hand(config):
    """--gradient_checkpointing as the user gave it: ... (chosen), None (off) or every_n_layers (on)."""
    if "gradient_checkpointing" not in config.given:
        return ...
    training = config.training
    if not training.gradient_checkpointing:
        return None
    return (training.gradient_checkpointing_kwargs or {}).get("every_n_layers", 1)


def _optimizer_bytes(model) -> int:
    """AdamW's two float32 moments per trained weight (allocated at the first optimizer step)."""
    return 2 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def _longest_batches(dataset, collator, device):
    """``m`` -> the m longest training samples, collated as in training, on the device (memory grows with length)."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def batch(micro_batch: int) -> dict:
        rows = [dataset[order[i % len(order)]] for i in range(micro_batch)]
        features = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in rows]
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(features).items()}

    return batch


def _loss(model, batch: dict, target_loss):
    """The training step's loss as FastStepTrainer computes it (its memory is what is measured)."""
    inputs = dict(batch)
    labels, target_index = inputs.pop("labels"), inputs.pop("target_index", None)
    if target_loss is None:
        return model(**inputs, labels=labels, use_cache=False).loss
    with target_loss.capture():
        model(**inputs, logits_to_keep=1, use_cache=False)
    return target_loss(labels, None, target_index)


def check_before_loading(config) -> None:
    """A budget smaller than the base's weights can only fail: say so before loading them. The lower bound is the
    weight files' size scaled to the quantized width (embeddings and output head stay wider: they only add)."""
    budget = config.run.max_memory_gib
    if budget is None or not config.run.fit_memory or not config.training.do_train:
        return
    folder = config.model.model_name_or_path
    files = [name for name in os.listdir(folder) if name.endswith((".safetensors", ".bin"))]
    stored = sum(os.path.getsize(os.path.join(folder, name)) for name in files)
    bits = config.model.quantization_bit or (32 if config.model.torch_dtype == "float32" else 16)
    needed = stored * bits / _stored_bits(folder)
    if needed > budget * GIB:
        raise GlmtuneError(
            f"--max_memory_gib {budget:g}: the base's weights alone take at least {needed / GIB:.1f} GiB "
            f"({bits}-bit): give a larger budget" + (", or a 4-bit base (QUANTIZATION_BIT=4)" if bits != 4 else "")
        )


def _stored_bits(folder: str) -> int:
    """Bits per weight in the folder's files: 32 when config.json says float32, else 16."""
    import json

    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return 16
    return 32 if (config.get("dtype") or config.get("torch_dtype")) == "float32" else 16


# ----------------------------------------------------------------------------- the run's peak


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_metrics(prefix: str) -> dict:
    """The peak memory since :func:`reset_peak`: on a GPU what torch allocated and what it reserved from the
    card (what a smaller card must hold); on CPU the process's peak resident memory."""
    if torch.cuda.is_available():
        return {
            f"{prefix}_peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            f"{prefix}_peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
        }
    import resource

    return {f"{prefix}_peak_host_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
