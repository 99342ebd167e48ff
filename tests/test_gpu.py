"""GPU-only: quantized and bf16 trials on CUDA (run with `pytest -m gpu` on a GPU machine)."""
import pytest
import torch

from tests.conftest import tiny_trial
from trainables import tracking
from trainables.trial import run_trial

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["bf16", "nf4", "int8"])
@pytest.mark.parametrize("adapter", ["lora", "grit"])
def test_trial_on_cuda(precision, adapter, runs, tiny_model):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (this test is opt-in with -m gpu)")
    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "gpu")
    metrics = run_trial(tiny_trial(method="dpo", precision=precision, adapter=adapter,
                                   grit={"kfac_update_freq": 1, "kfac_min_samples": 1, "reprojection_freq": 1,
                                         "sample_every": 1}), "gpu", runs, exp)
    assert metrics["sys/peak_gpu_mem_gib"] > 0
    if adapter == "grit":
        assert metrics["grit/steps_preconditioned"] >= 1


def test_planned_micro_batch_keeps_the_effective_batch_and_the_estimate_holds(runs, tiny_model):
    """With plan_micro_batch the trial trains at the planner's micro-batch for its GPU share; the measured peak
    stays under the planner's estimate + headroom."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (this test is opt-in with -m gpu)")
    from trainables import memory
    from trainables.config import TrialConfig

    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "gpu")
    cfg = tiny_trial(method="sft", precision="bf16", micro_batch=1, grad_accum=8)
    metrics = run_trial(cfg, "planned", runs, exp, gpu_share=0.5, plan_micro_batch=True)
    (run,) = client.search_runs([exp])
    tags = run.data.tags
    micro, accum = int(tags["exec_micro_batch"]), int(tags["exec_grad_accum"])
    assert micro * accum == 8 and micro == 8 and "estimated peak" in tags["memory_plan"]
    estimate = memory.trial_peak(TrialConfig(**cfg).model_copy(update={"micro_batch": micro}),
                                 memory.model_shape(tiny_model))
    assert metrics["sys/peak_gpu_mem_gib"] * 2**30 <= memory.required_bytes(estimate)


@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_shared_reference_log_probs_on_cuda(precision, runs, tiny_model, tmp_path, monkeypatch):
    """The shared reference cache's pass under bf16 autocast on a GPU (trainables/reference.py): a DPO trial computes
    it, a CITA trial of the same model, precision and data reads it, and both train and evaluate to finite values."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (this test is opt-in with -m gpu)")
    import math

    from trainables import reference

    monkeypatch.setattr(reference, "cache_root", lambda: tmp_path / "cache")
    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "gpu")
    for method in ("dpo", "cita"):
        metrics = run_trial(tiny_trial(method=method, precision=precision), method, runs, exp, reference_cache=True,
                            cudnn_attention=False)
        assert math.isfinite(metrics["eval/reward_margin"])
    tags = {r.data.tags["config_label"]: r.data.tags for r in client.search_runs([exp])}
    assert (tags["dpo"]["reference_cache"], tags["cita"]["reference_cache"]) == ("miss", "hit")


