"""CITA: contrastive instruction-tuned alignment, re-implemented on TRL 1.x's DPOTrainer.

Pairs are DPO pairs whose prompt carries the alignment instruction in the system turn. The research's loss
(STUDY.md), with policy and reference sequence log-probs over completion tokens:

    L = -log softmax([beta*l+, beta*l-])_0  +  lambda_kl * 1/2 * (mean(l+ - l+_ref) + mean(l- - l-_ref))

The contrastive term has no reference (unlike DPO); the second is the research's sequence-level KL proxy
(`cita_anchor: seq_kl`; `none` drops it). TRL 1.x folded the loss into one `_compute_loss`; we override that
method and reuse TRL's batching, reference pass (`compute_ref_log_probs`, minus its checkpointing toggle: see
trainables/dpo.py) and logging. The reference is the base
model: TRL adds the adapter from `peft_config` and runs the reference pass with it disabled (trainables/lora.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from trainables import dpo
from trainables.config import TrialConfig

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def cita_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float, lambda_kl: float, anchor: str = "seq_kl"):
    """Per-batch CITA loss and its parts; inputs are per-pair sequence log-probs, shape (batch,)."""
    # -log softmax([b*c, b*r])[0] == softplus(b*(r - c)), computed stably
    contrastive = F.softplus(beta * (rejected - chosen)).mean()
    if anchor == "seq_kl":
        kl = 0.5 * ((chosen - ref_chosen).mean() + (rejected - ref_rejected).mean())
    elif anchor == "none":
        kl = torch.zeros((), device=chosen.device, dtype=chosen.dtype)
    else:
        raise ValueError(f"cita_anchor = {anchor!r}; allowed values: seq_kl, none")
    loss = contrastive + lambda_kl * kl
    return loss, {"contrastive": contrastive.detach(), "anchor": kl.detach(),
                  "margin": (chosen - rejected).detach().mean()}


@functools.cache
def _trainer_class():
    class CITATrainer(dpo.trainer_class()):
        def __init__(self, *args, lambda_kl: float, anchor: str, **kwargs):
            super().__init__(*args, **kwargs)
            self.lambda_kl, self.anchor = lambda_kl, anchor

        def _compute_loss(self, model, inputs, return_outputs):
            mode = "train" if self.model.training else "eval"
            model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            model_kwargs["use_cache"] = False
            completion_mask = inputs["completion_mask"]
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
            seq_len = completion_mask.size(1) - 1
            # TRL's fused head returns per-token log-probs of the labels, 0 where labels are masked
            chosen, rejected = outputs.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_chosen, ref_rejected = self.compute_ref_log_probs(model, inputs)
            loss, parts = cita_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.lambda_kl,
                                    self.anchor)
            values = {**{f"cita/{name}": value for name, value in parts.items()},
                      "cita/accuracy": (chosen > rejected).float().mean(),
                      "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean(),
                      "logps/ref_chosen": ref_chosen.mean(), "logps/ref_rejected": ref_rejected.mean()}
            # one gather and one host sync for all of them (a .item() each would stall the GPU nine times)
            means = self.accelerator.gather_for_metrics(torch.stack(list(values.values()))[None]).mean(0).tolist()
            for name, value in zip(values, means):
                self._metrics[mode][name].append(value)
            return (loss, outputs) if return_outputs else loss

    return CITATrainer


def build_trainer(cfg: TrialConfig, model, tokenizer, train_ds, output_dir: str, callbacks=()):
    return dpo.build_pair_trainer(_trainer_class(), cfg, model, tokenizer, train_ds, output_dir, callbacks,
                                  lambda_kl=cfg.lambda_kl, anchor=cfg.cita_anchor)
