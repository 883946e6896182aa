"""Data: read and validate files, prompt -> token ids and labels, batch padding.

Records are read and checked here (clear errors with file, line and field) and handed to ``datasets``
through a generator, so tokenization is cached by ``datasets`` and redone when the file, tokenizer,
template or lengths change. Token layout (any tokenizer)::

    train: input_ids = prompt[:max_source_length] + answer[:max_target_length] + [eos]
           labels    = [-100] * len(prompt)        + answer[:max_target_length] + [eos]
    eval:  input_ids = prompt[:max_source_length]   labels = answer[:val_max_target_length]

Truncation keeps the head of the prompt, as ChatGLM's scripts do, but keeps the template's answer cue
(e.g. "\\n\\n答：") at its end. Batches are padded to their longest sample only: right for training,
left for generation.
"""

import json
import logging
import os

import datasets
import torch

from glmtune.arguments import IGNORE_INDEX, DataArguments
from glmtune.errors import DataError
from glmtune.prompt import PromptFormat, Special

logger = logging.getLogger(__name__)

FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "response": datasets.Value("string"),
        "history": datasets.List(datasets.List(datasets.Value("string"))),
    }
)
DATA_README = "see data/README.md for the format"
READER_VERSION = 1  # bump when read_records changes what it yields, to invalidate cached datasets


# ----------------------------------------------------------------------------- reading


def read_records(path: str, prompt_column: str, response_column: str, history_column=None):
    """Yield ``{"prompt", "response", "history"}`` for every record of a JSON-lines file or JSON array.

    ``null`` counts as an empty string; any other non-string value, a missing field or a malformed
    line stops with a :class:`DataError` naming the file, the line and the field.
    """
    text = _read_text(path)
    count = 0
    for where, record in _json_records(path, text):
        count += 1
        yield _normalize(where, record, prompt_column, response_column, history_column)
    if count == 0:
        raise DataError(f"{path}: no records in the file ({DATA_README})")


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    bom = b"\xef\xbb\xbf"
    body = raw[len(bom) :] if raw.startswith(bom) else raw
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as error:
        offset = error.start + len(raw) - len(body)
        line = raw[:offset].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {offset}); save the file as UTF-8") from None


def _json_records(path: str, text: str):
    """(location, value) pairs: 'file:line' for JSON lines, 'file: element N' for a JSON array."""
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: invalid JSON array ({error.msg}, column {error.colno})") from None
        for index, value in enumerate(values):
            yield f"{path}: element {index}", value
        return
    # Split on "\n" only: str.splitlines() would also break records at U+2028 and friends, which
    # json.dumps(ensure_ascii=False) leaves unescaped inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}:{number}: invalid JSON ({error.msg}, column {error.colno}); {DATA_README}"
            ) from None


def _normalize(where: str, record, prompt_column: str, response_column: str, history_column):
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return {
        "prompt": _text_field(where, record, prompt_column, "--prompt_column"),
        "response": _text_field(where, record, response_column, "--response_column"),
        "history": _history_field(where, record, history_column) if history_column else [],
    }


def _text_field(where: str, record: dict, column: str, flag: str) -> str:
    if column not in record:
        present = ", ".join(sorted(record)) or "none"
        raise DataError(f"{where}: no field '{column}' ({flag}); fields present: {present}")
    value = record[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{column}' must be a string, got {type(value).__name__}")
    return value


def _history_field(where: str, record: dict, column: str) -> list:
    value = record.get(column)
    if value is None:
        return []
    shape_error = DataError(f"{where}: field '{column}' must be a list of [query, answer] pairs of strings")
    if not isinstance(value, list):
        raise shape_error
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise shape_error
    return value


def load_split(path: str, data_args: DataArguments) -> datasets.Dataset:
    """A validated file as a ``datasets.Dataset`` (cached by file path, size and modification time)."""
    stat = os.stat(path)
    gen_kwargs = {
        "path": os.path.abspath(path),
        "prompt_column": data_args.prompt_column,
        "response_column": data_args.response_column,
        "history_column": data_args.history_column,
    }
    try:
        return datasets.Dataset.from_generator(
            read_records,
            gen_kwargs=gen_kwargs,
            features=FEATURES,
            fingerprint=_fingerprint(gen_kwargs, stat),
        )
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, DataError):
            raise error.__cause__ from None
        raise


