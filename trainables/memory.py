"""GPU memory planner: a trial's peak training memory, the micro-batch and checkpointing that fit a budget, the GPU
fraction to pack.

The estimate adds up the bytes of the tensors alive at the peak moment of one TRL 1.16 step (LoRA/GRIT on a
Llama-family decoder), from the model's shape; it is not fitted to measurements (tests/fixtures holds those).
What TRL 1.16 + transformers 5.17 + PEFT 0.21 keep in memory, as read from their code:
- Logits are never materialized in training. TRL patches the model with a fused LM head
  (`trl.kernels.ChunkedLogProbFunction`): it projects the scored positions (on a GPU the labelled ones, gathered
  first; on the CPU every position) in tiles of at most 4096 tokens x 32768 vocabulary columns (bf16 under
  autocast, folded into fp32 per-token statistics) and recomputes each tile in the backward. So the "logits" term
  is one tile, flat in batch and sequence beyond 4096 tokens: not batch x seq x vocab x 4 bytes. (Evaluation
  bounds them by its own chunking: see `estimate_eval`.)
- DPO and CITA run chosen and rejected as one batch of 2 x micro_batch sequences; the reference pass runs after the
  policy forward, under no_grad with checkpointing off and the adapter disabled: its working set is one layer's
  forward transients, smaller than the policy backward's, so it never sets the peak.
- Non-reentrant checkpointing keeps each decoder layer's input (1 hidden state per layer) and recomputes one layer
  at a time in the backward: that layer's saved tensors plus its gradients are the backward's working set.
- A frozen Linear saves no activation (its weight gets no gradient); LoRA's lora_A saves its input. PEFT keeps LoRA
  weights fp32 over a bf16 base and casts the input to fp32, which bf16 autocast casts back: every LoRA module then
  saves its own bf16 copy of its input. For nf4/int8 TRL casts the LoRA weights to bf16: no copies, and params,
  grads and AdamW states are bf16.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

from trainables.config import TrialConfig

GiB = 2**30

# --- headroom: what max_memory_allocated() does not see ---------------------------------------------------------
CUDA_CONTEXT_BYTES = GiB // 2  # per process: CUDA context, cuBLAS/cuDNN handles and kernels
# The caching allocator reserves more than it hands out: blocks cut for other shapes (sequence lengths vary per
# batch; evaluation and generation use yet others) stay cached. Measured as reserved (or nvidia-smi) minus the
# allocated peak (BENCHMARKS.md):
# - SmolLM2 sweep packed 4 per H100, training and evaluation: 2.28 GiB over a 1.88 GiB peak, of which ~1.56 GiB
#   transient (nvidia-smi 4.66 GiB per trial, less the context);
# - Llama-3-8B shape, lengths varied from 512 to 1024 (bench/memory_peak.py --varied, 2026-11-24): DPO with
#   checkpointing at micro-batch 8, 1.38 GiB over 25.0 (0.16 x the 8.7 GiB transient part estimated); without it at
#   micro-batch 4, 2.75 GiB over 73.1 (0.05 x 56.8 GiB).
# Two rules each cover all three: 1.5x the transient part (from the first datum), and 2 GiB + 0.2x it. The first
# alone asked 158 GiB for the 8B step that ran in 75.9 GiB reserved; the second alone would halve how many small
# trials pack on a 16-24 GB GPU, unmeasured. The headroom is the smaller of the two.
# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True would shrink it (0.93 GiB in the second 8B case).
SMALL_TRIAL_SLACK = 1.5
ALLOCATOR_FIXED_BYTES = 2 * GiB
ALLOCATOR_SLACK = 0.2


def required_bytes(estimate: MemoryEstimate) -> int:
    """GPU memory a process needs for `estimate`: the allocated peak plus context and allocator headroom."""
    return estimate.total + CUDA_CONTEXT_BYTES + allocator_headroom(estimate)


def allocator_headroom(estimate: MemoryEstimate) -> int:
    """What the caching allocator reserves beyond the allocated peak (the measurements above SMALL_TRIAL_SLACK)."""
    t = estimate.transient
    return math.ceil(min(SMALL_TRIAL_SLACK * t, ALLOCATOR_FIXED_BYTES + ALLOCATOR_SLACK * t))


# --- the model -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What memory depends on (a Llama-family decoder: GQA attention, SwiGLU MLP, RMSNorm, no biases)."""
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied_embeddings: bool
    head_dim: int = 0  # 0: hidden // heads (set it for models that decouple the two)

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(vocab=c.vocab_size, hidden=c.hidden_size, intermediate=c.intermediate_size,
                   layers=c.num_hidden_layers, heads=c.num_attention_heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                   tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
                   head_dim=getattr(c, "head_dim", None) or 0)

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each Linear in a decoder layer, by the module names LoRA targets."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:  # what bitsandbytes quantizes: every decoder Linear (not lm_head)
        return self.layers * sum(a * b for a, b in self.projections().values())

    @property
    def n_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms = (2 * self.layers + 1) * self.hidden
        return embeddings + self.linear_params + norms


