"""GRIT: LoRA + K-FAC preconditioning in the rank space, Fisher-guided reprojection, dynamic rank.

Usage (the trial runner, any TRL trainer, any precision):

    controller = grit.attach(trainer, config.grit)   # before trainer.train()
    trainer.train()
    controller.metrics()                              # {"grit/...": float}, proof that GRIT acted

The methods (SFT, DPO, CITA) know nothing about GRIT: `attach` installs
- a forward pre-hook on the model (one Python call per forward) that counts training forwards and, on every
  `sample_every`-th, arms the sampling hooks for that forward only (and takes them off on the next one);
- while armed, a forward hook on every active `lora_A` module; when the pass carries gradients it registers a
  pre-hook on the autograd node of the output h = x·Aᵀ, whose gradient is dL/dh = s·g·B (s = LoRA scaling,
  g = dL/d(layer output)). Both are r-wide, so the rank-space statistics cost two r×r products per sampled
  call and nothing d-wide. A sampled call only stashes (h, dL/dh); at the end of that backward (an autograd
  engine callback) all stashed samples are folded in with one stacked bmm per side and shape;
- a wrapper on `trainer.accelerator.clip_grad_norm_` that preconditions just before clipping, with an
  optimizer step pre-hook as the fallback when nothing clips (then it runs before the step);
- an optimizer step post-hook that counts optimizer steps, refreshes the factors every `kfac_update_freq`
  steps and reprojects every `reprojection_freq` steps;
- a TrainerCallback that binds those hooks to the optimizer HF creates inside `train()`.

Math (STUDY.md, "GRIT as the research implemented it"); per LoRA module ΔW = s·B·A, A: r×d_in, B: d_out×r:
  A_cov = E[(xAᵀ)ᵀ(xAᵀ)],  G_cov = E[(gB)ᵀ(gB)]                      (r×r, fp32, on the adapter's device)
  every step once factors are ready:  ∇B ← ∇B·(G_cov+δI)⁻¹,  ∇A ← (A_cov+δI)⁻¹·∇A   (fp32, NaN-sanitized)
  δ = damping, escalated ×(1, 3, 10, 30, 100, 300) per module until its Cholesky succeeds
  (all six tried in one batched `cholesky_ex`, the first success picked on the GPU: no host sync).
  Regularizer gradients are added before preconditioning, as if the research's loss terms had been in the loss:
  λ_kfac·(tr(A_cov-weighted A) + tr(G_cov-weighted B)) and λ_reproj·(‖(I−P_a)A‖² + ‖B(I−P_b)‖²).
  The curvature term is active only with `precondition`, the reprojection term only with `reproject`, so
  GRIT with both off is exactly LoRA (a test holds it to that).

Decisions (each one a choice the issue asked us to make and state):
- Statistics: the research's running mean over all sampled tokens (the `statistics` knob also offers an EMA
  with `ema_decay` per sampled call). A token count per module gates readiness (`kfac_min_samples` tokens,
  as the research counted rows). Counts are Python ints (shapes are known without a sync); every matrix stays
  on the GPU; only `metrics()` reads values back.
- Cost (the issue's budget: GRIT <= 1.15 x LoRA step time): per step GRIT adds one model pre-hook call (no
  module hooks on unsampled forwards: on a launch-bound CPU analogue of the 8B step, 224 adapters, hooks on
  every forward cost 13-15 ms per step, preconditioning ~4; BENCHMARKS.md), the preconditioning (one
  stacked bmm per group of equal shapes, the regularizer gradient added to the same stack; its r×r matrices cached
  until the statistics change) and `metrics()` (the spectrum cached per change of the statistics: one small
  read-back per call). Every `sample_every` steps: two bmm per shape group. Every `kfac_update_freq` steps:
  the batched inversions and one eigendecomposition shared by refresh and reprojection. No host syncs
  besides `metrics()`.
- Sampling: every `sample_every`-th training forward of the model (train mode, gradients enabled, adapter
  on), all its adapter calls, folded in during that forward's backward. The research ticked per module call;
  in a transformer every adapter runs once per forward, so the two count alike, and counting at the model
  leaves gradient-checkpoint recomputation (which never calls the model) neither double-counted nor missed.
  Reference passes (no_grad, adapters disabled), evaluation and generation (no_grad, eval mode) are not
  training forwards and never touch the statistics. A sampled forward whose backward never runs adds nothing.
  `attach` refuses nn.DataParallel (one process driving several GPUs: every replica would tick); trials run one
  process per GPU (DDP), where each process counts its own forwards.
- Schedule: as the research: factors are first inverted at step `kfac_update_freq` and every
  `kfac_update_freq` steps after (only modules with enough samples); preconditioning runs on every step after.
- Clipping order: precondition BEFORE gradient clipping, as the research's trainer did (precondition ->
  clip -> step). `max_grad_norm` then bounds the update actually applied, and the grad_norm HF logs is
  the norm of the natural gradient.
- Reprojection (every `reprojection_freq` steps, modules with enough samples): the research's projection
  A ← P_a·A, B ← B·P_b, P = V_k·V_kᵀ on the top-k eigenvectors of A_cov (P_b from G_cov when `two_sided`
  and G has enough samples, else P_a). Shapes stay r (static: the optimizer and compile are undisturbed);
  components beyond k are zeroed (masked), not removed. Invariants (tested): P is an orthogonal projector, so
  reprojecting twice equals once; k = r leaves A and B bit-identical; rank(B·A) ≤ k; one-sided, the change of
  the adapter's output s·B·A·x on the sampled activations is bounded by s²‖B‖²·(sum of the dropped
  eigenvalues of A_cov) ≤ s²‖B‖²·(1−τ)·tr(A_cov). Statistics are left as they are (same coordinates, as the research did).
- Optimizer state on reprojection: first moments (`exp_avg`, `momentum_buffer`) are projected like their
  parameter, so momentum does not push the parameter straight back into the removed directions; second
  moments are left (a per-coordinate scale, not a direction; projection only removes mass, so they err on
  the side of smaller steps); any other layout (bitsandbytes 8-bit states) is reset: the optimizer re-creates
  it as at step 0.
- Dynamic rank: k from the cumulative energy of A_cov's spectrum ≥ `energy_threshold`, at least `min_rank`
  (`reprojection_k` when `dynamic_rank` is off or r ≤ min_rank), applied by the projection above. Rank is
  not a hard constraint between reprojections: Adam's per-coordinate scaling can regrow dropped components,
  exactly as in the research; the next reprojection removes them again.
- Metrics: counters are exact; ranks and eigenvalues come from the statistics at the time `metrics()` is
  called (the rank is the one GRIT would select now), summarized per projection type.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from collections import defaultdict

import torch

_ESCALATION = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)  # research's damping schedule on Cholesky failure
_FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def select_rank(evals_desc: torch.Tensor, cfg) -> torch.Tensor:
    """Rank per module from a (M, r) spectrum sorted descending: cumulative energy >= threshold, >= min_rank.

    Mirrors the research: k = #{i: cum_i < τ} + 1, at least min_rank, at most r; a module whose total energy is
    ~0 keeps r; with dynamic rank off (or r <= min_rank) every module gets reprojection_k.
    """
    r = evals_desc.shape[-1]
    min_rank, fixed = min(cfg.min_rank, r), min(cfg.reprojection_k, r)
    if not cfg.dynamic_rank or r <= cfg.min_rank:
        return torch.full(evals_desc.shape[:-1], fixed, dtype=torch.long, device=evals_desc.device)
    ev = evals_desc.clamp_min(0)
    total = ev.sum(-1, keepdim=True)
    k = (ev.cumsum(-1) / total.clamp_min(1e-30) < cfg.energy_threshold).sum(-1) + 1
    k = torch.where(total.squeeze(-1) > 1e-6, k, torch.full_like(k, r))  # research: no energy, no adaptation
    return k.clamp(min_rank, r)


def _exact(fn):
    """no_grad and no autocast: GRIT's matmuls stay fp32 in whatever context a trainer calls them."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)
    return wrapper