def _fingerprint(gen_kwargs: dict, stat) -> str:
    from datasets.fingerprint import Hasher

    return Hasher.hash([READER_VERSION, gen_kwargs, stat.st_size, stat.st_mtime_ns])


# ----------------------------------------------------------------------------- tokenizing


class PromptEncoder:
    """query + history -> the prompt's token ids, as training built them (template, special tokens, truncation).

    Used for training and evaluation samples (:class:`Encoder`) and by the tools that serve a model."""

    def __init__(self, tokenizer, prompt_format: PromptFormat, max_source_length: int):
        self.tokenizer = tokenizer
        self.format = prompt_format
        self.max_source_length = max_source_length
        self.frame = special_token_frame(tokenizer) if prompt_format.framed else ([], [])

    def full_ids(self, query: str, history) -> list:
        """The whole prompt's ids, untruncated."""
        before, after = self.frame
        return before + self.encode_segments(self.format.segments(query, history)) + after

    def encode(self, query: str, history) -> tuple[list, bool]:
        """The prompt's ids within max_source_length, and whether it was cut: the head is kept, and so is the
        cue after the query (and the tokenizer's special tokens around the prompt), so the model still knows
        an answer follows."""
        before, after = self.frame
        body = self.encode_segments(self.format.segments(query, history))
        budget = self.max_source_length - len(before) - len(after)
        if len(body) <= budget:
            return before + body + after, False
        tail = self.encode_segments(self.format.tail(history))
        keep_tail = min(len(tail), budget // 2)
        body = body[: budget - keep_tail] + (body[len(body) - keep_tail :] if keep_tail else [])
        return before + body + after, True

    def encode_segments(self, segments: list) -> list:
        ids = []
        for segment in segments:
            if isinstance(segment, Special):
                ids.append(self.tokenizer.convert_tokens_to_ids(segment))
            elif segment:
                ids += self.tokenizer.encode(segment, add_special_tokens=False)
        return ids


class Encoder:
    """prompt/response/history -> input_ids/labels (+ truncation flags), for ``datasets.map``."""

    def __init__(self, prompt_encoder: PromptEncoder, max_target_length: int, train: bool):
        self.prompts = prompt_encoder
        self.max_target_length = max_target_length
        self.train = train

    def __call__(self, batch: dict) -> dict:
        out = {"input_ids": [], "labels": [], "source_truncated": [], "target_truncated": []}
        eos = self.prompts.tokenizer.eos_token_id
        for prompt, response, history in zip(batch["prompt"], batch["response"], batch["history"]):
            prompt_ids, source_cut = self.prompts.encode(prompt, history)
            answer_ids = self.prompts.encode_segments(self.prompts.format.answer_segments(response))
            target_cut = len(answer_ids) > self.max_target_length
            answer_ids = answer_ids[: self.max_target_length]
            if self.train:
                answer_ids = answer_ids + [eos]
                out["input_ids"].append(prompt_ids + answer_ids)
                out["labels"].append([IGNORE_INDEX] * len(prompt_ids) + answer_ids)
            else:
                out["input_ids"].append(prompt_ids)
                out["labels"].append(answer_ids)
            out["source_truncated"].append(source_cut)
            out["target_truncated"].append(target_cut)
        return out


def special_token_frame(tokenizer) -> tuple[list, list]:
    """The ids the tokenizer adds before and after a text (``add_special_tokens=True``): a BOS, ChatGLM2's
    ``[gMASK] sop``, ChatGLM-6B's trailing ``[gMASK] <sop>``... Read off a probe so that any tokenizer works."""
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError(f"{type(tokenizer).__name__}: cannot tell which special tokens it adds around a text")


def tokenize(dataset, tokenizer, prompt_format, data_args: DataArguments, split: str):
    """Drop unusable training rows, tokenize, report truncation. ``split``: train, eval or predict."""
    train = split == "train"
    if train:
        before = len(dataset)
        dataset = dataset.filter(_has_prompt_and_response, desc="Skipping empty rows")
        if len(dataset) < before:
            logger.warning(
                "train: skipped %d of %d rows whose prompt or response is empty", before - len(dataset), before
            )
        if len(dataset) == 0:
            raise DataError(f"{data_args.train_file}: every row has an empty prompt or response")
    target_length = data_args.max_target_length if train else data_args.val_max_target_length
    encoder = Encoder(PromptEncoder(tokenizer, prompt_format, data_args.max_source_length), target_length, train)
    dataset = dataset.map(
        encoder,
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=data_args.preprocessing_num_workers,
        load_from_cache_file=not data_args.overwrite_cache,
        desc=f"Tokenizing {split}",
    )
    _report_truncation(dataset, split, data_args.max_source_length, target_length)
    return dataset


def _has_prompt_and_response(row: dict) -> bool:
    return bool(row["prompt"]) and bool(row["response"])


def _report_truncation(dataset, split: str, max_source: int, max_target: int) -> None:
    sources, targets = sum(dataset["source_truncated"]), sum(dataset["target_truncated"])
    if sources:
        logger.warning(
            "%s: %d of %d prompts were longer than max_source_length %d and were truncated",
            split,
            sources,
            len(dataset),
            max_source,
        )
    if targets:
        logger.warning(
            "%s: %d of %d answers were longer than %d tokens and were truncated",
            split,
            targets,
            len(dataset),
            max_target,
        )


# ----------------------------------------------------------------------------- batching


def target_index(labels: torch.Tensor) -> torch.Tensor:
    """The flat positions (into ``labels.view(-1)``) whose next token is a target: where ``glmtune.loss``
    applies the output head. Computed by the training collators on the host, where it costs nothing; on
    the GPU, finding them is a data-dependent size and so a device-to-host sync in every step."""
    rows, columns = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + columns


class Collator:
    """Pad a batch to its longest sample: right for training, left for generation (the new tokens follow
    the prompt directly). Labels pad with -100 so padding never counts in the loss. ``with_target_index``:
    training batches also carry :func:`target_index`."""

    def __init__(self, pad_token_id: int, padding_side: str, pad_to_multiple_of: int = 8, with_target_index=False):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.multiple = pad_to_multiple_of
        self.with_target_index = with_target_index

    def __call__(self, features: list) -> dict:
        input_ids = [f["input_ids"] for f in features]
        labels = self._pad([f["labels"] for f in features], IGNORE_INDEX)
        attention_mask = self._pad([[1] * len(ids) for ids in input_ids], 0)
        batch = {
            "input_ids": self._pad(input_ids, self.pad_token_id),
            "attention_mask": attention_mask,
            # Real tokens count from 0 whichever side is padded: prefix keys carry no position, so a
            # shifted query position would change what it reads from the prefix.
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
            "labels": labels,
        }
        if self.with_target_index:
            batch["target_index"] = target_index(labels)
        return batch

    def _pad(self, rows: list, value: int) -> torch.Tensor:
        length = max(len(row) for row in rows)
        length = -(-length // self.multiple) * self.multiple
        padded = [
            [value] * (length - len(row)) + list(row)
            if self.padding_side == "left"
            else list(row) + [value] * (length - len(row))
            for row in rows
        ]
        return torch.tensor(padded, dtype=torch.long)


class PaddingFreeCollator:
    """Training batches without padding: the batch's samples back to back in one row.

    Positions restart at 0 in every sample and ``cu_seq_lens_q`` / ``cu_seq_lens_k`` hold the sample
    boundaries (flash attention's variable-length arguments, under the names transformers gives them), so
    ``glmtune.attention`` keeps every token's attention inside its own sample: the same function as the
    padded batch, without computing the padding. Each sample's first label becomes -100 so that the
    previous sample's last token does not learn to predict it (in a padded batch nothing predicts position
    0 either); the loss and its token count are therefore those of the padded batch. Batches carry
    :func:`target_index` (this collator is for training only).
    """

    def __call__(self, features: list) -> dict:
        input_ids, labels, positions, boundaries = [], [], [], [0]
        for feature in features:
            length = len(feature["input_ids"])
            input_ids += feature["input_ids"]
            labels += [IGNORE_INDEX] + list(feature["labels"][1:])
            positions += range(length)
            boundaries.append(boundaries[-1] + length)
        longest = max(end - start for start, end in zip(boundaries, boundaries[1:]))
        cu_seq_lens = torch.tensor(boundaries, dtype=torch.int32)
        labels = torch.tensor([labels], dtype=torch.long)
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "labels": labels,
            "target_index": target_index(labels),
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest,
            "max_length_k": longest,
        }
