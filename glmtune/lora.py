"""LoRA through PEFT on a frozen (optionally 4/8-bit) base.

* **What is added**: PEFT's LoRA layers on every linear layer of the decoder (or ``--lora_target``); DoRA,
  rsLoRA, PiSSA/OLoRA/LoftQ/gaussian initialization and AdaLoRA as PEFT implements them (:func:`peft_config`).
* **What trains**: the LoRA matrices only (PEFT keeps them float32); LoRA+ gives B its own learning rate
  (:func:`loraplus_optimizer`), AdaLoRA reallocates ranks after each step (:class:`AdaLoraBudget`).
* **What is saved**: a standard PEFT adapter folder, ``adapter_model.safetensors`` + ``adapter_config.json``,
  which ``PeftModel.from_pretrained`` loads; a PiSSA/OLoRA run's final adapter converted to a plain LoRA
  (:func:`save_adapter`).
* **Merging**: :func:`merge_and_save` folds an adapter into its base and saves a plain model folder.
"""

import inspect
import logging
import os
import shutil
import tempfile
import warnings

import torch
from safetensors import SafetensorError
from transformers import Trainer, TrainerCallback

from glmtune import chatglm
from glmtune.arguments import LoraArguments
from glmtune.errors import GlmtuneError

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The original LoRA recipes' targets on the original ChatGLM models (ChatGLM-Tuning, ChatGLM3 finetune_demo,
# PromptCBLUE): every linear layer of the decoder, by their original names.
CHATGLM_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
INITIAL_ADAPTER = "initial"  # PEFT names the initial weights after their folder while it converts


def add_lora(model, args: LoraArguments, trainable: bool = False, total_steps: int | None = None):
    """Wrap the frozen base with LoRA adapters: new ones, or --lora_checkpoint's (``trainable``: to be trained
    further, a warm start). ``total_steps``: the run's optimizer steps (AdaLoRA schedules its ranks over them)."""
    model.requires_grad_(False)
    if args.lora_checkpoint:
        return load_adapter(model, args.lora_checkpoint, trainable, args.lora_dropout if trainable else None)
    from peft import get_peft_model

    targets = lora_targets(args.lora_target, model.config)
    _check_targets(model, targets, args.lora_target)
    try:
        config = peft_config(args, targets, total_steps)
    except ValueError as error:  # PEFT's own checks of the combination
        raise GlmtuneError(f"LoRA settings: {error}") from None
    try:
        model = get_peft_model(model, config)
    except ValueError as error:
        raise GlmtuneError(f"--lora_target {args.lora_target}: {error}") from None
    if args.init_lora_weights == "loftq":
        _loftq(model)
    elif args.init_lora_weights in ("pissa", "olora"):
        _keep_initial_adapter(model)
    return model


def peft_config(args: LoraArguments, targets, total_steps: int | None = None):
    """PEFT's config for a new adapter: LoraConfig, or AdaLoraConfig for --lora_variant adalora."""
    from peft import AdaLoraConfig, LoraConfig

    common = {
        "task_type": "CAUSAL_LM",
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "target_modules": targets,
    }
    if args.lora_variant == "adalora":
        return AdaLoraConfig(
            **common,
            target_r=args.lora_rank,
            init_r=args.adalora_init_rank or args.lora_rank,
            tinit=args.adalora_tinit or 0,
            tfinal=args.adalora_tfinal or 0,
            total_step=total_steps,
        )
    # LoftQ on a base quantized as it loads is PEFT's replace_lora_weights_loftq after a plain init (_loftq).
    init = True if args.init_lora_weights in (None, "true", "loftq") else args.init_lora_weights
    return LoraConfig(
        **common,
        r=args.lora_rank,
        use_dora=bool(args.use_dora),
        use_rslora=bool(args.use_rslora),
        init_lora_weights=init,
    )


def _loftq(model) -> None:
    """LoftQ on a 4-bit base (PEFT's replace_lora_weights_loftq): A and B from the SVD of each weight's quantization
    error, the full-precision weights read from the base's *.safetensors files. PEFT sets B A to the error itself
    and LoRA adds B A x alpha / r, so B is divided by that scale: base + adapter starts as the unquantized base."""
    from peft import replace_lora_weights_loftq
    from peft.tuners.lora import Linear4bit

    folder = model.get_base_model().name_or_path
    try:
        replace_lora_weights_loftq(model, model_path=folder)
    except (FileNotFoundError, OSError) as error:
        raise GlmtuneError(
            f"--init_lora_weights loftq reads the base's full-precision weights from its *.safetensors files: {error}"
        ) from None
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Linear4bit):
                module.lora_B["default"].weight.div_(module.scaling["default"])


def _keep_initial_adapter(model) -> None:
    """PiSSA/OLoRA moved each weight's principal part into the adapter (the base holds the rest). The initial
    adapter is kept, in a temporary folder, so that the final one is saved converted (save_adapter)."""
    folder = tempfile.TemporaryDirectory(prefix="glmtune-initial-adapter-")
    model.save_pretrained(os.path.join(folder.name, INITIAL_ADAPTER))
    model.glmtune_initial_adapter = folder  # removed with the model


def converts_on_save(model) -> bool:
    """Whether the final adapter of ``model`` is saved converted to a plain LoRA (a PiSSA/OLoRA start)."""
    return getattr(model, "glmtune_initial_adapter", None) is not None


