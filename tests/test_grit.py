"""GRIT adapter: the math against dense references, its invariants, and its wiring into real TRL trainers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainables import grit, models
from trainables.config import GritConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NO_REG = dict(lambda_kfac=0.0, lambda_reproj=0.0)


# ---- a small layer, computed densely -------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 10)
        self.down = nn.Linear(10, 5)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def toy_model(seed=0, r=4, alpha=8):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    # Random B (init_lora_weights=False) so output gradients reach the rank space from the first step;
    # alpha != r so the LoRA scaling is exercised.
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["up", "down"], init_lora_weights=False)
    return get_peft_model(Toy(), cfg)


def run_toy(model, controller, batches=3, seed=1):
    """Forward/backward a few batches; return per LoRA layer the inputs and output-gradients seen."""
    torch.manual_seed(seed)
    seen = {m.name: ([], []) for m in controller.modules}

    def capture(name):
        def hook(mod, args, out):
            seen[name][0].append(args[0].detach().reshape(-1, args[0].shape[-1]))
            out.register_hook(lambda g: seen[name][1].append(g.reshape(-1, g.shape[-1])))
        return hook

    handles = [model.get_submodule(m.name).register_forward_hook(capture(m.name)) for m in controller.modules]
    model.train()
    for _ in range(batches):
        x = torch.randn(3, 7, 6)
        (model(x) * torch.randn(3, 7, 5)).sum().backward()
    for h in handles:
        h.remove()
    return {k: (torch.cat(xs).double(), torch.cat(gs).double()) for k, (xs, gs) in seen.items()}


def dense_covs(m, x, g):
    A, B = m.A.detach().double(), m.B.detach().double()
    ha, gb = x @ A.T, g @ B  # research: activations through Aᵀ, layer-output gradients through B
    return ha.T @ ha / len(x), gb.T @ gb / len(g)


def test_statistics_and_preconditioned_gradient_equal_dense_computation():
    cfg = GritConfig(sample_every=1, kfac_min_samples=1, damping=1e-2, **NO_REG)
    model = toy_model()
    ctrl = grit.GritController(model, cfg)
    seen = run_toy(model, ctrl)
    raw = [(m.A.grad.double().clone(), m.B.grad.double().clone()) for m in ctrl.modules]
    ctrl.refresh()
    ctrl.precondition()
    assert ctrl.steps_preconditioned == 1 and len(ctrl.ready) == 2
    eye = torch.eye(4, dtype=torch.float64)
    for i, m in enumerate(ctrl.modules):
        a_cov, g_cov = dense_covs(m, *seen[m.name])
        assert torch.allclose(ctrl.a_cov[i].double(), a_cov, rtol=1e-5, atol=1e-7)
        assert torch.allclose(ctrl.g_cov[i].double(), g_cov, rtol=1e-5, atol=1e-9)
        ga, gb = raw[i]
        want_a = torch.linalg.inv(a_cov + 1e-2 * eye) @ ga   # ∇A ← A_cov⁻¹ ∇A
        want_b = gb @ torch.linalg.inv(g_cov + 1e-2 * eye)   # ∇B ← ∇B G_cov⁻¹
        assert torch.allclose(m.A.grad.double(), want_a, rtol=1e-4, atol=1e-6)
        assert torch.allclose(m.B.grad.double(), want_b, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(want_a, ga, rtol=1e-2)      # the preconditioner is not ~identity here


def test_regularizer_gradients_equal_autograd_of_the_research_loss_terms():
    lk, lr = 0.3, 0.7
    cfg = GritConfig(sample_every=1, kfac_min_samples=1, energy_threshold=0.6, min_rank=1,
                     precondition=True, reproject=True, lambda_kfac=lk, lambda_reproj=lr)
    model = toy_model()
    ctrl = grit.GritController(model, cfg)
    run_toy(model, ctrl)
    ctrl._update_projections()
    assert any(not torch.allclose(p, torch.eye(4)) for p in ctrl.proj_a)  # a real subspace, k < r
    want = []
    for i, m in enumerate(ctrl.modules):
        A, B = m.A.detach().clone().requires_grad_(), m.B.detach().clone().requires_grad_()
        eye = torch.eye(4)
        # The research's terms: λ_kfac·(Σ (A_cov A)∘A + Σ (B G_cov)∘B) + λ_reproj·(‖(I−P_a)A‖² + ‖B(I−P_b)‖²)
        loss = lk * (((ctrl.a_cov[i] @ A) * A).sum() + ((B @ ctrl.g_cov[i]) * B).sum())
        loss = loss + lr * (((eye - ctrl.proj_a[i]) @ A).pow(2).sum() + (B @ (eye - ctrl.proj_b[i])).pow(2).sum())
        loss.backward()
        want.append((m.A.grad + A.grad, m.B.grad + B.grad))
    ctrl._add_regularizers()
    for (wa, wb), m in zip(want, ctrl.modules):
        assert torch.allclose(m.A.grad, wa, atol=1e-5) and torch.allclose(m.B.grad, wb, atol=1e-5)


def test_damping_escalates_until_cholesky_succeeds():
    r = 4
    bad = torch.diag(torch.tensor([-5e-3, 1.0, 2.0, 3.0]))   # fails at δ=1e-3 and 3e-3, factorizes at 1e-2
    good = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    nan = torch.full((r, r), float("nan"))
    inv, scale = grit.damped_inverse(torch.stack([good, bad, nan]), 1e-3)
    assert torch.allclose(inv[0], torch.linalg.inv(good + 1e-3 * torch.eye(r)))
    assert torch.allclose(inv[1], torch.linalg.inv(bad + 1e-2 * torch.eye(r)))
    assert torch.equal(inv[2], torch.eye(r)) and scale[0] == 1 and scale[1] == 10 and scale[2].isnan()


def test_rank_selection_on_constructed_spectrum():
    ev = torch.tensor([[50.0, 30.0, 12.0, 5.0, 1.5, 1.0, 0.4, 0.1],   # cumulative .50 .80 .92 .97 .985 .995 ...
                       [100.0, 0, 0, 0, 0, 0, 0, 0],                # all energy in one direction
                       [0.0] * 8])                                  # no statistics yet
    pick = lambda **kw: grit.select_rank(ev, GritConfig(**kw)).tolist()
    assert pick(energy_threshold=0.95, min_rank=1) == [4, 1, 8]
    assert pick(energy_threshold=0.90, min_rank=1) == [3, 1, 8]
    assert pick(energy_threshold=0.95, min_rank=4) == [4, 4, 8]
    assert pick(energy_threshold=0.99, min_rank=2) == [6, 2, 8]     # .995 is the first >= .99
    assert pick(energy_threshold=1.0, min_rank=1)[0] == 8
    assert pick(dynamic_rank=False, reprojection_k=3) == [3, 3, 3]


# ---- reprojection --------------------------------------------------------------------------------
def test_reprojection_invariants_and_optimizer_state():
    cfg = GritConfig(sample_every=1, kfac_min_samples=1, energy_threshold=0.8, min_rank=1, two_sided=False)
    model = toy_model()
    ctrl = grit.GritController(model, cfg)
    seen = run_toy(model, ctrl)
    params = [p for m in ctrl.modules for p in (m.A, m.B)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    opt.step()                                        # creates exp_avg / exp_avg_sq
    ctrl.bind_optimizer(opt)
    before = [(m.A.detach().clone(), m.B.detach().clone()) for m in ctrl.modules]
    m1_before = [opt.state[m.A]["exp_avg"].clone() for m in ctrl.modules]
    v_before = [opt.state[m.A]["exp_avg_sq"].clone() for m in ctrl.modules]
    eig, _, ranks = ctrl.spectrum()
    ctrl.reproject()
    s2 = [float(model.get_submodule(m.name).scaling["default"]) ** 2 for m in ctrl.modules]
    for i, m in enumerate(ctrl.modules):
        P, k = ctrl.proj_a[i], int(ranks[i])
        A0, B0 = before[i]
        assert k < 4
        assert torch.allclose(P @ P, P, atol=1e-5) and torch.allclose(P, P.T, atol=1e-6)   # orthogonal projector
        assert torch.allclose(m.A, P @ A0, atol=1e-6) and torch.allclose(m.B, B0 @ P, atol=1e-6)
        assert torch.linalg.matrix_rank(m.B @ m.A, atol=1e-5) <= k
        # One-sided bound on the adapter's output change over the activations the statistics saw.
        x = seen[m.name][0].float()
        change = s2[i] * ((x @ (B0 @ A0 - m.B.detach() @ m.A.detach()).T) ** 2).sum(1).mean()
        dropped = eig[i, k:].sum()
        assert change <= s2[i] * torch.linalg.matrix_norm(B0, 2) ** 2 * dropped * (1 + 1e-4)
        assert dropped <= (1 - cfg.energy_threshold) * eig[i].sum() + 1e-6
        # Adam: the first moment is projected like its parameter, the second left as it was.
        assert torch.allclose(opt.state[m.A]["exp_avg"], P @ m1_before[i], atol=1e-7)
        assert torch.equal(opt.state[m.A]["exp_avg_sq"], v_before[i])
    after = [(m.A.detach().clone(), m.B.detach().clone()) for m in ctrl.modules]
    ctrl.reproject()                                  # idempotent: same statistics, same subspace
    for (a, b), m in zip(after, ctrl.modules):
        assert torch.allclose(m.A, a, atol=1e-6) and torch.allclose(m.B, b, atol=1e-6)
    # A state layout we cannot transform (an 8-bit optimizer's) is reset, not left inconsistent.
    opt.state[ctrl.modules[0].A] = {"state1": torch.zeros(ctrl.modules[0].A.shape, dtype=torch.uint8)}
    ctrl.reproject()
    assert ctrl.modules[0].A not in opt.state


def test_reprojection_with_full_rank_is_exact_and_two_sided_bounds_rank():
    model = toy_model()
    ctrl = grit.GritController(model, GritConfig(sample_every=1, kfac_min_samples=1, energy_threshold=1.0))
    run_toy(model, ctrl)
    before = [(m.A.detach().clone(), m.B.detach().clone()) for m in ctrl.modules]
    ctrl.reproject()
    assert ctrl.reprojections == 1
    for (a, b), m in zip(before, ctrl.modules):
        assert torch.equal(m.A, a) and torch.equal(m.B, b)     # k = r: untouched, bit for bit

    model = toy_model()
    ctrl = grit.GritController(model, GritConfig(sample_every=1, kfac_min_samples=1, dynamic_rank=False,
                                                 reprojection_k=2, two_sided=True))
    run_toy(model, ctrl)
    ctrl.reproject()
    for i, m in enumerate(ctrl.modules):
        assert not torch.allclose(ctrl.proj_a[i], ctrl.proj_b[i], atol=1e-3)   # B used G's eigenbasis
        assert torch.linalg.matrix_rank(m.B @ m.A, atol=1e-5) <= 2


# ---- hooks: which passes feed the statistics -----------------------------------------------------
def tiny_peft(seed=0, r=8):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(models.resolve(models.TINY))
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights=False))


@pytest.mark.parametrize("checkpointing", [None, False, True])  # off, non-reentrant, reentrant
def test_gradient_checkpointing_neither_duplicates_nor_loses_samples(checkpointing):
    ref = tiny_peft()
    ctrl_ref = grit.GritController(ref, GritConfig(sample_every=2))
    model = tiny_peft()
    ctrl = grit.GritController(model, GritConfig(sample_every=2))
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.enable_input_require_grads()
    ids = torch.randint(0, 1000, (4, 2, 12))
    for m in (ref, model):
        m.train()
        for batch in ids:
            m(input_ids=batch, labels=batch).loss.backward()
    assert ctrl.ticks == ctrl_ref.ticks == 4   # training forwards: recomputation is not one
    assert ctrl.n_a == ctrl_ref.n_a == [2 * 2 * 12] * len(ctrl.modules)   # ticks 2 and 4 sampled
    assert torch.allclose(ctrl.a_cov, ctrl_ref.a_cov, rtol=1e-5, atol=1e-7)
    assert torch.allclose(ctrl.g_cov, ctrl_ref.g_cov, rtol=1e-4, atol=1e-12)
    assert ctrl.g_cov.abs().sum() > 0


def test_module_hooks_are_armed_only_for_sampled_forwards():
    """The per-step cost of sampling is one model pre-hook: the 2 x (adapter calls) Python hooks run only on
    every sample_every-th training forward (reference, eval and no_grad forwards neither count nor disarm)."""
    model = tiny_peft()
    ctrl = grit.GritController(model, GritConfig(sample_every=3))
    ids = torch.randint(0, 1000, (2, 12))
    armed = []
    model.train()
    for k in range(7):
        model(input_ids=ids, labels=ids).loss.backward()
        armed.append(all(len(m.lora_a._forward_hooks) == 1 for m in ctrl.modules))
        assert armed[-1] or all(not m.lora_a._forward_hooks for m in ctrl.modules)
        with torch.no_grad():
            model(input_ids=ids)                     # a reference-style pass changes nothing
    assert armed == [False, False, True, False, False, True, False]
    assert ctrl.n_a == [2 * 2 * 12] * len(ctrl.modules)   # forwards 3 and 6, 24 tokens each
    ctrl.remove()
    assert all(not m.lora_a._forward_hooks for m in ctrl.modules) and not model._forward_pre_hooks


def test_attach_refuses_data_parallel_with_a_clear_error():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="n_gpu=2"):
        grit.attach(SimpleNamespace(args=SimpleNamespace(n_gpu=2), model=tiny_peft()), GritConfig())


def snapshot(ctrl):
    return ctrl.a_cov.clone(), ctrl.g_cov.clone(), list(ctrl.n_a), list(ctrl.n_g), ctrl.ticks


def assert_untouched(ctrl, snap):
    a, g, na, ng, ticks = snap
    assert torch.equal(ctrl.a_cov, a) and torch.equal(ctrl.g_cov, g)
    assert (ctrl.n_a, ctrl.n_g, ctrl.ticks) == (na, ng, ticks)


# ---- real TRL trainers on the tiny model --------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer(models.TINY)


def sft_data(n=12):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
                               "completion": [{"role": "assistant", "content": f"It is {2 * i}."}]}
                              for i in range(n)])


def pref_data(n=8):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "system", "content": "Refuse harm."},
                                          {"role": "user", "content": f"Request {i}?"}],
                               "chosen": [{"role": "assistant", "content": f"I cannot help with {i}."}],
                               "rejected": [{"role": "assistant", "content": f"Sure, step {i} is easy."}]}
                              for i in range(n)])


COMMON = dict(report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, learning_rate=1e-3,
              seed=0, data_seed=0, disable_tqdm=True, per_device_train_batch_size=2, gradient_checkpointing=True)


def train_sft(tok, grit_cfg=None, steps=3, **kw):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(models.resolve(models.TINY), **kw)
    args = SFTConfig(output_dir="/tmp/grit-test", max_length=48, max_steps=steps, gradient_accumulation_steps=2,
                     **COMMON)
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=tok,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    ctrl = grit.attach(trainer, grit_cfg) if grit_cfg is not None else None
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return [h["loss"] for h in logs], [h["grad_norm"] for h in logs], ctrl


ACTIVE = dict(sample_every=1, kfac_min_samples=1, kfac_update_freq=1, reprojection_freq=2, damping=1e-4)


def test_sft_grit_off_equals_lora_exactly_and_on_differs(tok):
    lora_loss, lora_norm, _ = train_sft(tok)
    off_loss, off_norm, off = train_sft(tok, GritConfig(precondition=False, reproject=False, sample_every=1))
    assert off.metrics()["grit/min_samples"] > 0          # hooks were live, yet the run is LoRA's, bit for bit
    assert off_loss == lora_loss and off_norm == lora_norm
    assert off.steps_preconditioned == 0 and off.steps == 3

    on_loss, on_norm, on = train_sft(tok, GritConfig(**ACTIVE))
    m = on.metrics()
    assert on_loss[0] == lora_loss[0]                       # same start; preconditioning begins after step 1
    assert abs(on_loss[2] - lora_loss[2]) > 1e-4
    assert m["grit/steps_preconditioned"] == 2 and m["grit/factor_refreshes"] == 3 and m["grit/reprojections"] == 1
    assert m["grit/modules_ready"] == m["grit/modules"] == 14
    assert 1 <= m["grit/min_effective_rank"] <= m["grit/mean_effective_rank"] <= 8 and m["grit/top_eigenvalue"] > 0
    assert {"grit/rank/q_proj", "grit/top_eig/down_proj", "grit/natgrad_norm"} <= m.keys()
    # Preconditioning ran before clipping: the norm HF clipped (and logged) is the natural gradient's.
    assert on_norm[-1] == pytest.approx(m["grit/natgrad_norm"], rel=1e-4)
    assert m["grit/natgrad_norm"] != pytest.approx(m["grit/grad_norm"], rel=1e-2)


def test_factors_refresh_every_k_steps_and_preconditioning_starts_after_the_first(tok):
    """kfac_update_freq=3 over 7 steps: refreshes after steps 3 and 6, so steps 4-7 are preconditioned and the
    losses of steps 1-4 (three plain updates) are LoRA's, bit for bit; reprojection after step 4 only."""
    cfg = GritConfig(sample_every=1, kfac_min_samples=1, kfac_update_freq=3, reprojection_freq=4, damping=1e-4,
                     **NO_REG)
    lora_loss, _, _ = train_sft(tok, steps=7)
    loss, _, ctrl = train_sft(tok, cfg, steps=7)
    assert (ctrl.steps, ctrl.factor_refreshes, ctrl.steps_preconditioned, ctrl.reprojections) == (7, 2, 4, 1)
    assert loss[:4] == lora_loss[:4] and loss[4] != lora_loss[4]