@pytest.mark.parametrize("precision", ["bf16", "nf4", "int8"])
def test_a_reused_base_model_on_cuda_trains_as_a_fresh_one(precision, runs, tiny_model):
    """trainables/warm_model.py on quantized models: PEFT takes the adapter off bitsandbytes' layers, the weights'
    checksums match (int8: its scales, which the layer moved off the weight), and the next trial on the kept model
    has a fresh load's losses (GPU kernels: to 1e-4)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (this test is opt-in with -m gpu)")
    from tests.test_warm_model import trials_fresh_and_reused
    from trainables import warm_model

    try:
        (losses, results), (losses_reused, results_reused) = trials_fresh_and_reused(
            runs, tiny_trial(method="dpo", precision=precision, seed=3))
    finally:
        warm_model.drop()
    assert losses_reused == pytest.approx(losses, rel=1e-4, abs=1e-6)
    scored = ("eval/pref_accuracy", "eval/reward_margin", "eval/logp_margin")  # generations may part on a near tie
    assert [results_reused[k] for k in scored] == pytest.approx([results[k] for k in scored], rel=1e-3, abs=1e-5)


def test_pinned_small_copies_give_the_same_values_and_leave_callers_buffers_alone(monkeypatch):
    """trainables/pinned_copies.py: small copies staged through a fresh pinned copy (a cast first on the host) arrive
    with the values a plain copy gives; large ones, already pinned sources (the caller may refill them while the
    copy is queued), a positional `copy` and other devices go the plain way."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (this test is opt-in with -m gpu)")
    from trainables.pinned_copies import SMALL_BYTES, pinned_small_copies

    staged = []
    real_pin = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: staged.append(self.shape) or real_pin(self, *a))
    gen = torch.Generator().manual_seed(0)
    small, large = torch.randn(64, 16, generator=gen), torch.randn(SMALL_BYTES // 4 + 1, generator=gen)
    pinned = torch.zeros(1024).pin_memory()
    staged.clear()
    with pinned_small_copies():
        copies = [small.to("cuda"), small.to("cuda", torch.bfloat16), torch.nn.Parameter(small).to("cuda:0"),
                  torch.tensor([1.5, 2.5], device="cuda"), large.to("cuda"), small.to("cuda", copy=True),
                  small.to("cuda", torch.float32, False, True), small.to(torch.float64)]
        torch.cuda._sleep(100_000_000)  # keep the stream busy: a copy queued from `pinned` would read the fill
        from_pinned = pinned.to("cuda")
        pinned.fill_(7.0)
    assert staged == [small.shape] * 3 + [torch.Size([2])]  # the first four were staged, nothing else
    expected = [small, small.to(torch.bfloat16), small, torch.tensor([1.5, 2.5]), large, small, small,
                small.to(torch.float64)]
    assert [c.device.type for c in copies] == ["cuda"] * 7 + ["cpu"]
    for copy, want in zip(copies, expected):
        assert copy.dtype == want.dtype and torch.equal(copy.cpu(), want)
    assert torch.equal(from_pinned.cpu(), torch.zeros(1024))


def test_liger_kernels_train_as_transformers_layers_do(runs, tiny_model, tmp_path, monkeypatch):
    """A profile's liger_kernel (execution only, same trial key): Liger's RMSNorm, SwiGLU and RoPE kernels are in
    use while the trial trains, give SFT the losses of transformers' layers to bf16 rounding, and Liger's patches of
    transformers' module are undone afterwards. DPO's shared reference log-probs are cached apart with them."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (this test is opt-in with -m gpu)")
    pytest.importorskip("liger_kernel", reason="liger-kernel (the gpu extra) is not installed")
    from transformers import TrainerCallback
    from transformers.models.llama import modeling_llama

    from trainables import reference

    plain_rope = modeling_llama.apply_rotary_pos_emb
    rope_in_training = []

    class SeeRope(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            rope_in_training.append(modeling_llama.apply_rotary_pos_emb.__module__)

    monkeypatch.setattr(reference, "cache_root", lambda: tmp_path / "cache")
    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "gpu")
    for liger in (False, True):
        run_trial(tiny_trial(method="sft", precision="bf16", max_steps=4), f"sft liger={liger}", runs, exp,
                  liger_kernel=liger, callbacks=[SeeRope()])
        assert modeling_llama.apply_rotary_pos_emb is plain_rope
        run_trial(tiny_trial(method="dpo", precision="bf16", max_steps=2), f"dpo liger={liger}", runs, exp,
                  liger_kernel=liger, reference_cache=True)
    assert rope_in_training[0].startswith("transformers") and rope_in_training[-1].startswith("liger_kernel")
    by_label = {r.data.tags["config_label"]: r for r in client.search_runs([exp])}
    plain, liger = by_label["sft liger=False"], by_label["sft liger=True"]
    assert liger.data.tags["exec_use_liger_kernel"] == "True" and "exec_use_liger_kernel" not in plain.data.tags
    assert liger.data.tags["trial_key"] == plain.data.tags["trial_key"]
    losses = [[m.value for m in client.get_metric_history(r.info.run_id, "train/loss")] for r in (plain, liger)]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=2e-2)
    assert [by_label[f"dpo liger={x}"].data.tags["reference_cache"] for x in (False, True)] == ["miss", "miss"]