@functools.lru_cache(maxsize=64)
def model_shape(model_name: str) -> ModelShape:
    """Shape of a config's model name (hub id, local dir, embedded, tiny-random): reads the config, no weights."""
    from transformers import AutoConfig

    from trainables import models

    return ModelShape.from_hf_config(models.from_pretrained(AutoConfig, model_name))


# --- precision -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Precision:
    act: int                # bytes per activation element (bf16 autocast or fp32)
    lora: int               # bytes per LoRA param; grads and AdamW states take the param's dtype
    lora_copy: bool         # fp32 LoRA under bf16 autocast: each LoRA module saves a bf16 copy of its input
    base_saves_input: bool  # bnb's MatMul8bitLt keeps its input for backward; frozen nn.Linear and MatMul4Bit don't
    quantized: bool         # bnb dequantizes a weight matrix to bf16 for each input gradient


_PRECISIONS = {
    "fp32": _Precision(act=4, lora=4, lora_copy=False, base_saves_input=False, quantized=False),
    "bf16": _Precision(act=2, lora=4, lora_copy=True, base_saves_input=False, quantized=False),
    "nf4": _Precision(act=2, lora=2, lora_copy=False, base_saves_input=False, quantized=True),
    "int8": _Precision(act=2, lora=2, lora_copy=False, base_saves_input=True, quantized=True),
}
# NF4 with double quantization: 4 bits + one 8-bit absmax per 64-weight block + one fp32 absmax per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# TRL's fused LM head (trl/kernels/chunked_logprob.py) allocates one buffer of TOKEN_CHUNK_SIZE tokens x
# chunk_size columns (32768, whatever the vocabulary) in the compute dtype, forward and backward.
LM_TILE_TOKENS, LM_TILE_VOCAB = 4096, 32768
# fp32 is the CPU profile: without Triton, TRL folds each tile with torch ops whose temporaries coexist with the
# buffer (backward: y, z, log_p, p, grad, the target mask as float and its difference/product: 7 fp32 values and
# the bool mask per tile element; measured on CPU: 7.3 tiles).
CPU_TILE_TEMP_BYTES = 7 * 4 + 1
# torch gives each (cuBLAS handle, stream) a workspace from the caching allocator on its first matmul, kept for the
# process: one for the trainer's thread (forward, evaluation), one for autograd's device thread (backward). 32 MiB each
# on Hopper (measured on an H100: bench/memory_peak.py), less on older GPUs. fp32 is the CPU profile: none.
CUBLAS_WORKSPACE_BYTES = 32 * 2**20


def weight_bytes(shape: ModelShape, precision: str) -> int:
    """Base model weights. nf4/int8 quantize the decoder Linears; embeddings, lm_head and norms stay bf16."""
    other = shape.n_params - shape.linear_params
    if precision == "fp32":
        return 4 * shape.n_params
    if precision == "bf16":
        return 2 * shape.n_params
    if precision == "nf4":
        return math.ceil(NF4_BYTES_PER_PARAM * shape.linear_params) + 2 * other
    if precision == "int8":  # int8 weights + one fp32 scale per output row
        rows = shape.layers * sum(out for _, out in shape.projections().values())
        return shape.linear_params + 4 * rows + 2 * other
    raise ValueError(f"precision = {precision!r}; allowed: fp32, bf16, nf4, int8")


def lora_params(cfg: TrialConfig, shape: ModelShape) -> int:
    proj = shape.projections()
    unknown = [m for m in cfg.lora.target_modules if m not in proj]
    if unknown:
        raise ValueError(f"lora.target_modules {unknown}: the planner knows {sorted(proj)}")
    return shape.layers * sum(cfg.lora.r * sum(proj[m]) for m in cfg.lora.target_modules)


