"""Training loss computed only where it counts: at answer tokens, in chunks.

transformers computes logits for every position (prompt and padding included) and upcasts all of them
to float32 before the cross-entropy: for a 65k vocabulary at 8 x 512 tokens that is 1 GiB of float32
logits plus its gradient. Prompt positions carry label -100 and never count, so here the model is run
with ``logits_to_keep=1``, the decoder's last hidden state is taken from a forward hook, and the output
head is applied only to positions whose next token is a target, a chunk at a time under activation
checkpointing (a chunk's logits are recomputed in backward instead of being kept). The value equals
transformers' loss (sum over targets / number of targets, or / ``num_items_in_batch``).
"""

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glmtune.arguments import IGNORE_INDEX

CHUNK_TOKENS = 2048  # 2048 x 65k float32 logits = 0.5 GiB transient


class TargetTokenLoss:
    def __init__(self, causal_lm):
        self.decoder = causal_lm.get_decoder()
        self.head = causal_lm.get_output_embeddings()
        self.hidden = None

    @staticmethod
    def supports(causal_lm) -> bool:
        """Only where it is exact: a plain linear head, no logit soft-capping or scaling, logits_to_keep accepted."""
        config = causal_lm.config
        return (
            type(causal_lm.get_output_embeddings()) is nn.Linear
            and "logits_to_keep" in inspect.signature(causal_lm.forward).parameters
            and not getattr(config, "final_logit_softcapping", None)
            and getattr(config, "logit_scale", None) in (None, 1, 1.0)
        )

    @contextlib.contextmanager
    def capture(self):
        def keep(module, args, output):
            self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

        handle = self.decoder.register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    def __call__(self, labels: torch.Tensor, num_items_in_batch=None, target_index=None) -> torch.Tensor:
        """``target_index``: the flat positions whose next token is a target, if the collator computed them
        (``glmtune.data.target_index``); finding them here from ``labels`` costs two host syncs."""
        hidden, self.hidden = self.hidden, None
        if target_index is None:
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX
            selected, targets = hidden[:, :-1][keep], targets[keep]
        else:
            selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index)
            targets = labels.reshape(-1).index_select(0, target_index + 1)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), CHUNK_TOKENS):
            chunk = slice(start, start + CHUNK_TOKENS)
            total = total + checkpoint(
                _chunk_loss, selected[chunk], self.head.weight, self.head.bias, targets[chunk], use_reentrant=False
            )
        count = num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1)
        return total / count


def _chunk_loss(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")
