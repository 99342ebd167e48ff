"""Padding batches to a multiple of 64 (the local GPU profile's trainer.pad_to_multiple_of, sweeps/profiles.py)
changes the shapes only: the same batch's loss, padded or not."""
import math

import pytest
import torch

from tests.conftest import tiny_trial


def _first_batch_loss(method, workdir, pad):
    from trainables.config import TrialConfig
    from trainables.trial import prepare

    trainer_knobs = {"pad_to_multiple_of": pad} if pad else {}
    cfg = TrialConfig(**tiny_trial(method=method, micro_batch=4, max_length=512, trainer=trainer_knobs))
    trainer, _, _ = prepare(cfg, str(workdir))
    torch.manual_seed(0)  # a trained-looking adapter, the same in both: at init, DPO's loss is log 2 for any batch
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    trainer.model.eval()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    return loss.item(), inputs["input_ids"].shape[-1]


@pytest.mark.parametrize("method", ["sft", "dpo", "cita"])
def test_padding_to_a_multiple_leaves_the_loss(tiny_model, method, tmp_path):
    loss, length = _first_batch_loss(method, tmp_path / "plain", None)
    padded_loss, padded_length = _first_batch_loss(method, tmp_path / "padded", 64)
    assert padded_length % 64 == 0 and padded_length > length  # padding happened
    assert padded_loss == pytest.approx(loss, abs=1e-5)
    assert abs(loss - math.log(2)) > 1e-3  # the adapter moved the policy away from the reference