def _optimizer_bytes(optim: str, dtype_bytes: int) -> tuple[int, int]:
    """(state bytes, step temporary bytes) per trainable param for an HF `optim` name."""
    if "8bit" in optim:
        return 2, 0
    if optim.startswith("sgd") or "adafactor" in optim:
        return 0, 0  # HF's SGD has no momentum by default; Adafactor's factored state is O(rows + cols)
    # AdamW: exp_avg + exp_avg_sq in the param's dtype; the foreach step allocates sqrt(exp_avg_sq) once
    return 2 * dtype_bytes, (0 if "fused" in optim else dtype_bytes)


# --- the estimate ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int]  # bytes per component at the peak moment
    total: int             # sum of the parts: the peak, i.e. the largest of the step's candidate moments
    moment: str = ""       # which moment is the peak
    static: int = 0        # weights, adapter state, cuBLAS workspaces: allocated once, no allocator churn

    @property
    def gib(self) -> float:
        return self.total / GiB

    @property
    def transient(self) -> int:
        return self.total - self.static


def _layer_saved(cfg: TrialConfig, shape: ModelShape, p: _Precision, tokens: int, padded: bool,
                 liger: bool = False) -> int:
    """Bytes one decoder layer keeps for its backward (checked against autograd's saved tensors on CPU; with
    Liger's kernels against a measured peak, on a GPU)."""
    a, t, h, i = p.act, tokens, shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    targets = set(cfg.lora.target_modules)

    def linear_input(modules, width):  # one input read by these Linears
        lora = len(targets.intersection(modules))
        if p.lora_copy:
            return lora * a * t * width  # a bf16 copy per LoRA module
        return a * t * width if lora or p.base_saves_input else 0

    saved = 2 * _norm_saved(p, t, h, liger)
    saved += linear_input(("q_proj", "k_proj", "v_proj"), h) + linear_input(("gate_proj", "up_proj"), h)
    saved += linear_input(("down_proj",), i)
    saved += a * t * q if p.lora_copy and "o_proj" in targets else 0  # o_proj's input is SDPA's saved output
    kv_saved = q if padded else kv  # with a padding mask transformers repeats K/V to all heads for SDPA
    saved += a * t * (2 * q + 2 * kv_saved) + 4 * t * shape.heads  # q, k, v, output, logsumexp
    # SiLU keeps gate's output; the product keeps silu(gate) and up's output. Liger's fused SiLU-and-multiply keeps
    # only gate's and up's outputs (silu recomputed in its backward).
    saved += (2 if liger else 3) * a * t * i
    saved += len(targets) * a * t * cfg.lora.r  # lora_B keeps the rank-r activation
    return saved


def _norm_saved(p: _Precision, tokens: int, hidden: int, liger: bool) -> int:
    """An RMSNorm keeps its input in fp32 (transformers' upcast); Liger's kernel keeps the input as it came (bf16
    under autocast) and one fp32 reciprocal RMS per token."""
    return p.act * tokens * hidden + 4 * tokens if liger else 4 * tokens * hidden


LIGER_PRECISIONS = ("bf16", "nf4", "int8")  # Liger's kernels are Triton's: GPU precisions (fp32 is the CPU profile)


def cuda_workspaces(cfg: TrialConfig) -> int:
    """The cuBLAS workspaces a GPU trial's process holds (forward and backward thread); none on the CPU."""
    return 0 if cpu_profile(cfg) else 2 * CUBLAS_WORKSPACE_BYTES


def cpu_profile(cfg: TrialConfig) -> bool:
    """fp32 is the CPU profile: the planner plans it as the CPU runs it (no Triton, no cuBLAS). An fp32 trial on a
    GPU is then planned 64 MiB low on workspaces and high on the LM head (every position, the CPU's temporaries)."""
    return cfg.precision == "fp32"


def uses_liger(cfg: TrialConfig) -> bool:
    """Liger's layer kernels (RMSNorm, SwiGLU, RoPE; `trainer.use_liger_kernel`). The planner assumes the model is one
    Liger patches (the Llama family of the studies): on another it would patch nothing and the estimate be low."""
    return bool(cfg.trainer.get("use_liger_kernel")) and cfg.precision in LIGER_PRECISIONS