def _sym(x):
    return 0.5 * (x + x.transpose(-1, -2))


def damped_inverse(cov: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched (cov + δ·s·I)⁻¹ with s the first escalation that factorizes. Returns (inverse, s); where every
    escalation fails (NaN statistics) the inverse is the identity (no preconditioning for that module)."""
    m, r = cov.shape[0], cov.shape[-1]
    eye = torch.eye(r, device=cov.device, dtype=cov.dtype)
    scales = torch.tensor(_ESCALATION, device=cov.device, dtype=cov.dtype)
    L, info = torch.linalg.cholesky_ex(_sym(cov)[None] + (damping * scales)[:, None, None, None] * eye)
    ok = info == 0                                       # (S, m)
    first = ok.to(torch.int8).argmax(0)                  # first success (0 where none)
    inv = torch.cholesky_inverse(L[first, torch.arange(m, device=cov.device)])
    fine = ok.any(0)
    inv = torch.where(fine[:, None, None], inv, eye)
    return inv, torch.where(fine, scales[first], torch.full_like(scales[first], float("nan")))


class _Module:
    __slots__ = ("name", "kind", "lora_a", "A", "B", "inv_s2", "handle")

    def __init__(self, name, layer, adapter):
        self.name = name
        self.kind = name.rsplit(".", 1)[-1]
        self.lora_a = layer.lora_A[adapter]
        self.A = self.lora_a.weight
        self.B = layer.lora_B[adapter].weight
        self.inv_s2 = 1.0 / float(layer.scaling[adapter]) ** 2  # dL/dh = s·gB; the research's G uses gB
        self.handle = None


class GritController:
    """Owns GRIT's statistics, hooks and schedule for one PEFT model. Build it with `attach`."""

    def __init__(self, model, cfg):
        from peft.tuners.lora import LoraLayer

        self.cfg = cfg
        self.modules: list[_Module] = []
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer) and not layer.disable_adapters:
                active = [a for a in layer.active_adapters if a in layer.lora_A]
                if len(active) > 1:
                    raise NotImplementedError(f"GRIT supports one active LoRA adapter; {name} has {active}")
                if active:
                    self.modules.append(_Module(name, layer, active[0]))
        if not self.modules:
            raise ValueError("GRIT found no active LoRA modules: attach it to a PEFT LoRA model")
        ranks = {m.A.shape[0] for m in self.modules}
        if len(ranks) != 1:
            raise NotImplementedError(f"GRIT needs one LoRA rank across modules, got {sorted(ranks)}")
        self.r = r = ranks.pop()
        n = len(self.modules)
        self.device = dev = self.modules[0].A.device
        eye = torch.eye(r, device=dev).expand(n, r, r)
        self._a_cov = torch.zeros(n, r, r, device=dev)
        self._g_cov = torch.zeros(n, r, r, device=dev)
        self.a_inv, self.g_inv = eye.clone(), eye.clone()
        self.proj_a, self.proj_b = eye.clone(), eye.clone()  # last basis (reprojection regularizer)
        self.n_a, self.n_g = [0] * n, [0] * n               # sampled tokens (rows), Python ints: no sync
        self.ticks = 0                                        # training forwards of the model seen
        self._armed = False                                   # module hooks on (this forward is sampled)
        self.escalation = torch.ones(n, device=dev)
        self.natgrad_norm = torch.zeros((), device=dev)
        self.grad_norm = torch.zeros((), device=dev)
        self.steps = self.steps_preconditioned = self.factor_refreshes = self.reprojections = 0
        self.ready: list[int] = []                            # modules preconditioned (have inverses)
        self._plan: list = []                                 # precondition groups, rebuilt at refresh
        # Modules with equal shapes, device and dtype are processed together with one bmm.
        self._groups = {"A": self._group(lambda m: m.A), "B": self._group(lambda m: m.B)}
        self._optimizer = None
        self._opt_handles = []
        self._preconditioned_this_step = self._removed = False
        # Hot-path state as plain attributes (a pydantic attribute read costs more than the check it feeds).
        self._every, self._ema, self._decay = cfg.sample_every, cfg.statistics == "ema", cfg.ema_decay
        self._pending: list = []          # sampled (module, h, grad, samples before) awaiting the batched update
        self._flush_queued = False
        self._version = 0                 # bumped whenever the statistics change
        self._proj_version, self._proj_count = None, 0  # statistics the projections came from; recomputations
        self._reg_cache = self._spec_cache = self._summary_cache = None
        self._plan_full = False
        kinds = sorted({m.kind for m in self.modules})
        self._kinds = kinds
        self._kind_ix = torch.tensor([kinds.index(m.kind) for m in self.modules], device=dev)
        self._kind_count = torch.bincount(self._kind_ix, minlength=len(kinds)).float()
        self._model = model
        self._first_layer = model.get_submodule(self.modules[0].name)  # its switch says whether adapters are on
        self._root_handle = model.register_forward_pre_hook(self._model_pre_hook)

    def _group(self, param_of, members=None):
        groups = defaultdict(list)
        for i in members if members is not None else range(len(self.modules)):
            p = param_of(self.modules[i])
            groups[(tuple(p.shape), p.device, p.dtype)].append(i)
        return [(torch.tensor(ix, device=self.device), [param_of(self.modules[i]) for i in ix]) for ix in groups.values()]

    # ---- statistics ---------------------------------------------------------------------------
    @property
    def a_cov(self):
        """(M, r, r) fp32 A-side statistics, current (pending samples folded in first)."""
        self._flush()
        return self._a_cov

    @property
    def g_cov(self):
        self._flush()
        return self._g_cov

    def _model_pre_hook(self, model, args):
        # One call per forward of the model, the only per-step cost of sampling: count training forwards and
        # arm the per-module hooks for the sampled ones only.
        if not (model.training and torch.is_grad_enabled()) or self._first_layer.disable_adapters:
            return
        self.ticks += 1
        self._arm(self.ticks % self._every == 0)

    def _arm(self, on):
        if on == self._armed:
            return
        for i, m in enumerate(self.modules):
            if on:
                m.handle = m.lora_a.register_forward_hook(functools.partial(self._forward_hook, i))
            elif m.handle is not None:
                m.handle.remove()
                m.handle = None
        self._armed = on

    def _forward_hook(self, i, module, args, out):
        # Only a pass that will backpropagate into the adapter may feed statistics: this excludes reference
        # passes and generation (no_grad) and evaluation (eval mode). Samples are counted in the backward.
        # The hook goes on out's autograd node (a pre-hook sees the same gradient a tensor hook would, after
        # accumulation), which costs about half of Tensor.register_hook per call.
        if module.training and out.requires_grad and torch.is_grad_enabled():
            h, nr, backward = out.detach(), out.output_nr, self._backward_hook
            out.grad_fn.register_prehook(lambda grads: backward(i, h, grads[nr]))

    def _backward_hook(self, i, h, grad):
        rows = h.numel() // self.r
        if grad is None or not rows:
            return None
        # Stashed, not computed here: one batched update for all modules at the end of this backward
        # replaces ~6 kernel launches and their Python per module. Counts are updated now (exact, no sync).
        self._pending.append((i, h, grad, self.n_a[i], rows))
        self.n_a[i] += rows
        self.n_g[i] += rows
        if not self._flush_queued:
            self._flush_queued = True
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self._flush)
            except RuntimeError:  # not inside an engine-run backward: fold in at the next read
                pass
        return None  # the gradient passes on unchanged

    def _flush(self):
        """Fold the stashed samples into the statistics: per round (a module's k-th sample since the last flush)
        and per shape, one stacked bmm for hᵀh and one for (gB)ᵀ(gB), then the running-mean (or EMA) update."""
        self._flush_queued = False
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        with contextlib.ExitStack() as stack:  # no graph, no autocast (engine callbacks run grad-disabled
            stack.enter_context(torch.no_grad())  # already; direct reads may not)
            for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(device, enabled=False))
            seen, rounds = defaultdict(int), defaultdict(lambda: defaultdict(list))
            for e in pending:  # samples of one module stay in their order, as the sequential update had them
                k = seen[e[0]]
                seen[e[0]] = k + 1
                rounds[k][(e[4], e[1].device, e[1].dtype, e[2].dtype)].append(e)
            for k in sorted(rounds):
                for entries in rounds[k].values():
                    self._accumulate(entries)
        self._version += 1

    def _accumulate(self, entries):
        ix = [e[0] for e in entries]
        rows = entries[0][4]
        beta, alpha = [], []
        for e in entries:
            n = e[3]
            if self._ema and n > 0:
                beta.append(self._decay), alpha.append((1 - self._decay) / rows)
            else:  # running mean over all sampled rows (the research's), and the EMA's first sample
                beta.append(n / (n + rows)), alpha.append(1.0 / (n + rows))
        scale_g = [alpha[j] * self.modules[i].inv_s2 for j, i in enumerate(ix)]
        everyone = ix == list(range(len(self.modules)))
        for cov, which, coef in ((self._a_cov, 1, alpha), (self._g_cov, 2, scale_g)):
            x = torch.stack([e[which].reshape(rows, self.r) for e in entries]).to(cov.device, torch.float32)
            if everyone and len(set(beta)) == 1 and len(set(coef)) == 1:  # the usual case: one fused kernel,
                cov.baddbmm_(x.transpose(1, 2), x, beta=beta[0], alpha=coef[0])  # the batched form of addmm_
            else:
                s = torch.bmm(x.transpose(1, 2), x)               # (m, r, r): Σ over rows of xᵀx, fp32
                b, c, ixt = self._to_device([beta, coef, ix], cov.device)
                cov[ixt] = b.to(cov.dtype)[:, None, None] * cov[ixt] + c.to(cov.dtype)[:, None, None] * s

    @staticmethod
    def _to_device(lists, device):
        """Small host lists to the device without a sync (pinned memory, non-blocking copy)."""
        out = []
        for values in lists:
            t = torch.tensor(values, dtype=torch.long if isinstance(values[0], int) else torch.float64)
            if device.type == "cuda":
                t = t.pin_memory().to(device, non_blocking=True)
            out.append(t)
        return out

    def _enough(self, counts):
        return [i for i, c in enumerate(counts) if c >= self.cfg.kfac_min_samples]

    # ---- the three operations, also callable directly (tests, custom loops) ----------------------
    @_exact
    def refresh(self):
        """Invert the damped factors of every module with enough samples; update spectrum and ranks."""
        if self.cfg.reproject:  # the reprojection regularizer's subspace
            self._update_projections()
        if not self.cfg.precondition:
            return
        ready = sorted(set(self._enough(self.n_a)) & set(self._enough(self.n_g)))
        if not ready:
            return
        ix = torch.tensor(ready, device=self.device)
        self.a_inv[ix], esc_a = damped_inverse(self.a_cov[ix], self.cfg.damping)
        self.g_inv[ix], esc_g = damped_inverse(self.g_cov[ix], self.cfg.damping)
        self.escalation[ix] = torch.maximum(esc_a, esc_g)
        self.ready = ready
        # Inverses gathered per group once here, on the group's device (device_map may spread modules).
        self._plan = [(side, ix_, ps, inv[ix_].to(ps[0].device))
                      for side, inv, param_of in (("A", self.a_inv, lambda m: m.A), ("B", self.g_inv, lambda m: m.B))
                      for ix_, ps in self._group(param_of, ready)]
        # Every module ready (the usual case): the plan's groups are the regularizer's groups, and precondition
        # adds the regularizer to the stacked gradient it preconditions (one stack, no separate pass).
        self._plan_full = len(ready) == len(self.modules)
        self.factor_refreshes += 1

    def _update_projections(self):
        self._flush()
        if self._proj_version == ("stats", self._version):  # same statistics, same projections (refresh and
            return                                           # reprojection on one step: one eigh, not two)
        ea, va = torch.linalg.eigh(_sym(self._a_cov))
        ea, va = ea.flip(-1), va.flip(-1)                    # descending
        eg, vg = torch.linalg.eigh(_sym(self._g_cov))
        eg, vg = eg.flip(-1), vg.flip(-1)
        rank = select_rank(ea, self.cfg)
        keep = torch.arange(self.r, device=self.device) < rank[:, None]       # (M, r) mask beyond k
        full = (rank == self.r)[:, None, None]
        eye = torch.eye(self.r, device=self.device)
        # k = r: exactly the identity (V·Vᵀ would be it only up to rounding).
        self.proj_a = torch.where(full, eye, (va * keep[:, None, :]) @ va.transpose(-1, -2))
        g_ok = torch.zeros(len(self.modules), dtype=torch.bool, device=self.device)
        if self.cfg.two_sided and self._enough(self.n_g):
            g_ok[self._enough(self.n_g)] = True
        proj_g = torch.where(full, eye, (vg * keep[:, None, :]) @ vg.transpose(-1, -2))
        self.proj_b = torch.where(g_ok[:, None, None], proj_g, self.proj_a)
        self._proj_version = ("stats", self._version)
        self._proj_count += 1

    @_exact
    def precondition(self):
        """Add regularizer gradients, then ∇B ← ∇B·G⁻¹, ∇A ← A⁻¹·∇A for every ready module (fp32)."""
        self._flush()
        reg = self._regularizers()
        fused = self.cfg.precondition and self._plan_full
        if reg is not None and not fused:
            self._add_regularizers(reg)
        if not self.cfg.precondition or not self._plan:
            return
        nat, raw = [], []
        for side, ix, params, inv in self._plan:
            grads = [p.grad for p in params]
            if any(g is None for g in grads):  # a module unused in this step: leave the group alone
                continue
            g = torch.stack(grads)
            if fused and reg is not None:  # exactly _add_regularizers' sum, in the gradients' dtype
                g.add_(self._regularizer_grad(side, reg[side][ix], params).to(g.dtype))
            g = g.float()
            raw.append(torch.linalg.vector_norm(g))
            out = torch.bmm(inv, g) if side == "A" else torch.bmm(g, inv)
            out = torch.nan_to_num_(out, nan=0.0, posinf=0.0, neginf=0.0).clamp_(-1e6, 1e6)  # research's guard
            nat.append(torch.linalg.vector_norm(out))
            torch._foreach_copy_(grads, list(out.unbind(0)))
        if nat:
            self.natgrad_norm = torch.linalg.vector_norm(torch.stack(nat))
            self.grad_norm = torch.linalg.vector_norm(torch.stack(raw))
            self.steps_preconditioned += 1

    def _regularizers(self):
        """The (M, r, r) matrices whose product with A (left) / B (right) is the regularizers' gradient, or None.
        Cached until the statistics or the projections change (sampled steps, refreshes)."""
        lk = self.cfg.lambda_kfac if self.cfg.precondition else 0.0
        lr = self.cfg.lambda_reproj if self.cfg.reproject else 0.0
        if lk == 0 and lr == 0:
            return None
        key = (self._version, self._proj_count)
        if self._reg_cache is None or self._reg_cache[0] != key:
            eye = torch.eye(self.r, device=self.device)
            # d/dA tr(Aᵀ C A) = 2CA, d/dA ‖(I−P)A‖² = 2(I−P)A; the same from the right for B.
            self._reg_cache = (key, {"A": 2 * (lk * self._a_cov + lr * (eye - self.proj_a)),
                                     "B": 2 * (lk * self._g_cov + lr * (eye - self.proj_b))})
        return self._reg_cache[1]

    @staticmethod
    def _regularizer_grad(side, m, params):
        w = torch.stack(params).float()  # callers run under no_grad: no detach per tensor
        m = m.to(w.device)
        return torch.bmm(m, w) if side == "A" else torch.bmm(w, m)

    def _add_regularizers(self, reg=None):
        reg = self._regularizers() if reg is None else reg
        if reg is None:
            return
        for side, groups in self._groups.items():
            for ix, params in groups:
                grads = [p.grad for p in params]
                if any(g is None for g in grads):
                    continue
                out = self._regularizer_grad(side, reg[side][ix], params)
                torch._foreach_add_(grads, list(out.to(grads[0].dtype).unbind(0)))

    @_exact
    def reproject(self):
        """Project A and B onto the top-k eigendirections (k from the spectrum); keep optimizer state consistent."""
        self._flush()
        gated = self._enough(self.n_a)  # research: reproject a module only once its A_cov is sampled enough
        if not gated:
            return
        self._update_projections()
        for side, proj, param_of in (("A", self.proj_a, lambda m: m.A), ("B", self.proj_b, lambda m: m.B)):
            for ix, params in self._group(param_of, gated):
                p_mat = proj[ix].to(params[0].device)
                apply = (lambda x: torch.bmm(p_mat, x)) if side == "A" else (lambda x: torch.bmm(x, p_mat))
                new = apply(torch.stack([p.detach() for p in params]).float())
                torch._foreach_copy_([p.data for p in params], list(new.unbind(0)))
                self._project_state(params, apply)
        self.reprojections += 1

    def _project_state(self, params, apply):
        opt = self._optimizer
        if opt is None:
            return
        by_key = defaultdict(list)
        for p in params:
            state = opt.state.get(p)
            if not state:
                continue
            layouts = {k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape}
            known = all(k in _FIRST_MOMENTS + _SECOND_MOMENTS and v.is_floating_point() for k, v in layouts.items())
            if not known:
                opt.state.pop(p)  # a layout we cannot transform (e.g. 8-bit blockwise): fresh state
                continue
            for k in _FIRST_MOMENTS:
                if k in layouts:
                    by_key[k].append(layouts[k])
        for tensors in by_key.values():
            new = apply(torch.stack(tensors).float())
            torch._foreach_copy_(tensors, list(new.unbind(0)))

    # ---- wiring into a trainer ------------------------------------------------------------------
    def bind_optimizer(self, optimizer):
        """Hook the optimizer's step (unwrapping accelerate's wrapper). Idempotent per optimizer."""
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner is self._optimizer:
            return
        for h in self._opt_handles:
            h.remove()
        self._opt_handles = []
        self._optimizer = inner
        if not self._removed:  # a removed controller only remembers it; `resume` hooks it
            self._opt_handles = [inner.register_step_pre_hook(self._pre_step),
                                 inner.register_step_post_hook(self._post_step)]

    def precondition_once(self):
        """Called before gradient clipping; the step pre-hook then does not precondition again."""
        if self._removed:
            return
        self.precondition()
        self._preconditioned_this_step = True

    def _pre_step(self, optimizer, args, kwargs):
        if not self._preconditioned_this_step:  # nothing clipped this step (custom loop, max_grad_norm off)
            self.precondition()
        self._preconditioned_this_step = False

    def _post_step(self, optimizer, args, kwargs):
        self.steps += 1
        if self.steps == self.cfg.kfac_update_freq and not self.ticks:
            warnings.warn("GRIT counted no training forward of the model it was attached to, so it has no "
                          "statistics: call that model (not a submodule of it) in train mode", stacklevel=2)
        if self.steps % self.cfg.kfac_update_freq == 0:
            self.refresh()
        if self.cfg.reproject and self.steps % self.cfg.reprojection_freq == 0:
            self.reproject()

    def remove(self):
        """Take every hook off the model and optimizer (statistics and schedule are kept: see `resume`)."""
        self._arm(False)
        if self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None
        for h in self._opt_handles:
            h.remove()
        self._opt_handles = []
        self._removed = True  # the trainer's clip wrapper stays but no longer preconditions

    def resume(self):
        """Put back the hooks `remove` took off; statistics, counters and schedule continue where they were.
        (The benchmark alternates LoRA and GRIT steps in one trainer this way.)"""
        if not self._removed:
            return
        self._root_handle = self._model.register_forward_pre_hook(self._model_pre_hook)
        if self._optimizer is not None:
            self._opt_handles = [self._optimizer.register_step_pre_hook(self._pre_step),
                                 self._optimizer.register_step_post_hook(self._post_step)]
        self._preconditioned_this_step = self._removed = False

    # ---- proof that it acted -----------------------------------------------------------------------
    @_exact
    def spectrum(self):
        """Descending eigenvalues of A_cov and G_cov, (M, r) each, and the rank GRIT selects from them now."""
        self._flush()
        if self._spec_cache is None or self._spec_cache[0] != self._version:  # statistics changed since
            ea = torch.linalg.eigvalsh(_sym(self._a_cov)).flip(-1)
            eg = torch.linalg.eigvalsh(_sym(self._g_cov)).flip(-1)
            self._spec_cache = (self._version, ea, eg, select_rank(ea, self.cfg))
        return self._spec_cache[1:]

    def metrics(self) -> dict[str, float]:
        """Counters and spectrum summaries from the current statistics, keys prefixed 'grit/'. No side
        effects on training; one host sync. Per-module values are summarized per projection type (mean
        rank, max top eigenvalue over layers) to keep the key count small; see `module_stats` for all.
        The spectral summaries are computed once per change of the statistics (every `sample_every`
        steps), not at every logging step."""
        ea, eg, rank = self.spectrum()
        key = self._spec_cache[0]
        if self._summary_cache is None or self._summary_cache[0] != key:
            with torch.no_grad():
                rank = rank.float()
                per_kind_rank = torch.zeros(len(self._kinds), device=self.device).index_add_(0, self._kind_ix, rank)
                per_kind_rank /= self._kind_count
                per_kind_eig = torch.zeros(len(self._kinds), device=self.device).scatter_reduce_(
                    0, self._kind_ix, ea[:, 0], "amax", include_self=False)
                spectral = torch.cat([torch.stack([rank.mean(), rank.min(), ea[:, 0].max(), eg[:, 0].max()]),
                                      per_kind_rank, per_kind_eig])
            self._summary_cache = (key, spectral)
        spectral = self._summary_cache[1]
        with torch.no_grad():
            vals = torch.cat([torch.stack([self.natgrad_norm, self.grad_norm,
                                           torch.nan_to_num(self.escalation, nan=float("inf")).max()]),
                              spectral]).tolist()
        names = ["natgrad_norm", "grad_norm", "damping_escalation", "mean_effective_rank", "min_effective_rank",
                 "top_eigenvalue", "top_eigenvalue_g"]
        out = {
            "grit/steps": float(self.steps),
            "grit/steps_preconditioned": float(self.steps_preconditioned),
            "grit/factor_refreshes": float(self.factor_refreshes),
            "grit/reprojections": float(self.reprojections),
            "grit/modules": float(len(self.modules)),
            "grit/modules_ready": float(len(self.ready)),
            "grit/min_samples": float(min(min(self.n_a), min(self.n_g))),
        }
        out.update({f"grit/{k}": v for k, v in zip(names, vals)})
        n = len(self._kinds)
        out.update({f"grit/rank/{k}": v for k, v in zip(self._kinds, vals[len(names):len(names) + n])})
        out.update({f"grit/top_eig/{k}": v for k, v in zip(self._kinds, vals[len(names) + n:])})
        return out

    def module_stats(self) -> dict[str, dict[str, float]]:
        """Per-module rank, top eigenvalues and samples (an end-of-run artifact, not per-step metrics)."""
        ea, eg, rank = self.spectrum()
        rank, ea, eg = rank.tolist(), ea[:, 0].tolist(), eg[:, 0].tolist()
        return {m.name: {"rank": rank[i], "top_eig_a": ea[i], "top_eig_g": eg[i], "samples": self.n_a[i]}
                for i, m in enumerate(self.modules)}


