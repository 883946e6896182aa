"""Command-line arguments, one dataclass per concern.

Flag names follow the ChatGLM-6B / ChatGLM2-6B ``ptuning/`` scripts so that their ``train.sh`` and
``evaluate.sh`` keep working. Every field's ``help`` is its documentation; checks that involve more
than one field live in :mod:`glmtune.parsing`.
"""

from dataclasses import dataclass, field

IGNORE_INDEX = -100  # label value that the cross-entropy loss skips (prompt and padding positions)
DTYPES = ("auto", "bfloat16", "float16", "float32")  # --torch_dtype
DATA_FORMATS = ("auto", "prompt_response", "alpaca", "conversations", "messages")  # --data_format
PREDICTION_FIELDS = ("labels", "predict")  # generated_predictions.txt's own fields
DEFAULT_MAX_SOURCE_LENGTH = 1024  # the ChatGLM scripts' default; the serving tools use it too


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "Local folder of the base model (config.json + weights + tokenizer files)."}
    )
    quantization_bit: int | None = field(
        default=None,
        metadata={"help": "Quantize the frozen base to 4 (NF4) or 8 bits with bitsandbytes. Needs a CUDA GPU."},
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the frozen base: auto (bfloat16 on GPUs that support it, else float16; float32 "
            "on CPU), bfloat16, float16 or float32. Trainable weights are always kept in float32. Full fine-tuning "
            "(finetune/) trains the base itself: auto keeps it in float32 (bf16 mixed precision on GPUs; DeepSpeed "
            "keeps its own float32 copy of a bf16 base); bfloat16 trains pure bf16 weights (less memory, small "
            "updates are rounded away)."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow the model folder to run its own Python code. Off by default: it executes code."},
    )


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None,
        metadata={"help": "Training data: JSON lines, a JSON array, or CSV / TSV with a header row (.csv, .tsv)."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation data for --do_eval (same kinds of file as --train_file)."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Prediction data for --do_predict (same kinds of file as --train_file)."}
    )
    data_format: str = field(
        default="auto",
        metadata={
            "help": "What a record holds (data/README.md shows each): prompt_response (--prompt_column, "
            "--response_column, --history_column); alpaca (instruction, optional input, output, optional history "
            "and system; the query is the Stanford Alpaca / ChatGLM-Tuning instruction and input joined as "
            "'{instruction}\\n{input}', which the prompt template then frames); conversations (ChatGLM3 "
            "finetune_demo: a 'conversations' list of {role, content}, optional 'tools'); messages (OpenAI style: "
            "a 'messages' list of {role, content}). Conversations and messages train every assistant reply. "
            "auto (default): detected from each file's first record and logged."
        },
    )
    prompt_column: str = field(default="content", metadata={"help": "prompt_response: field holding the user's query."})
    response_column: str = field(
        default="summary", metadata={"help": "prompt_response: field holding the expected answer."}
    )
    history_column: str | None = field(
        default=None,
        metadata={
            "help": "prompt_response: optional field holding earlier rounds as a list of [query, answer] pairs "
            "(JSON text in a CSV / TSV cell)."
        },
    )
    keep_columns: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated fields of each --test_file record to write into generated_predictions.txt "
            "beside labels and predict, e.g. sample_id,task_type (a PromptCBLUE-style submission)."
        },
    )
    source_prefix: str = field(default="", metadata={"help": "Text prepended to every query."})
    prompt_template: str = field(
        default="auto",
        metadata={
            "help": "How a query (and history) becomes the prompt: auto (an original ChatGLM/ChatGLM2/ChatGLM3 "
            "tokenizer's own format; else the tokenizer's chat template if it has one; else chatglm2), chat_template, "
            "chatglm3 (role tokens: '[gMASK]sop<|user|>\\n…<|assistant|>'), "
            "chatglm2 ('[Round 1]\\n\\n问：…\\n\\n答：'), "
            "chatglm (ChatGLM-6B: raw query, or '[Round 0]\\n问：…\\n答：' rounds with history) "
            "or raw (the query alone)."
        },
    )
    max_source_length: int = field(
        default=DEFAULT_MAX_SOURCE_LENGTH,
        metadata={
            "help": "Prompt tokens kept per sample. A longer prompt loses its oldest history rounds first, then the "
            "start of its query; the answer cue is kept. The log counts both."
        },
    )
    max_target_length: int = field(
        default=128,
        metadata={
            "help": "Answer tokens kept per training sample. A conversation trained on every reply keeps its latest "
            "turns within max_source_length + max_target_length tokens."
        },
    )
    val_max_target_length: int | None = field(
        default=None,
        metadata={
            "help": "Answer tokens kept as evaluation labels, and new tokens generated. Default: max_target_length."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test rows."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes used to tokenize the data (datasets.map num_proc)."}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Tokenize again instead of reusing the datasets cache."}
    )
    ignore_pad_token_for_loss: bool = field(
        default=True,
        metadata={"help": "Kept for compatibility with the ChatGLM scripts: padding never counts in the loss."},
    )

    def kept_columns(self) -> list[str]:
        """--keep_columns as a list of names."""
        return [name.strip() for name in self.keep_columns.split(",")] if self.keep_columns else []

    def column_flags(self) -> list[str]:
        """The prompt_response column flags set away from their defaults (the other formats' fields are fixed)."""
        defaults = {"prompt_column": "content", "response_column": "summary", "history_column": None}
        return [f"--{name}" for name, default in defaults.items() if getattr(self, name) != default]


