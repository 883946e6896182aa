"""Tokenizer and frozen base model: dtype policy, quantization, device. Nothing method-specific, and nothing of
the fast path (``glmtune.speed``)."""

import logging

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from glmtune import chatglm
from glmtune.arguments import ModelArguments
from glmtune.errors import GlmtuneError

logger = logging.getLogger(__name__)


def load_tokenizer(model_args: ModelArguments):
    path = model_args.model_name_or_path
    try:  # the config first: a broken config.json otherwise surfaces as a puzzling tokenizer error
        load_config(model_args)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise GlmtuneError(
            f"--model_name_or_path {path}: config.json is not a usable model config: {_summary(error)}"
        ) from None
    try:
        tokenizer = load_plain_tokenizer(model_args)
    except (OSError, ValueError) as error:
        raise GlmtuneError(f"--model_name_or_path {path}: cannot load its tokenizer: {_summary(error)}") from None
    if tokenizer.eos_token_id is None:
        raise GlmtuneError(f"--model_name_or_path {path}: the tokenizer has no eos token, so answers cannot end")
    if tokenizer.pad_token_id is None:
        # Padding is always masked out of attention and loss, so any id works; eos is the usual choice.
        logger.info("The tokenizer has no pad token; padding with the eos token %r", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(model_args: ModelArguments):
    path = model_args.model_name_or_path
    if chatglm.is_chatglm_folder(path):  # THUDM's folders: glmtune's own classes, never their remote code
        return chatglm.load_config(path)
    return AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)


def load_plain_tokenizer(model_args: ModelArguments):
    """The tokenizer as the base ships it (no pad token added); ChatGLM folders get glmtune's own classes."""
    path = model_args.model_name_or_path
    if chatglm.is_chatglm_folder(path):
        from glmtune.chatglm.tokenization import load_chatglm_tokenizer

        return load_chatglm_tokenizer(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)


def _summary(error: Exception) -> str:
    """The first paragraph of a library's error, on one line (the CLI prints one ``error:`` line per line)."""
    return " ".join(str(error).split("\n\n")[0].split())


def select_dtype(name: str) -> torch.dtype:
    """'auto': bfloat16 on GPUs that have it (fp16's range overflows in long runs), else float16; float32 on CPU."""
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(bits: int, compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401  (only to give a clear message when it is missing)
    except ImportError:
        raise GlmtuneError(
            f"--quantization_bit {bits} needs bitsandbytes: pip install -r requirements-gpu.txt"
        ) from None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_base_model(model_args: ModelArguments):
    """The base model with every parameter frozen; only the method's own weights will train."""
    dtype = select_dtype(model_args.torch_dtype)
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa", "trust_remote_code": model_args.trust_remote_code}
    if model_args.quantization_bit:
        kwargs["quantization_config"] = quantization_config(model_args.quantization_bit, dtype)
        kwargs["device_map"] = {"": torch.cuda.current_device()}  # bitsandbytes quantizes on the GPU
    if model_args.quantization_bit == 8:
        _say_int8_casting_once()
    path = model_args.model_name_or_path
    model_class = AutoModelForCausalLM
    if chatglm.is_chatglm_folder(path):
        model_class = chatglm.causal_lm_class(path)
        kwargs.pop("trust_remote_code")
    try:
        model = model_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as error:  # SafetensorError: a truncated file
        raise GlmtuneError(f"--model_name_or_path {path}: cannot load the model: {_summary(error)}") from None
    model.requires_grad_(False)
    model.config.use_cache = False  # the cache only helps generation, which turns it back on
    logger.info("Loaded %s (%s, %.1fM parameters)", path, dtype, model.num_parameters() / 1e6)
    return model


class _FirstOnly(logging.Filter):
    """Lets the first record that starts with ``prefix`` through and drops the ones after it."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def _say_int8_casting_once() -> None:
    """bitsandbytes' 8-bit product casts bf16 activations to fp16 and logs it on every call (thousands of lines
    per evaluation); once is enough to say it."""
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _FirstOnly) for f in bnb_logger.filters):
        bnb_logger.addFilter(_FirstOnly("MatMul8bitLt: inputs will be cast"))


def empty_model(model_args: ModelArguments):
    """The base's modules without weights (on the meta device: nothing allocated, nothing read but the config),
    or None where it cannot be built that way."""
    path = model_args.model_name_or_path
    model_class = chatglm.causal_lm_class(path) if chatglm.is_chatglm_folder(path) else AutoModelForCausalLM
    try:
        config = load_config(model_args)
        with torch.device("meta"):
            if model_class is AutoModelForCausalLM:
                return AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
            return model_class(config)
    except Exception:  # noqa: BLE001 - only an early check: loading the base reports what is wrong
        return None


def base_causal_lm(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