def _make_callback(controller):
    """Binds the controller to the optimizer HF creates inside train() (imported late: no transformers at
    import time of this module)."""
    from transformers import TrainerCallback

    class GritCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:
                controller.bind_optimizer(optimizer)

        def on_train_end(self, args, state, control, **kwargs):
            controller._arm(False)  # a last sampled forward leaves no module hooks on for evaluation/generation

    return GritCallback()


def attach(trainer, cfg) -> GritController:
    """Install GRIT on a built TRL/transformers trainer whose model carries a PEFT LoRA adapter."""
    n_gpu = getattr(getattr(trainer, "args", None), "n_gpu", 1)
    if n_gpu > 1:  # HF Trainer would wrap the model in nn.DataParallel: replicas race on the hooks
        raise ValueError(f"GRIT needs one GPU per process, but the trainer sees n_gpu={n_gpu} (nn.DataParallel): "
                         "launch one process per GPU (Ray Train / torchrun) or set CUDA_VISIBLE_DEVICES to one GPU")
    controller = GritController(trainer.model, cfg)
    trainer.add_callback(_make_callback(controller))
    if getattr(trainer, "optimizer", None) is not None:
        controller.bind_optimizer(trainer.optimizer)
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        clip = accelerator.clip_grad_norm_

        @functools.wraps(clip)
        def clip_after_preconditioning(*args, **kwargs):
            # HF clips (or, with max_grad_norm off, measures the norm) once per optimizer step, after
            # accumulation: the place the research preconditioned.
            controller.precondition_once()
            return clip(*args, **kwargs)

        accelerator.clip_grad_norm_ = clip_after_preconditioning
    return controller