@dataclass
class PtuningArguments:
    pre_seq_len: int | None = field(
        default=None, metadata={"help": "P-Tuning v2: number of trainable prefix key/value positions per layer."}
    )
    prefix_projection: bool = field(
        default=False,
        metadata={"help": "P-Tuning v2: produce the prefixes through a two-layer MLP instead of a plain embedding."},
    )
    prefix_hidden_size: int | None = field(
        default=None, metadata={"help": "P-Tuning v2: width of that MLP. Default: the model's hidden size."}
    )
    prefix_dropout: float = field(
        default=0.1, metadata={"help": "P-Tuning v2: dropout on the prefixes while training (ChatGLM uses 0.1)."}
    )
    ptuning_checkpoint: str | None = field(
        default=None, metadata={"help": "P-Tuning v2: a checkpoint folder to load the prefix encoder from."}
    )


@dataclass
class LoraArguments:
    lora_rank: int | None = field(
        default=None,
        metadata={"help": "LoRA: rank r (default 8). AdaLoRA: the average rank its budget ends with (its target_r)."},
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA: scaling alpha (default 32)."})
    lora_dropout: float | None = field(default=None, metadata={"help": "LoRA: dropout (default 0.1)."})
    lora_target: str | None = field(
        default=None,
        metadata={
            "help": "LoRA: comma-separated module names to adapt, or 'all' (default) for every linear layer "
            "of the decoder except the output head."
        },
    )
    lora_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "LoRA: an adapter folder (PEFT format). Evaluated as it is; with --do_train, training starts "
            "from its weights (a warm start on new data, with a new optimizer and schedule; --resume_from_checkpoint "
            "continues the same run instead). Its adapter_config.json sets the adapter's shape: LoRA flags given "
            "must agree with it (--lora_dropout may differ)."
        },
    )
    lora_variant: str | None = field(
        default=None,
        metadata={
            "help": "LoRA: lora (default) or adalora (AdaLoRA: adapters in SVD form whose ranks are reallocated "
            "while training, from --adalora_init_rank per layer down to an average of --lora_rank; needs --max_steps)."
        },
    )
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "LoRA: DoRA, weight-decomposed LoRA (a trained magnitude per output row of each adapted weight, "
            "LoRA's update for its direction). Slower steps (PEFT's own forward, float32)."
        },
    )
    use_rslora: bool = field(
        default=False,
        metadata={"help": "LoRA: rsLoRA, scaling by alpha / sqrt(r) instead of alpha / r (for high ranks)."},
    )
    init_lora_weights: str | None = field(
        default=None,
        metadata={
            "help": "LoRA: how a new adapter starts. true (default: A random, B zero, so training starts at the "
            "base), gaussian (A gaussian, B zero), pissa (A and B from each weight's principal singular vectors, "
            "the rest stays in the base: full-precision bases), olora (from each weight's QR decomposition: "
            "full-precision bases), loftq (A and B make up for the quantization error of a 4-bit base: "
            "--quantization_bit 4). A PiSSA/OLoRA run's final adapter is saved converted to a plain LoRA of twice "
            "the rank that applies to the original base."
        },
    )
    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata={
            "help": "LoRA+: the B matrices train at this many times --learning_rate (the LoRA+ paper suggests 16; "
            "PEFT's create_loraplus_optimizer). Default: one learning rate for all."
        },
    )
    adalora_init_rank: int | None = field(
        default=None,
        metadata={"help": "AdaLoRA: the rank every adapted layer starts with (default 1.5 x --lora_rank: 12 for 8)."},
    )
    adalora_tinit: int | None = field(
        default=None, metadata={"help": "AdaLoRA: steps trained before ranks are reallocated (default 0)."}
    )
    adalora_tfinal: int | None = field(
        default=None, metadata={"help": "AdaLoRA: last steps trained with the final ranks (default 0)."}
    )
    modules_to_save: str | None = field(
        default=None,
        metadata={
            "help": "LoRA: comma-separated modules trained in full and saved with the adapter (PEFT's "
            "modules_to_save), e.g. embed_tokens,lm_head. Required to cover the embeddings and the output head "
            "when the tokenizer has more tokens than the base's embeddings (added tokens, e.g. an extended Chinese "
            "vocabulary): the base is resized, and the new rows must be trained and saved."
        },
    )


