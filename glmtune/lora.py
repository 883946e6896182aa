"""LoRA through PEFT on a frozen (optionally 4/8-bit) base.

* **What is added**: PEFT's LoRA layers on every linear layer of the decoder (or ``--lora_target``); DoRA,
  rsLoRA, PiSSA/OLoRA/LoftQ/gaussian initialization and AdaLoRA as PEFT implements them (:func:`peft_config`).
* **What trains**: the LoRA matrices (PEFT keeps them float32), and ``--modules_to_save`` in full (float32 too);
  LoRA+ gives B its own learning rate (:func:`loraplus_optimizer`), AdaLoRA reallocates ranks after each step
  (:class:`AdaLoraBudget`).
* **What is saved**: a standard PEFT adapter folder, ``adapter_model.safetensors`` + ``adapter_config.json``,
  which ``PeftModel.from_pretrained`` loads, PEFT 0.6 and later (:mod:`glmtune.adapter_config`); a PiSSA/OLoRA
  run's final adapter converted to a plain LoRA (:func:`save_adapter`).
* **Merging**: :func:`merge_and_save` folds adapters into their base, in order, and saves a plain model folder.
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

from glmtune import chatglm, vocabulary
from glmtune.adapter_config import CONFIG_FILE, WEIGHTS_FILE
from glmtune.arguments import LoraArguments
from glmtune.errors import GlmtuneError

logger = logging.getLogger(__name__)

# The original LoRA recipes' targets on the original ChatGLM models (ChatGLM-Tuning, ChatGLM3 finetune_demo,
# PromptCBLUE): every linear layer of the decoder, by their original names.
CHATGLM_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
INITIAL_ADAPTER = "initial"  # PEFT names the initial weights after their folder while it converts


def add_lora(model, args: LoraArguments, tokenizer_size: int | None = None, trainable: bool = False,
             total_steps: int | None = None):  # fmt: skip
    """Wrap the frozen base with LoRA adapters: new ones, or --lora_checkpoint's (``trainable``: to be trained
    further, a warm start). A tokenizer larger than the base's embeddings (``tokenizer_size``) resizes them, if the
    new rows are trained and saved (glmtune.vocabulary). ``total_steps``: the run's optimizer steps (AdaLoRA
    schedules its ranks over them)."""
    model.requires_grad_(False)
    if args.lora_checkpoint:
        dropout = args.lora_dropout if trainable else None
        return load_adapter(model, args.lora_checkpoint, trainable, dropout, tokenizer_size=tokenizer_size)
    from peft import get_peft_model

    targets = lora_targets(args.lora_target, model.config)
    _check_targets(model, targets, args.lora_target)
    saved = module_names(args.modules_to_save)
    _check_modules_to_save(model, saved, args.modules_to_save)
    vocabulary.resize(model, check_vocabulary(model, args, tokenizer_size))
    try:
        config = peft_config(args, targets, total_steps, saved)
    except ValueError as error:  # PEFT's own checks of the combination
        raise GlmtuneError(f"LoRA settings: {error}") from None
    try:
        model = get_peft_model(model, config)
    except ValueError as error:
        raise GlmtuneError(f"--lora_target {args.lora_target}: {error}") from None
    _train_saved_modules_in_float32(model)
    if args.init_lora_weights == "loftq":
        _loftq(model)
    elif args.init_lora_weights in ("pissa", "olora"):
        _keep_initial_adapter(model)
    return model


def peft_config(args: LoraArguments, targets, total_steps: int | None = None, saved=()):
    """PEFT's config for a new adapter: LoraConfig, or AdaLoraConfig for --lora_variant adalora."""
    from peft import AdaLoraConfig, LoraConfig

    common = {
        "task_type": "CAUSAL_LM",
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "target_modules": targets,
        "modules_to_save": list(saved) or None,
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


def _train_saved_modules_in_float32(model) -> None:
    """PEFT keeps LoRA's matrices float32 but trains the modules_to_save copies in the base's dtype, where bfloat16
    loses the small steps of a long run. Kept float32 here; their floating inputs are cast up and their output
    back to the base's dtype, so the layers around them see what they would without."""
    from peft.utils import ModulesToSaveWrapper

    for wrapper in [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]:
        for module in wrapper.modules_to_save.values():
            dtype = next(module.parameters()).dtype
            if dtype == torch.float32:
                continue
            module.float()
            module.register_forward_pre_hook(lambda _, args: tuple(_cast(a, torch.float32) for a in args))
            module.register_forward_hook(lambda _, args, output, dtype=dtype: _cast(output, dtype))


def _cast(value, dtype):
    return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value


def load_adapter(model, folder: str, trainable: bool = False, dropout: float | None = None, tokenizer_size=None,
                 flag="--lora_checkpoint"):  # fmt: skip
    """The base wrapped with the adapter saved in ``folder`` (PEFT format), the base first resized to the
    tokenizer saved with it (else to ``tokenizer_size``, the tokenizer in use) when that is larger;
    ``trainable``: to train it further, with ``dropout`` (None: the adapter's own)."""
    from peft import PeftConfig, PeftModel

    vocabulary.resize(model, check_vocabulary(model, LoraArguments(lora_checkpoint=folder), tokenizer_size))
    try:
        config = PeftConfig.from_pretrained(folder)
        if dropout is not None:
            config.lora_dropout = dropout
        return PeftModel.from_pretrained(model, folder, is_trainable=trainable, config=config)
    except SafetensorError as error:  # a truncated or corrupt weights file
        raise GlmtuneError(f"{flag}: {os.path.join(folder, WEIGHTS_FILE)} is corrupt: {error}") from None
    except (ValueError, OSError, RuntimeError) as error:
        raise GlmtuneError(f"{flag} {folder}: cannot load this adapter: {_first_problem(error)}") from None


def check_vocabulary(model, args: LoraArguments, tokenizer_size: int | None) -> int | None:
    """The embedding rows the run needs: the tokenizer's size (``tokenizer_size``), or the size of the tokenizer
    saved with --lora_checkpoint, the one it was trained with. When that is more than the base has, the rows a
    resize adds must be trained and saved (--modules_to_save) or carried by the adapter; refused otherwise."""
    folder = args.lora_checkpoint
    size = (vocabulary.saved_vocabulary(folder) if folder else None) or tokenizer_size
    if not size or not vocabulary.added_tokens(model, size):
        return size
    saved = vocabulary.saved_modules(folder) if folder else module_names(args.modules_to_save)
    missing = vocabulary.unsaved_embeddings(model, saved)
    if missing:
        raise GlmtuneError(_unsaved_rows(model, size, missing, args))
    return size


def _unsaved_rows(model, size: int, missing: list[str], args: LoraArguments) -> str:
    sizes, names = vocabulary.sizes(model, size), ",".join(vocabulary.embedding_names(model))
    if args.lora_checkpoint:
        return (
            f"{sizes}, and the adapter {args.lora_checkpoint} carries no trained rows for them ({', '.join(missing)} "
            "not among its modules_to_save)"
        )
    if args.modules_to_save:
        return (
            f"{sizes}: LoRA must train and save their new rows, and --modules_to_save {args.modules_to_save} leaves "
            f"out {', '.join(missing)}: use --modules_to_save {names}"
        )
    return f"{sizes}: LoRA must train and save their new rows: add --modules_to_save {names}"


def _first_problem(error: Exception) -> str:
    """torch lists every mismatched tensor on its own line (hundreds for another base): the first one says it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    mismatch = [line for line in lines if line.startswith("size mismatch")]
    if mismatch:
        return f"it was trained on a different base ({mismatch[0]})"
    return " ".join(lines)


def module_names(spec: str | None) -> list[str]:
    """A comma-separated list of module names (--lora_target, --modules_to_save) as a list."""
    return [name.strip() for name in (spec or "").split(",") if name.strip()]


def lora_targets(spec: str, model_config=None):
    """'all' -> every linear layer except the output head (PEFT's 'all-linear'; for the original ChatGLM
    models their four linear layers by name, as their LoRA recipes write it); else a list of names."""
    if spec.strip() == "all":
        return list(CHATGLM_TARGETS) if chatglm.is_chatglm_config(model_config) else "all-linear"
    return module_names(spec)


def check_targets_early(model_args, args: LoraArguments, saved: str | None = None) -> None:
    """--lora_target and --modules_to_save checked on the base's shape alone (an empty copy on the meta device: no
    weights read), so that a typo, or targets other than --lora_checkpoint's (``saved``), stop the run before the
    data is tokenized and the base loaded."""
    from glmtune.model import empty_model

    model = empty_model(model_args)
    if model is None:
        return
    targets = lora_targets(args.lora_target, model.config)
    _check_targets(model, targets, args.lora_target)
    _check_modules_to_save(model, module_names(args.modules_to_save), args.modules_to_save)
    if saved is not None and _target_names(model, targets) != set(saved.split(",")):
        raise GlmtuneError(
            f"--lora_target {args.lora_target} contradicts --lora_checkpoint {args.lora_checkpoint} (targets {saved} "
            f"in its {CONFIG_FILE}): give the checkpoint's targets or leave the flag out"
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
    missing = [t for t in targets if not any(vocabulary.covers(t, name) for name in names)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)} - {""})
        raise GlmtuneError(
            f"--lora_target {spec}: no module named {', '.join(missing)} in this model; its linear layers: "
            f"{', '.join(linear)} (or all)"
        )


def _check_modules_to_save(model, saved: list[str], spec: str | None) -> None:
    """Every name must name modules by whole parts (PEFT matches any ending: 'norm' would take every layer's
    input_layernorm too)."""
    names = [name for name, _ in model.named_modules() if name]
    for wanted in saved:
        matched = [name for name in names if vocabulary.covers(wanted, name)]
        if not matched:
            known = sorted({name.rsplit(".", 1)[-1] for name in names if not name[-1].isdigit()})
            raise GlmtuneError(
                f"--modules_to_save {spec}: no module named {wanted} in this model; its modules: {', '.join(known)}"
            )
        more = sorted({name.rsplit(".", 1)[-1] for name in names if name.endswith(wanted) and name not in matched})
        if more:
            raise GlmtuneError(
                f"--modules_to_save {spec}: PEFT would also train every module whose name ends in {wanted} "
                f"({', '.join(more)}): name the module by its full name, e.g. {matched[0]}"
            )


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear8bitLt", "Linear4bit")


def is_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG_FILE))


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
    step and before the gradients are zeroed, with the number of steps done before it.

    PEFT adds the orthogonality penalty to every forward's loss, while the loss itself is normalised over the whole
    effective batch: with gradient accumulation the penalty counted once per micro-batch, so an update depended
    on how the batch was split (which the memory plan chooses). Its weight is divided by the accumulation steps
    while a step accumulates, and restored before the step's checkpoint or evaluation (their config and loss
    are PEFT's)."""

    def __init__(self, model):
        self.model = model
        self.config = model.peft_config[model.active_adapter]
        self.orth_reg_weight = self.config.orth_reg_weight

    def on_step_begin(self, args, state, control, **kwargs):
        self.config.orth_reg_weight = self.orth_reg_weight / args.gradient_accumulation_steps

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.config.orth_reg_weight = self.orth_reg_weight


def training_callbacks(model) -> list:
    """The Trainer callbacks that training ``model`` needs (AdaLoRA's)."""
    return [AdaLoraBudget(model)] if getattr(model, "peft_type", None) == "ADALORA" else []


# ----------------------------------------------------------------------------- merging


def merge_adapters(model, adapters: list[str], tokenizer_size=None):
    """``model`` with each adapter in ``adapters`` folded into its weights in turn: each one applies to the base as
    the ones before it left it (an adapter trained on a merged model comes after that model's adapters)."""
    for folder in adapters:
        model = load_adapter(model, folder, tokenizer_size=tokenizer_size, flag="--checkpoint").merge_and_unload()
    return model


def merge_and_save(model, adapters: list[str], tokenizer, output: str, max_shard_size: str) -> None:
    """Fold ``adapters`` into the base ``model`` in order (:func:`merge_adapters`) and save a plain model folder at
    ``output``, in safetensors files of at most ``max_shard_size`` each (with an index when there are several).

    Written to ``output.partial`` and renamed when complete, so ``output`` is never a half-written folder.
    """
    merged = merge_adapters(model, adapters, len(tokenizer))
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