@pytest.mark.parametrize("bits", ["nf4", "int8"])
def test_grit_acts_over_quantized_base_weights(tok, bits):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
         if bits == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    loss, _, ctrl = train_sft(tok, GritConfig(**ACTIVE), steps=2, quantization_config=q, device_map="cpu")
    quantized = bnb.nn.Linear4bit if bits == "nf4" else bnb.nn.Linear8bitLt
    # every adapter GRIT drives sits on a quantized base Linear
    assert sum(isinstance(m, quantized) for m in ctrl._model.modules()) == len(ctrl.modules) > 0
    m = ctrl.metrics()
    assert m["grit/steps_preconditioned"] == 1 and m["grit/reprojections"] == 1
    assert all(torch.isfinite(torch.tensor(loss))) and m["grit/natgrad_norm"] > 0


def pref_trainer(tok, method, steps):
    """A DPO or CITA trainer on the tiny model with a fresh LoRA adapter (reference = adapter disabled)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from trainables import cita

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(models.resolve(models.TINY))
    args = DPOConfig(output_dir="/tmp/grit-test", max_length=48, max_steps=steps, **COMMON)
    trainer_class, extra = (DPOTrainer, {}) if method == "dpo" else \
        (cita._trainer_class(), {"lambda_kl": 0.1, "anchor": "seq_kl"})
    return trainer_class(model=model, args=args, train_dataset=pref_data(), processing_class=tok,
                         peft_config=LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"),
                         **extra)


def train_pref(tok, method, grit_cfg=None, steps=3):
    trainer = pref_trainer(tok, method, steps)
    ctrl = grit.attach(trainer, grit_cfg) if grit_cfg is not None else None
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], ctrl


@pytest.mark.parametrize("method", ["dpo", "cita"])
def test_preference_methods_grit_off_equals_lora_exactly_and_on_preconditions(tok, method):
    """DPO and CITA (reference pass with the adapter disabled each step): GRIT with both features off trains as
    LoRA bit for bit; active, it preconditions every step after the first refresh and changes the trajectory."""
    lora_loss, _ = train_pref(tok, method)
    off_loss, _ = train_pref(tok, method, GritConfig(precondition=False, reproject=False, sample_every=1))
    assert off_loss == lora_loss
    on_loss, on = train_pref(tok, method, GritConfig(**ACTIVE, **NO_REG))
    m = on.metrics()
    assert m["grit/steps_preconditioned"] == 2 and m["grit/factor_refreshes"] == 3 and m["grit/natgrad_norm"] > 0
    assert on_loss[0] == lora_loss[0] and abs(on_loss[2] - lora_loss[2]) > 1e-6
    assert all(torch.isfinite(torch.tensor(on_loss)))


@pytest.mark.parametrize("method", ["dpo", "cita"])
def test_reference_eval_and_generation_passes_leave_statistics_untouched(tok, method):
    trainer = pref_trainer(tok, method, steps=2)
    ctrl = grit.attach(trainer, GritConfig(sample_every=1))
    peft_model = trainer.model
    first_lora = next(m for m in peft_model.modules() if hasattr(m, "lora_A"))
    calls = []  # every forward through the model during training: (grad enabled, adapters on, tokens)
    spy = peft_model.get_input_embeddings().register_forward_pre_hook(
        lambda mod, args: calls.append((torch.is_grad_enabled(), not first_lora.disable_adapters, args[0].numel())))
    trainer.train()
    spy.remove()
    assert not any(m.lora_a._forward_hooks for m in ctrl.modules)   # disarmed when training ends

    policy_tokens = sum(n for grad, on, n in calls if grad and on)
    assert any(not on for grad, on, n in calls)            # the reference pass did run (adapters disabled) ...
    assert ctrl.n_a == ctrl.n_g == [policy_tokens] * len(ctrl.modules)   # ... and contributed nothing
    assert ctrl.ticks == 2                                   # two policy forwards, no reference

    from trl.trainer.utils import use_adapter

    batch = tok(["Request 1? I cannot help."], return_tensors="pt")
    snap = snapshot(ctrl)
    peft_model.train()
    with torch.no_grad(), use_adapter(peft_model, adapter_name=None):   # TRL's reference pass
        peft_model(**batch)
    with peft_model.disable_adapter():                                  # a careless one, with gradients
        peft_model(**batch).logits.sum().backward()
    peft_model.eval()
    peft_model(**batch).logits.sum().backward()                         # evaluation mode with gradients
    with torch.no_grad():
        peft_model(**batch)                                             # evaluation
    peft_model.generate(**batch, max_new_tokens=3, do_sample=False)     # generation
    assert_untouched(ctrl, snap)
    peft_model.train()
    peft_model(**batch).logits.sum().backward()                         # and a training pass does count
    assert ctrl.ticks == snap[4] + 1 and not torch.equal(ctrl.a_cov, snap[0])


@pytest.mark.parametrize("statistics", ["running_mean", "ema"])
def test_batched_statistics_update_equals_sequential_per_sample_update(statistics):
    """Samples are folded in at the end of each backward in one batched update; several samples of one module
    in one backward (two forwards, one loss) must give the sequential update, in forward-graph order."""
    cfg = GritConfig(sample_every=1, statistics=statistics, ema_decay=0.9, **NO_REG)
    model = toy_model()
    ctrl = grit.GritController(model, cfg)
    seen = {m.name: [] for m in ctrl.modules}

    def capture(name):
        def hook(mod, args, out):
            h = out.detach()
            out.register_hook(lambda g: seen[name].append((h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1]))))
        return hook

    handles = [model.get_submodule(m.name).lora_A["default"].register_forward_hook(capture(m.name))
               for m in ctrl.modules]
    torch.manual_seed(3)
    model.train()
    for sizes in ((3, 4), (2, 5)):  # two backwards, each through two forwards of different token counts
        loss = sum((model(torch.randn(n, 7, 6)) * torch.randn(n, 7, 5)).sum() for n in sizes)
        loss.backward()
    for h in handles:
        h.remove()
    assert ctrl.ticks == 4
    for i, m in enumerate(ctrl.modules):
        s2 = 1 / float(model.get_submodule(m.name).scaling["default"]) ** 2
        a, g, n = torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64), 0
        for h, gr in seen[m.name]:   # the hooks fired in backward order: that is the order of the sequential update
            h, gr, rows = h.double(), gr.double(), len(h)
            if statistics == "ema" and n:
                a, g = 0.9 * a + 0.1 * h.T @ h / rows, 0.9 * g + 0.1 * s2 * gr.T @ gr / rows
            else:
                a, g = (n * a + h.T @ h) / (n + rows), (n * g + s2 * gr.T @ gr) / (n + rows)
            n += rows
        assert ctrl.n_a[i] == ctrl.n_g[i] == n == 2 * 7 * (3 + 4 + 2 + 5) // 2
        assert torch.allclose(ctrl.a_cov[i].double(), a, rtol=1e-5, atol=1e-7)
        assert torch.allclose(ctrl.g_cov[i].double(), g, rtol=1e-5, atol=1e-9)