LORA_DEFAULTS = {
    "lora_rank": 8,
    "lora_alpha": 32.0,
    "lora_dropout": 0.1,
    "lora_target": "all",
    "lora_variant": "lora",
    "use_dora": False,
    "use_rslora": False,
    "init_lora_weights": "true",
    "adalora_tinit": 0,
    "adalora_tfinal": 0,
}
LORA_VARIANTS = ("lora", "adalora")  # --lora_variant
LORA_INITS = ("true", "gaussian", "pissa", "olora", "loftq")  # --init_lora_weights


@dataclass
class FinetuneArguments:
    trainable_layers: int | None = field(
        default=None,
        metadata={
            "help": "Full fine-tuning: train only the last N decoder layers, every other weight frozen (embeddings, "
            "the earlier layers, the final norm and the output head): LLaMA-Factory's 'freeze' tuning. "
            "Default: every weight of the base trains."
        },
    )


@dataclass
class GenerationArguments:
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Tokens generated per sample. Default: val_max_target_length."}
    )
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy/beam decoding."})
    top_p: float = field(default=0.7, metadata={"help": "Nucleus sampling threshold (with --do_sample)."})
    temperature: float = field(default=0.95, metadata={"help": "Sampling temperature (with --do_sample)."})
    num_beams: int = field(default=1, metadata={"help": "Beam search width (1 = no beam search)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalty for repeated tokens (1.0 = none)."})
    cache_implementation: str | None = field(
        default=None,
        metadata={
            "help": "The key/value cache of evaluation's generation: static (preallocated, so that transformers "
            "compiles the decoding step: several times faster on a GPU) or dynamic. Default: static on a CUDA GPU "
            "for transformers' own models, unless the decoder layers were compiled for training in the same run; "
            "dynamic elsewhere."
        },
    )

    def to_generate_kwargs(self, default_max_new_tokens: int) -> dict:
        kwargs = {
            "max_new_tokens": self.max_new_tokens or default_max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.cache_implementation == "static":
            kwargs["cache_implementation"] = "static"
        if self.do_sample:
            kwargs.update(top_p=self.top_p, temperature=self.temperature)
        return kwargs


@dataclass
class RunArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow training into an --output_dir that already holds checkpoints of another run."},
    )
    compile_layers: bool | None = field(
        default=None,
        metadata={
            "help": "The fast training path: torch.compile each decoder layer (dynamic shapes), flash attention for "
            "right-padded batches also under LoRA, and LoRA's low-rank branch in the base dtype "
            "(glmtune/speed/fast_lora.py): "
            "1.4-1.9x faster steps on an H100 after about a minute of compilation (nf4 bases on an H200: LoRA "
            "1.46x, P-Tuning v2 1.27x). Default: on when training on a CUDA GPU, 4/8-bit bases included; off on "
            "CPU, under DeepSpeed ZeRO-3, for AdaLoRA and for DoRA on a 4/8-bit base."
        },
    )
    padding_free: bool | None = field(
        default=None,
        metadata={
            "help": "Training batches without padding: a batch's samples back to back in one row, each token attending "
            "only within its own sample (flash attention's variable-length kernel on CUDA). The loss and gradients of "
            "the padded batch, without computing the padding. Default: on when training a bf16/fp16 base on a CUDA GPU "
            "with a model whose attention receives the sample boundaries (transformers' own models, ChatGLM2/3; not "
            "ChatGLM-6B); off on CPU, where the explicit block mask costs more than the padding saves."
        },
    )
    max_memory_gib: float | None = field(
        default=None,
        metadata={
            "help": "GPU memory this training run may use, in GiB (CUDA, one process): glmtune measures a few steps "
            "and picks the micro-batch and how many decoder layers to checkpoint so that the run fits, keeping the "
            "effective batch --per_device_train_batch_size x --gradient_accumulation_steps. Default: what the GPU "
            "has free, less 1 GiB. --gradient_checkpointing given by hand is kept as given."
        },
    )
    fit_memory: bool = field(
        default=True,
        metadata={
            "help": "Choose the micro-batch and gradient checkpointing to fit --max_memory_gib (CUDA training, one "
            "process, no DeepSpeed). --fit_memory False: run --per_device_train_batch_size as given."
        },
    )
    target_token_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute logits and loss only at answer tokens, in chunks, so full-vocabulary float32 logits "
            "never exist (same value as transformers' loss, less memory). "
            "--target_token_loss False: transformers' loss."
        },
    )
