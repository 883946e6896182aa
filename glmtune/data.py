"""Data: validated files as cached datasets, tokenized, and batch padding.

Records are read and checked by :mod:`glmtune.records` (clear errors with file, line and field) and handed to
``datasets`` through a generator, so tokenization is cached by ``datasets`` and redone when the file, data format,
tokenizer, template or lengths change. :mod:`glmtune.encoding` turns them into ids and labels (its docstring has
the token layout and how long prompts and conversations are cut). Batches are padded to their longest sample
only: right for training, left for generation.
"""

import logging
import os

import datasets
import torch

from glmtune.arguments import IGNORE_INDEX, DataArguments
from glmtune.encoding import Encoder, PromptEncoder
from glmtune.errors import DataError
from glmtune.records import FEATURES, detect_format, read_records

logger = logging.getLogger(__name__)

READER_VERSION = 3  # bump when read_records changes what it yields, to invalidate cached datasets


# ----------------------------------------------------------------------------- reading


def load_split(path: str, data_args: DataArguments, keep_columns=()) -> datasets.Dataset:
    """A validated file as a ``datasets.Dataset`` (cached by file path, size and modification time).
    ``keep_columns``: fields of each record kept for generated_predictions.txt."""
    stat = os.stat(path)
    gen_kwargs = {
        "path": os.path.abspath(path),
        "data_format": resolve_format(path, data_args),
        "columns": (data_args.prompt_column, data_args.response_column, data_args.history_column),
        "keep_columns": tuple(keep_columns),
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


def resolve_format(path: str, data_args: DataArguments) -> str:
    """--data_format, or the format of the file's first record (logged)."""
    if data_args.data_format != "auto":
        return data_args.data_format
    data_format = detect_format(path)
    logger.info("%s: data format %s (from its first record; --data_format chooses)", path, data_format)
    flags = data_args.column_flags()
    if data_format != "prompt_response" and flags:
        raise DataError(
            f"{path}: its first record is in the {data_format} format, whose fields are fixed, but {', '.join(flags)} "
            "name prompt_response fields: add --data_format prompt_response to read it by those fields, or drop them"
        )
    return data_format


def _fingerprint(gen_kwargs: dict, stat) -> str:
    from datasets.fingerprint import Hasher

    return Hasher.hash([READER_VERSION, gen_kwargs, stat.st_size, stat.st_mtime_ns])


# ----------------------------------------------------------------------------- tokenizing


def tokenize(dataset, tokenizer, prompt_format, data_args: DataArguments, split: str):
    """Drop unusable training rows, tokenize, report truncation. ``split``: train, eval or predict."""
    train = split == "train"
    if train:
        before = len(dataset)
        dataset = dataset.filter(_has_query_and_answer, desc="Skipping empty rows")
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


def _has_query_and_answer(row: dict) -> bool:
    """The last reply and the message it answers are not empty."""
    return bool(row["messages"][-1]["content"]) and bool(row["messages"][-2]["content"])


def _report_truncation(dataset, split: str, max_source: int, max_target: int) -> None:
    total = len(dataset)
    dropped, cut = sum(dataset["history_dropped"]), sum(dataset["query_cut"])
    targets = sum(dataset["target_truncated"])
    if dropped:
        logger.warning(
            "%s: %d of %d samples were too long and lost their oldest history rounds (a prompt is kept within "
            "max_source_length %d; a conversation trained on every reply within max_source_length + "
            "max_target_length)",
            split,
            dropped,
            total,
            max_source,
        )
    if cut:
        logger.warning(
            "%s: %d of %d prompts were longer than max_source_length %d with no history left: the start of "
            "the query was cut",
            split,
            cut,
            total,
            max_source,
        )
    if targets:
        logger.warning(
            "%s: %d of %d answers were longer than %d tokens and were truncated",
            split,
            targets,
            total,
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