def save_adapter(model, output_dir: str, is_main_process: bool = True) -> None:
    """The adapter as PEFT saves it; a PiSSA/OLoRA adapter converted to a plain LoRA of twice the rank that applies
    to the original base (PEFT's path_initial_model_for_weight_conversion: [B, B0] [A; -A0] = B A - B0 A0).
    Step checkpoints keep PEFT's own form (resuming loads them into the run's changed base; PEFT redoes the
    decomposition when it loads one alone)."""
    kwargs = {}
    if converts_on_save(model):
        initial = os.path.join(model.glmtune_initial_adapter.name, INITIAL_ADAPTER)
        kwargs["path_initial_model_for_weight_conversion"] = initial
    with warnings.catch_warnings():  # PEFT loads the initial weights beside the trained ones to convert, and warns
        warnings.filterwarnings("ignore", message=".*changes the base weights")
        model.save_pretrained(output_dir, is_main_process=is_main_process, **kwargs)


def load_adapter(model, folder: str, trainable: bool = False, dropout: float | None = None):
    """The base wrapped with the adapter saved in ``folder`` (PEFT format); ``trainable``: to train it further,
    with ``dropout`` (None: the adapter's own)."""
    from peft import PeftConfig, PeftModel

    try:
        config = PeftConfig.from_pretrained(folder)
        if dropout is not None:
            config.lora_dropout = dropout
        return PeftModel.from_pretrained(model, folder, is_trainable=trainable, config=config)
    except SafetensorError as error:  # a truncated or corrupt weights file
        raise GlmtuneError(f"--lora_checkpoint: {os.path.join(folder, WEIGHTS_FILE)} is corrupt: {error}") from None
    except (ValueError, OSError, RuntimeError) as error:
        raise GlmtuneError(f"--lora_checkpoint {folder}: cannot load this adapter: {error}") from None


# ----------------------------------------------------------------------------- training


def loraplus_optimizer(ratio: float):
    """A Trainer optimizer factory (GlmtuneTrainer's ``make_optimizer``) for LoRA+: PEFT's create_loraplus_optimizer,
    B matrices at ``ratio`` x the learning rate, with Trainer's optimizer class and settings (--optim, betas, eps,
    weight decay)."""

    def create(model, args):
        from peft.optimizers import create_loraplus_optimizer

        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        kwargs = dict(kwargs)
        return create_loraplus_optimizer(
            model,
            optimizer_cls,
            lr=kwargs.pop("lr"),
            loraplus_lr_ratio=ratio,
            loraplus_weight_decay=args.weight_decay,
            **kwargs,
        )

    return create


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA reallocates its ranks from each step's gradients: PEFT's update_and_allocate after the optimizer
    step and before the gradients are zeroed, with the number of steps done before it."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)


def training_callbacks(model) -> list:
    """The Trainer callbacks that training ``model`` needs (AdaLoRA's)."""
    return [AdaLoraBudget(model)] if getattr(model, "peft_type", None) == "ADALORA" else []


def lora_targets(spec: str, model_config=None):
    """'all' -> every linear layer except the output head (PEFT's 'all-linear'; for the original ChatGLM
    models their four linear layers by name, as their LoRA recipes write it); else a list of names."""
    if spec.strip() == "all":
        return list(CHATGLM_TARGETS) if chatglm.is_chatglm_config(model_config) else "all-linear"
    return [name.strip() for name in spec.split(",") if name.strip()]


def check_targets_early(model_args, spec: str, checkpoint: str | None = None, saved: str | None = None) -> None:
    """--lora_target checked on the base's shape alone (an empty copy on the meta device: no weights read), so
    that a typo, or names other than --lora_checkpoint's targets (``saved``), stop the run before the data is
    tokenized and the base loaded."""
    from glmtune.model import empty_model

    model = empty_model(model_args)
    if model is None:
        return
    targets = lora_targets(spec, model.config)
    _check_targets(model, targets, spec)
    if saved is not None and _target_names(model, targets) != set(saved.split(",")):
        raise GlmtuneError(
            f"--lora_target {spec} contradicts --lora_checkpoint {checkpoint} (targets {saved} in its {CONFIG_FILE}): "
            "give the checkpoint's targets or leave the flag out"
        )


def _target_names(model, targets) -> set:
    if not isinstance(targets, str):
        return set(targets)
    head = model.get_output_embeddings()  # "all-linear": every linear layer but the output head, as PEFT picks
    linear = [name for name, module in model.named_modules() if _is_linear(module) and module is not head]
    return {name.rsplit(".", 1)[-1] for name in linear}


def _check_targets(model, targets, spec: str) -> None:
    """Every name given must adapt something: PEFT refuses only when none matches, and drops the others silently."""
    if isinstance(targets, str):  # "all-linear": PEFT's own rule
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)} - {""})
        raise GlmtuneError(
            f"--lora_target {spec}: no module named {', '.join(missing)} in this model; its linear layers: "
            f"{', '.join(linear)} (or all)"
        )


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear8bitLt", "Linear4bit")


def is_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG_FILE))


# ----------------------------------------------------------------------------- merging


def merge_and_save(model, tokenizer, output: str, max_shard_size: str) -> None:
    """Fold the adapter of ``model`` (a PeftModel) into its base and save a plain model folder at ``output``.

    Written to ``output.partial`` and renamed when complete, so ``output`` is never a half-written folder.
    """
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # the loader turns it off for training; a saved model should generate normally
    partial = output.rstrip("/\\") + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)  # left over by an interrupted merge
    save_kwargs = {"max_shard_size": max_shard_size}
    if "safe_serialization" in inspect.signature(merged.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True  # transformers 4; transformers 5 always writes safetensors
    merged.save_pretrained(partial, **save_kwargs)
    tokenizer.save_pretrained(partial)
    generation_config = getattr(merged, "generation_config", None)
    if generation_config is not None and not os.path.isfile(os.path.join(partial, "generation_config.json")):
        generation_config.save_pretrained(partial)
    if os.path.exists(output):  # the caller checked that replacing it was asked for
        shutil.rmtree(output)
    os.rename(partial, output)