def estimate_peak(cfg: TrialConfig, shape: ModelShape, micro_batch: int | None = None,
                  seq_len: int | None = None, completion_len: int | None = None) -> MemoryEstimate:
    """Peak allocated GPU memory of a training step (torch.cuda.max_memory_allocated).

    micro_batch defaults to cfg.micro_batch, seq_len to cfg.max_length (the worst case: batches are padded to at
    most max_length). completion_len is the longest completion in tokens (with its EOS), the positions that carry a
    label; by default every position (the worst case: the config does not bound completions, only the data does);
    the CPU profile scores every position whatever it is. DPO/CITA run 2 sequences (chosen, rejected) per pair. The
    peak is the largest of four moments, each the static part (weights, LoRA params + grads + optimizer states, GRIT
    statistics, cuBLAS workspaces) plus:
    - "layer backward": what the layers keep (a checkpointed layer its input, any other its saved tensors;
      `checkpointed_layers`), the recomputed layer's saved tensors and its gradient working set (dominant for
      wide models);
    - "lm_head backward": the same stored activations plus the fused LM head's saved input (the scored positions),
      its fp32 gradient accumulator and one logits tile (dominant for small models with large vocabularies);
    - "lm_head input gradient": then the head's input gradient scattered back to every position, twice (through the
      gather or reshape, then the slice that drops the last position);
    - "optimizer step": the optimizer's temporaries.
    Gradients are counted as alive throughout: they are with gradient accumulation (after the first micro-batch).
    """
    p = _PRECISIONS[cfg.precision]
    mb = cfg.micro_batch if micro_batch is None else micro_batch
    seq = cfg.max_length if seq_len is None else seq_len
    pad = cfg.trainer.get("pad_to_multiple_of")
    if pad:  # TRL truncates to max_length, then pads up to the multiple
        seq = -(-seq // pad) * pad
    seqs = mb * (2 if cfg.method in ("dpo", "cita") else 1)
    t, h, i, a = seqs * seq, shape.hidden, shape.intermediate, p.act
    # a padding mask switches SDPA to the masked kernel (and costs seqs x seq^2 bools)
    padded = seqs > 1 or bool(pad)

    n_lora = lora_params(cfg, shape)
    state, step_tmp = _optimizer_bytes(cfg.optim, p.lora)
    adapter = n_lora * (2 * p.lora + state)  # params + grads + optimizer states
    grit = 0
    if cfg.adapter == "grit":  # ~10 r x r fp32 matrices per module (statistics, inverses, projections, caches),
        n_mod = shape.layers * len(cfg.lora.target_modules)  # plus the rank-r activation each hook holds
        grit = n_mod * (10 * cfg.lora.r ** 2 * 4 + 2 * t * cfg.lora.r * a)  # and the sampled gradient
    static = {"weights": weight_bytes(shape, cfg.precision), "adapter": adapter, "grit": grit,
              "cuda_workspaces": cuda_workspaces(cfg)}
    allocated_once = sum(static.values()) - grit  # GRIT's part holds per-step activations too

    liger = uses_liger(cfg)
    layer = _layer_saved(cfg, shape, p, t, padded, liger)
    mask = seqs * seq * seq if padded else 0
    ckpt = checkpointed_layers(cfg, shape)
    kept = shape.layers - ckpt
    stored = ckpt * a * t * h + kept * layer + mask  # a checkpointed layer keeps its input only
    if p.lora_copy:  # the graph also keeps each kept layer's bf16 autocast cast of the fp32 LoRA weights
        stored += 2 * n_lora * kept // shape.layers
    # The recompute of a checkpointed layer adds its saved tensors. Every n-th layer from the first is checkpointed;
    # when the last layer is not, the layers above the topmost checkpointed one have released theirs by then.
    recomputed = layer if ckpt and (ckpt - 1) * every_n_layers(cfg) == shape.layers - 1 else 0
    # Backward through the MLP holds two T x I gradients beyond the saved tensors (the down input's gradient from
    # the LoRA and base paths, or with fp32 LoRA its bf16 + fp32 casts; then silu's and up's while the product's
    # is alive and the down input is released), plus the gradients of the layer output and of the residual.
    mlp_bwd = 2 * a * t * i
    if p.quantized:  # bnb dequantizes down_proj's weight (bf16) for the base path's input gradient, beside the
        # LoRA path's gradient; nf4 has released the down input by then (only lora_A kept it), int8 has not
        dequant = 2 * shape.intermediate * shape.hidden
        mlp_bwd = max(mlp_bwd, (2 if p.base_saves_input else 1) * a * t * i + dequant)
    layer_bwd = mlp_bwd + 2 * a * t * h

    # The fused LM head scores the labelled positions. With Triton (a GPU) it gathers them first (`compact` in
    # trl/trainer/utils.py); without (fp32, the CPU profile) it scores every position.
    compact = not cpu_profile(cfg) and completion_len is not None
    scored = seqs * (min(completion_len, seq - 1) if compact else seq - 1)
    rows = min(scored, LM_TILE_TOKENS)
    logits = rows * LM_TILE_VOCAB * a
    if cpu_profile(cfg):
        logits += rows * min(shape.vocab, LM_TILE_VOCAB) * CPU_TILE_TEMP_BYTES
    norm = _norm_saved(p, t, h, liger)  # the final RMSNorm's
    lm_saved = norm + a * scored * h  # and the LM head's input (a copy)
    lm_bwd = 4 * scored * h + a * scored * h  # fp32 gradient accumulator of the head's input, and its cast

    zero = {"activations": 0, "logits": 0, "backward": 0, "optimizer_step": 0}
    moments = {
        "layer backward": {**zero, "activations": stored + recomputed, "backward": layer_bwd},
        "lm_head backward": {**zero, "activations": stored + lm_saved, "logits": logits, "backward": lm_bwd},
        "lm_head input gradient": {**zero, "activations": stored + norm, "backward": 2 * a * t * h},
        "optimizer step": {**zero, "optimizer_step": n_lora * step_tmp},
    }
    moment, parts = max(moments.items(), key=lambda kv: sum(kv[1].values()))
    parts = {**static, **parts}
    return MemoryEstimate(parts=parts, total=sum(parts.values()), moment=moment, static=allocated_once)


def estimate_eval(cfg: TrialConfig, shape: ModelShape, seq_len: int | None = None) -> MemoryEstimate:
    """Peak of the trial's evaluation (trainables/evaluate.sequence_logps): a no_grad forward of eval.batch_size
    sequences to the final hidden states, then the LM head over LOGITS_CHUNK_TOKENS positions at a time: one chunk of
    logits in the model's dtype, its fp32 copy and the fp32 logsumexp temporary (the research's warning, vocab x
    sequence x 4 bytes, bounded by the chunk). Evaluation does not truncate: seq_len defaults to max_length, pass
    the held-out set's longest prompt + completion when known. The static part keeps training's (the optimizer
    state, the cuBLAS workspaces). Generation (KV cache, last-token logits) is not modelled."""
    from trainables.evaluate import LOGITS_CHUNK_TOKENS

    p = _PRECISIONS[cfg.precision]
    seqs, seq = cfg.eval.batch_size, cfg.max_length if seq_len is None else seq_len
    t = seqs * seq
    state, _ = _optimizer_bytes(cfg.optim, p.lora)  # the trainer (and its optimizer state) is still alive
    static = {"weights": weight_bytes(shape, cfg.precision), "adapter": lora_params(cfg, shape) * (p.lora + state),
              "grit": 0, "cuda_workspaces": cuda_workspaces(cfg)}  # training's workspaces are kept
    # no_grad forward: one layer's transients (gate/up outputs, their product, a few hidden states, the fp32
    # LoRA input cast) and the padding mask; then the final hidden states stay while the head runs chunk by chunk
    layer = p.act * t * (3 * shape.intermediate + 4 * shape.hidden) + seqs * seq * seq
    layer += 4 * t * shape.intermediate if p.lora_copy else 0
    moments = {"layer forward": {"activations": layer, "logits": 0},
               "lm head": {"activations": p.act * t * shape.hidden,
                           "logits": min(t, LOGITS_CHUNK_TOKENS) * shape.vocab * (p.act + 4 + 4)}}
    moment, transient = max(moments.items(), key=lambda kv: sum(kv[1].values()))
    parts = {**static, **transient, "backward": 0, "optimizer_step": 0}
    return MemoryEstimate(parts=parts, total=sum(parts.values()), moment=f"evaluation {moment}",
                          static=sum(static.values()))


def trial_peak(cfg: TrialConfig, shape: ModelShape) -> MemoryEstimate:
    """The larger of the training and evaluation peaks: what a trial's share of a GPU must hold."""
    return max(estimate_peak(cfg, shape), estimate_eval(cfg, shape), key=lambda e: e.total)


# --- checkpointing ---------------------------------------------------------------------------------------------
def every_n_layers(cfg: TrialConfig) -> int:
    """Checkpoint every n-th decoder layer, from the first (transformers' `gradient_checkpointing_kwargs`
    `every_n_layers`, passed through `trainer`); 1: every layer."""
    return int(cfg.checkpointing_kwargs.get("every_n_layers", 1))


def checkpoint_every(cfg: TrialConfig) -> int:
    """The n of every_n_layers as the trial runs: 1 every layer, 0 none."""
    return every_n_layers(cfg) if cfg.gradient_checkpointing else 0


def checkpointed_layers(cfg: TrialConfig, shape: ModelShape) -> int:
    """Decoder layers that keep only their input and recompute their forward in the backward."""
    return math.ceil(shape.layers / every_n_layers(cfg)) if cfg.gradient_checkpointing else 0


def with_checkpointing(cfg: TrialConfig, every_n: int | None) -> TrialConfig:
    """cfg checkpointing every `every_n`-th layer (1: all of them), or none (None). Execution only: the loss is the
    same (tests/test_trial.py), so the trial's key stays. The n stays in the trainer's gradient_checkpointing_kwargs:
    TRL's reference pass would re-enable checkpointing with them on every layer, which trainables/dpo.py's
    `checkpointing_left_on` keeps it from doing (TRL's toggle runs only for a model that is not a PeftModel)."""
    kwargs = {k: v for k, v in cfg.checkpointing_kwargs.items() if k != "every_n_layers"}
    if every_n is not None and every_n > 1:
        kwargs["every_n_layers"] = every_n
    trainer = {k: v for k, v in cfg.trainer.items() if k != "gradient_checkpointing_kwargs"}
    trainer.update({"gradient_checkpointing_kwargs": kwargs} if kwargs else {})
    return cfg.model_copy(update={"gradient_checkpointing": every_n is not None, "trainer": trainer})


# --- planning --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    config: TrialConfig  # the trial as it runs: micro-batch, accumulation and checkpointing set
    estimate: MemoryEstimate
    # where this plan recomputes fewer layers than all: the best plan that recomputes all (the retry after an OOM);
    # not part of equality
    fallback: Plan | None = field(default=None, compare=False)

    @property
    def micro_batch(self) -> int:
        return self.config.micro_batch

    @property
    def grad_accum(self) -> int:
        return self.config.grad_accum

    @property
    def gradient_checkpointing(self) -> bool:
        return self.config.gradient_checkpointing

    @property
    def every_n_layers(self) -> int:
        return every_n_layers(self.config)


# Below ~2k tokens per micro-batch an 8B step leaves an H100 under-used: the time per token is modelled as
# (1 + SATURATION_TOKENS / tokens per micro-batch) x the FLOPs per token. Measured on the 8B shape (BENCHMARKS.md,
# 2026-11-24, s per step of 8 sequences or pairs at seq 1024, H100), against checkpointing at micro-batch 8:
# DPO without it at micro-batch 4 0.83x (same VM; the model says 0.82), at 1 1.10x (model 1.27); SFT without it at
# 4 0.79x and at 8 0.72x (model 0.79, 0.67), at 2 1.14x (model 1.03). A rough model, to choose between a few plans,
# not to predict times; so checkpointing fewer layers than all is chosen only for a clear predicted gain
# (LESS_CHECKPOINTING_GAIN): DPO without it at micro-batch 2 read 0.93x, across two VMs that differed by more than
# that (model 0.97).
SATURATION_TOKENS = 1800
LESS_CHECKPOINTING_GAIN = 0.10


def flops_per_token(cfg: TrialConfig, shape: ModelShape) -> tuple[float, float]:
    """(model, hardware) matmul FLOPs per processed token in units of the weights: forward 2 + input-grad backward 2
    (frozen base), + DPO/CITA's reference forward 2 unless precomputed (TRL's precompute_ref_log_probs); hardware
    adds the checkpointing recompute, 2 x the fraction of layers checkpointed."""
    model = 4 + (2 if cfg.method != "sft" and not cfg.trainer.get("precompute_ref_log_probs") else 0)
    return model, model + 2 * checkpointed_layers(cfg, shape) / shape.layers


def relative_step_time(cfg: TrialConfig, shape: ModelShape) -> float:
    """A step's time up to a constant factor, to rank plans of one trial: hardware FLOPs per token times the
    under-use of small micro-batches (sequences taken at max_length)."""
    tokens = cfg.micro_batch * cfg.max_length * (1 if cfg.method == "sft" else 2)
    return flops_per_token(cfg, shape)[1] * (1 + SATURATION_TOKENS / tokens)


# Precisions whose estimate without checkpointing was checked on a GPU (8B bf16: -1% to +4%, BENCHMARKS.md
# 2026-11-24). nf4/int8 keep the trial's checkpointing until theirs is: an estimate too low would surface as an
# out-of-memory error when the longest batch comes, possibly late in the trial.
PLANS_CHECKPOINTING = ("bf16",)


def checkpointing_variants(cfg: TrialConfig, shape: ModelShape) -> list[TrialConfig]:
    """The checkpointing settings open to the trial, most recomputation first. Checkpointing changes memory and
    time, not the result, so a trial's True opens (in PLANS_CHECKPOINTING precisions) every layer, every n-th
    layer for each count of layers that gives, and none; False, or an every_n_layers the trial sets, only itself."""
    if (not cfg.gradient_checkpointing or cfg.precision not in PLANS_CHECKPOINTING
            or "every_n_layers" in cfg.checkpointing_kwargs):
        return [cfg]
    smallest_n: dict[int, int] = {}  # layers checkpointed -> the smallest n checkpointing that many
    for n in range(1, shape.layers + 1):
        smallest_n.setdefault(math.ceil(shape.layers / n), n)
    return [with_checkpointing(cfg, n) for n in smallest_n.values()] + [with_checkpointing(cfg, None)]


def plan_options(cfg: TrialConfig, shape: ModelShape, budget_bytes: int,
                 max_micro_batch: int | None = None) -> list[Plan]:
    """For each checkpointing setting open to the trial (`checkpointing_variants`, in that order), the largest
    micro-batch dividing its effective batch (micro_batch x grad_accum, kept unchanged) whose estimate plus
    headroom fits `budget_bytes`."""
    effective = cfg.micro_batch * cfg.grad_accum
    limit = effective if max_micro_batch is None else min(effective, max_micro_batch)
    options = []
    for variant in checkpointing_variants(cfg, shape):
        for mb in (d for d in range(limit, 0, -1) if effective % d == 0):
            est = estimate_peak(variant, shape, micro_batch=mb)
            if required_bytes(est) <= budget_bytes:
                options.append(Plan(variant.model_copy(update={"micro_batch": mb, "grad_accum": effective // mb}),
                                    est))
                break
    return options


def plan(cfg: TrialConfig, shape: ModelShape, budget_bytes: int, max_micro_batch: int | None = None) -> Plan:
    """Of `plan_options`, the most checkpointed one, unless one recomputing fewer layers is predicted faster by at
    least LESS_CHECKPOINTING_GAIN (`relative_step_time`) at no less than half its micro-batch: then the fastest
    such. The half guards the model's weak side: it takes sequences at max_length, and real batches are shorter,
    which under-uses small micro-batches more than it predicts."""
    options = plan_options(cfg, shape, budget_bytes, max_micro_batch)
    if not options:
        est = estimate_peak(cfg, shape, micro_batch=1)
        raise ValueError(
            f"{cfg.model} ({cfg.precision}, {cfg.method}, max_length {cfg.max_length}) does not fit: micro_batch=1 "
            f"needs {required_bytes(est) / GiB:.2f} GiB (estimate {est.gib:.2f} GiB + headroom) but the budget is "
            f"{budget_bytes / GiB:.2f} GiB")
    base, *others = options

    def time(p: Plan) -> float:
        return relative_step_time(p.config, shape)

    faster = [p for p in others if 2 * p.micro_batch >= base.micro_batch
              and time(p) <= (1 - LESS_CHECKPOINTING_GAIN) * time(base)]
    return replace(min(faster, key=time), fallback=base) if faster else base


def gpu_fraction(estimate: MemoryEstimate, gpu_bytes: int, max_per_gpu: int = 16) -> float:
    """Smallest 1/k (k <= max_per_gpu) of a GPU of gpu_bytes whose share holds the estimate plus headroom: Ray's
    fractional GPU resource for packing k trials per GPU."""
    need = required_bytes(estimate)
    if need > gpu_bytes:
        raise ValueError(f"needs {need / GiB:.2f} GiB (estimate {estimate.gib:.2f} GiB + headroom), more than "
                         f"the GPU's {gpu_bytes / GiB:.2f} GiB")
    return 1.0 / min(max_per_gpu, gpu_bytes // need)
