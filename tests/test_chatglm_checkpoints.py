"""The ancestors' P-Tuning v2 checkpoints (a pytorch_model.bin of ``transformer.prefix_encoder.*``) in glmtune.

A checkpoint folder holding only the golden prefix weights, saved the way ChatGLM's ptuning saved them,
is loaded through glmtune's ordinary path (``load_tuned`` -> ``--ptuning_checkpoint``); its logits must be
the original code's (golden ``forward_infer_ptuning_*_lastpos``). glmtune's own checkpoints of ChatGLM
bases carry the same file with the same keys, so the ancestors' loaders read them.
"""

import logging

import pytest
import torch
from conftest import GOLDEN, chatglm_folder, needs_shared
from safetensors.torch import load_file

pytestmark = needs_shared


def ancestors_checkpoint(version: str, projection: str, out) -> str:
    """What ChatGLM's ptuning trainer wrote: pytorch_model.bin with only the trainable prefix tensors."""
    out.mkdir()
    weights = load_file(GOLDEN / f"chatglm-{version}" / f"prefix_encoder_proj_{projection}.safetensors")
    assert all(key.startswith("transformer.prefix_encoder.") for key in weights)
    torch.save(weights, out / "pytorch_model.bin")
    return str(out)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("projection", ["false", "true"])
def test_ancestors_checkpoint_gives_the_original_logits(version, projection, tmp_path):
    from glmtune.serve.tuned import load_tuned

    tuned = load_tuned(
        chatglm_folder(version, tmp_path / "model"),
        ancestors_checkpoint(version, projection, tmp_path / "ckpt"),
        torch_dtype="float32",
    )
    assert tuned.method == "ptuning"
    config = tuned.model.prefix_encoder.glmtune_config
    assert config["pre_seq_len"] == 4 and config["prefix_projection"] == (projection == "true")

    golden = load_file(GOLDEN / f"chatglm-{version}" / f"forward_infer_ptuning_proj_{projection}_lastpos.safetensors")
    # v1's stored mask is 4-D with the original's convention (True = masked), which its model class accepts
    inputs = {key: golden[key] for key in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        logits = tuned.model(**inputs).logits[:, -1].double()
    cols = golden["logits_last_vocab_cols"]
    torch.testing.assert_close(logits[:, cols].float(), golden["logits_last_at_cols"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits.logsumexp(-1), golden["logits_last_logsumexp"], atol=1e-4, rtol=0)
    assert torch.equal(logits.argmax(-1), golden["logits_last_argmax"])


def test_glmtune_checkpoint_of_a_chatglm_base_carries_the_ancestors_file(tmp_path):
    from glmtune.arguments import ModelArguments, PtuningArguments
    from glmtune.model import load_base_model
    from glmtune.ptuning import add_prefix_encoder
    from glmtune.ptuning import save_checkpoint as save_prefix_checkpoint

    model = load_base_model(
        ModelArguments(model_name_or_path=chatglm_folder("v2", tmp_path / "model"), torch_dtype="float32")
    )
    model = add_prefix_encoder(model, PtuningArguments(pre_seq_len=4, prefix_projection=True))
    save_prefix_checkpoint(model, str(tmp_path / "ckpt"))
    saved = torch.load(tmp_path / "ckpt" / "pytorch_model.bin", weights_only=True)
    golden = load_file(GOLDEN / "chatglm-v2" / "prefix_encoder_proj_true.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in golden.items()}  # names and shapes
    for name, tensor in model.prefix_encoder.state_dict().items():
        assert torch.equal(saved["transformer.prefix_encoder." + name], tensor)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("prefix_hidden_size", [32, 16])  # the golden models' hidden_size is 32
def test_ancestors_file_only_where_the_original_code_loads_it(version, prefix_hidden_size, tmp_path, caplog):
    """The original's projection is hidden_size wide (the golden prefix files' trans.* shapes): a prefix projected
    through another width gets no pytorch_model.bin (it would fail there on trans.*), and the log says why."""
    from glmtune.arguments import ModelArguments, PtuningArguments
    from glmtune.model import load_base_model
    from glmtune.ptuning import add_prefix_encoder
    from glmtune.ptuning import save_checkpoint as save_prefix_checkpoint

    folder = chatglm_folder(version, tmp_path / "model")
    args = PtuningArguments(pre_seq_len=4, prefix_projection=True, prefix_hidden_size=prefix_hidden_size)
    model = add_prefix_encoder(load_base_model(ModelArguments(folder, torch_dtype="float32")), args)
    caplog.set_level(logging.INFO, logger="glmtune.ptuning")
    save_prefix_checkpoint(model, str(tmp_path / "ckpt"))
    golden = load_file(GOLDEN / f"chatglm-{version}" / "prefix_encoder_proj_true.safetensors")
    ours = {"transformer.prefix_encoder." + k: v.shape for k, v in model.prefix_encoder.state_dict().items()}
    loadable = ours == {k: v.shape for k, v in golden.items()}
    assert loadable == (prefix_hidden_size == 32)
    assert (tmp_path / "ckpt" / "pytorch_model.bin").exists() == loadable
    said = [r.getMessage() for r in caplog.records if "pytorch_model.bin" in r.getMessage()]
    if loadable:
        assert said == []
    else:
        assert len(said) == 1 and said[0].startswith(f"No pytorch_model.bin in {tmp_path / 'ckpt'}: ")
        assert "--prefix_hidden_size 16" in said[0] and "hidden_size 32" in said[0]
    reloaded = add_prefix_encoder(
        load_base_model(ModelArguments(folder, torch_dtype="float32")),
        PtuningArguments(ptuning_checkpoint=str(tmp_path / "ckpt")),
    )
    for name, tensor in model.prefix_encoder.state_dict().items():  # glmtune's own files load it either way
        assert torch.equal(reloaded.prefix_encoder.state_dict()[name], tensor)


def test_ancestors_checkpoint_from_another_base_is_refused(tmp_path):
    from glmtune.errors import GlmtuneError
    from glmtune.serve.tuned import load_tuned

    checkpoint = ancestors_checkpoint("v1", "false", tmp_path / "ckpt")  # v1 width 128 into a v2 base (64)
    with pytest.raises(GlmtuneError, match="different base model"):
        load_tuned(chatglm_folder("v2", tmp_path / "model"), checkpoint, torch_dtype="float32")
