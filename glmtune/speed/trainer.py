"""Per-step speed for glmtune's Trainer: the target-token loss, no host-device syncs, less host work.

Each change computes exactly what Trainer computes (tests/test_loss.py compares curves and gradients):

* the loss: logits only at answer tokens (:mod:`glmtune.speed.loss`), normalised as transformers does, per
  target token of the whole effective batch (``num_items_in_batch``);
* Trainer's ``--logging_nan_inf_filter`` runs ``bool(torch.isnan(loss))`` after every backward: a host sync
  that idled the GPU for the host's whole optimizer-step and next-batch work (~10 ms a step on an H100);
  the same filter is applied on the device here;
* on a GPU the host must queue each step faster than the GPU runs it (LoRA's steps on an H100 were
  host-bound). Trainer walks every submodule or parameter several times a step; with LoRA on every linear
  layer of a 28-layer model that is ~2,000 modules and ~650 parameters per walk (5.5 ms for ``model.train()``,
  9 ms for the parameter count, 4 ms to list the trained parameters, on this project's 2-core CI machine).

Private Trainer state and methods used here, each for the reason on its line; tests/test_trainer_hooks.py
fails if transformers changes them.
"""

import contextlib

import torch
from transformers.integrations import is_deepspeed_zero3_enabled

from glmtune.model import base_causal_lm
from glmtune.speed.loss import TargetTokenLoss
from glmtune.trainer import GlmtuneTrainer


class FastStepTrainer(GlmtuneTrainer):
    def __init__(self, *args, target_token_loss: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        causal_lm = base_causal_lm(self.model)
        # ZeRO-3 gathers a weight only inside its module's forward; the target-token loss reads the output
        # head's weight after the model's forward, so under ZeRO-3 transformers' own loss is used.
        use_target_loss = target_token_loss and TargetTokenLoss.supports(causal_lm) and not is_deepspeed_zero3_enabled()
        self.target_loss = TargetTokenLoss(causal_lm) if use_target_loss else None
        self.filter_nan_inf_losses, self.args.logging_nan_inf_filter = self.args.logging_nan_inf_filter, False
        self._non_embedding_parameters = None
        self._trained_parameters = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        with _train_mode_kept(model):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.filter_nan_inf_losses:  # a nan/inf step counts as the average of the steps logged so far (as Trainer)
            # Trainer's own running sum and last logged step (private): what its filter reads.
            steps_since_log = 1 + self.state.global_step - self._globalstep_last_logged
            loss = torch.where(torch.isfinite(loss), loss, self._tr_loss / steps_since_log)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training steps use the target-token loss; evaluation keeps transformers' own."""
        inputs = dict(inputs)
        target_index = inputs.pop("target_index", None)  # from the training collators (glmtune.data.target_index)
        if return_outputs or self.target_loss is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        with self.target_loss.capture():
            model(
                **inputs, logits_to_keep=1, use_cache=False
            )  # logits for one position only: the head runs in the loss
        loss = self.target_loss(labels, num_items_in_batch, target_index)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # num_items_in_batch counts every process's targets
        return loss

    def floating_point_ops(self, inputs) -> int:
        """Trainer's count (6 x tokens x non-embedding parameters), with the parameters counted once, not every step."""
        if self._non_embedding_parameters is None:
            self._non_embedding_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self._non_embedding_parameters

    def _clip_grad_norm(self, model):
        # Clip over the trained parameters only (the frozen base has no gradients: the same norm), listed once.
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._clip_grad_norm(model)
        if self._trained_parameters is None:
            self._trained_parameters = [p for p in model.parameters() if p.requires_grad]
        return self.accelerator.clip_grad_norm_(self._trained_parameters, self.args.max_grad_norm)


@contextlib.contextmanager
def _train_mode_kept(model):
    """Trainer.training_step calls ``model.train()`` every step, a walk that sets ``training`` on every
    submodule through ``nn.Module.__setattr__`` (slow Python). When every submodule is in training mode
    already, reading the flags is enough. All of them, not the top one: a PEFT wrapper is created in
    training mode around a base that from_pretrained left in eval mode."""
    if not all(module.training for module in model.modules()):
        yield
        return
    model.train = lambda mode=True: model if mode else type(model).train(model, mode)
    try:
        yield
    finally:
        del model.train
