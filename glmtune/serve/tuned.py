"""Using a tuned model: load base + checkpoint, build prompts as training did, generate (batched or streamed).

One loader for the chat demos, the LoRA merge and the API server, so that all of them read checkpoints the
way the trainers wrote them.
"""

import functools
import os
import threading
from dataclasses import dataclass

import torch
from transformers import TextIteratorStreamer

from glmtune import lora, ptuning, vocabulary
from glmtune.arguments import DEFAULT_MAX_SOURCE_LENGTH, LoraArguments, ModelArguments, PtuningArguments
from glmtune.encoding import PromptEncoder
from glmtune.errors import GlmtuneError
from glmtune.generation import blank_stop_tokens
from glmtune.model import load_base_model, load_tokenizer
from glmtune.prompt import PromptFormat
from glmtune.serve import DEFAULT_MAX_NEW_TOKENS


@dataclass
class TunedModel:
    model: object
    tokenizer: object
    prompt_format: PromptFormat
    method: str  # "ptuning", "lora" or "base"
    max_source_length: int = DEFAULT_MAX_SOURCE_LENGTH

    @functools.cached_property
    def prompts(self) -> PromptEncoder:
        """Built once: every request encodes its prompt with it."""
        return PromptEncoder(self.tokenizer, self.prompt_format, self.max_source_length)

    def encode(self, query: str, history=None) -> list:
        """Prompt ids exactly as training built them (same template, same truncation)."""
        return self.prompts.encode(query, history or [])[0]

    def generate(self, queries: list, histories=None, **generate_kwargs) -> list:
        """Answers for several queries at once (left-padded batch), in order."""
        histories = histories or [None] * len(queries)
        return self.generate_ids([self.encode(q, h) for q, h in zip(queries, histories)], **generate_kwargs)

    def generate_ids(self, rows: list, **generate_kwargs) -> list:
        """Answers for several encoded prompts at once (left-padded batch), in order."""
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.model.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.model.device)
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **self._generate_kwargs(generate_kwargs)
            )
        ids = self.prompt_format.generation_ids()
        new_tokens = blank_stop_tokens(output[:, width:], ids["eos_token_id"], ids["pad_token_id"])
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def stream(self, query: str, history=None, **generate_kwargs):
        """Yield the answer's text as it is generated."""
        yield from self.stream_ids(self.encode(query, history), **generate_kwargs)

    def stream_ids(self, prompt_ids: list, **generate_kwargs):
        """Yield the answer's text for an encoded prompt as it is generated."""
        ids = torch.tensor([prompt_ids], device=self.model.device)
        streamer = AnswerStreamer(self.tokenizer, self.prompt_format.generation_ids())
        kwargs = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            streamer=streamer,
            **self._generate_kwargs(generate_kwargs),
        )
        failed = []
        thread = threading.Thread(target=self._generate_quietly, args=(failed,), kwargs=kwargs, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if failed:
            raise failed[0]

    def _generate_quietly(self, failed: list, **kwargs):
        """generate() for stream_ids, in its thread: an error ends the stream (else the reader would wait for
        text forever) and is raised again in the reader's thread."""
        try:
            with torch.no_grad():
                self.model.generate(**kwargs)
        except Exception as error:  # noqa: BLE001 - handed to the reader
            failed.append(error)
            kwargs["streamer"].end()

    def _generate_kwargs(self, overrides: dict) -> dict:
        kwargs = {
            "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
            "do_sample": False,
            "use_cache": True,
            **self.prompt_format.generation_ids(),
        }
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        if not kwargs.get("do_sample"):
            kwargs.pop("top_p", None), kwargs.pop("temperature", None)
        return kwargs


class AnswerStreamer(TextIteratorStreamer):
    """The answer's text as it is generated, without the prompt and without stop tokens (see blank_stop_tokens)."""

    def __init__(self, tokenizer, generation_ids: dict):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.generation_ids = generation_ids

    def put(self, value):
        if not self.next_tokens_are_prompt:
            value = blank_stop_tokens(value, self.generation_ids["eos_token_id"], self.generation_ids["pad_token_id"])
        super().put(value)


def checkpoint_method(checkpoint) -> str:
    """'ptuning', 'lora' or 'base' (no checkpoint), from the files the trainers write."""
    if checkpoint is None:
        return "base"
    if not os.path.isdir(checkpoint):
        raise GlmtuneError(f"checkpoint {checkpoint}: no such folder")
    if ptuning.is_checkpoint(checkpoint):
        return "ptuning"
    if lora.is_checkpoint(checkpoint):
        return "lora"
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise GlmtuneError(
            f"checkpoint {checkpoint}: a whole model folder (full fine-tuning saves these): give it as the model "
            "(--model_name_or_path / MODEL) with no checkpoint"
        )
    raise GlmtuneError(
        f"checkpoint {checkpoint}: neither a P-Tuning v2 checkpoint ({ptuning.CONFIG_FILE}) "
        f"nor a LoRA adapter ({lora.CONFIG_FILE})"
    )


def load_tuned(
    model_name_or_path: str,
    checkpoint=None,
    quantization_bit=None,
    torch_dtype="auto",
    prompt_template="auto",
    source_prefix="",
    max_source_length=DEFAULT_MAX_SOURCE_LENGTH,
    trust_remote_code=False,
) -> TunedModel:
    """Base model (+ P-Tuning v2 checkpoint or LoRA adapter), ready to generate."""
    if not os.path.isfile(os.path.join(model_name_or_path, "config.json")):
        raise GlmtuneError(f"model {model_name_or_path}: not a model folder (no config.json)")
    method = checkpoint_method(checkpoint)
    model_args = ModelArguments(
        model_name_or_path=model_name_or_path,
        quantization_bit=quantization_bit,
        torch_dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
    )
    tokenizer = load_tokenizer(model_args)
    try:
        prompt_format = PromptFormat(prompt_template, tokenizer, source_prefix)
    except ValueError as error:
        raise GlmtuneError(str(error)) from None
    model = load_base_model(model_args)
    if method == "lora":  # resized to the tokenizer saved with the adapter first, where it has added tokens
        model = lora.add_lora(model, LoraArguments(lora_checkpoint=checkpoint), len(tokenizer))
    else:
        why = vocabulary.FROZEN if method == "ptuning" else vocabulary.BASE_ALONE
        vocabulary.refuse_frozen(model, len(tokenizer), why)
    if method == "ptuning":
        model = ptuning.add_prefix_encoder(model, PtuningArguments(ptuning_checkpoint=checkpoint))
    if not quantization_bit and torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    model.config.use_cache = True
    return TunedModel(model, tokenizer, prompt_format, method, max_source_length)
