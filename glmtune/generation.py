"""What generation shares between evaluation (glmtune.trainer) and the tools that serve a model (glmtune.serve)."""

import torch


def blank_stop_tokens(ids: torch.Tensor, eos_token_id, pad_token_id) -> torch.Tensor:
    """Generated ids with every stop token (``generate()``'s eos id or ids) replaced by padding.

    Why: tokenizers do not all drop every stop token when decoding with ``skip_special_tokens`` (ChatGLM3's
    keeps ``<|user|>`` as text, as the original did), and a stop token is never part of the answer.
    """
    stops = torch.tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id], device=ids.device)
    return ids.masked_fill(torch.isin(ids, stops), pad_token_id)
