"""Comparing with the ChatGLM goldens of ../shared/golden (shared by the v1 and v2/v3 parity tests)."""

import torch
from safetensors.torch import load_file

from glmtune.arguments import PtuningArguments
from glmtune.ptuning import PrefixEncoder, prefix_config


def golden_prefix_encoder(config, folder, projection: bool) -> PrefixEncoder:
    """The golden prefix (pre_seq_len 4, dropout off) in a PrefixEncoder shaped as glmtune shapes it for
    ``config`` (v1 projects hidden -> hidden -> kv, v2/v3 kv -> hidden -> kv)."""
    shape = prefix_config(config, PtuningArguments(pre_seq_len=4, prefix_projection=projection))
    encoder = PrefixEncoder(
        4,
        shape["num_layers"],
        shape["kv_heads"],
        shape["head_dim"],
        projection=projection,
        embedding_dim=shape["embedding_dim"],
        hidden_size=shape["prefix_hidden_size"],
        dropout=0.0,
    )
    stored = load_file(folder / f"prefix_encoder_proj_{str(projection).lower()}.safetensors")
    encoder.load_state_dict({k.removeprefix("transformer.prefix_encoder."): v for k, v in stored.items()}, strict=True)
    return encoder


def parity_errors(logits, golden, name="logits", real=None) -> dict:
    """Largest errors against the slimmed golden logits; ``real`` (bool, logits' leading shape) selects positions."""
    at_cols = logits[..., golden[f"{name}_vocab_cols"]]
    logsumexp = logits.double().logsumexp(-1)
    argmax = logits.argmax(-1)
    if real is None:
        real = torch.ones(argmax.shape, dtype=torch.bool)
    torch.testing.assert_close(at_cols[real], golden[f"{name}_at_cols"][real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logsumexp[real], golden[f"{name}_logsumexp"][real], atol=1e-4, rtol=0)
    assert torch.equal(argmax[real], golden[f"{name}_argmax"][real])
    return {
        "at_cols": (at_cols - golden[f"{name}_at_cols"])[real].abs().max().item(),
        "logsumexp": (logsumexp - golden[f"{name}_logsumexp"])[real].abs().max().item(),
    }
