"""Profiles: where a study runs. A profile sets model, data size, steps and per-trial resources; study
scripts run unchanged under any of them (`--profile local|gpu|lambda|tacc`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainables.models import EMBEDDED

PROFILE_NAMES = ("local", "gpu", "lambda", "tacc")

# The research's 8B settings (STUDY.md): Llama-3.1-8B, PKU-SafeRLHF, 300 steps, micro-batch 1 x accumulation 8.
_CLUSTER = {"model": "meta-llama/Meta-Llama-3.1-8B", "data": "pku_saferlhf", "n_train": 10_813, "n_eval": 512,
            "micro_batch": 1, "grad_accum": 8, "max_length": 2048, "max_prompt_length": 1024,
            "eval": {"n_generate": 256, "max_new_tokens": 128, "batch_size": 32}}


@dataclass(frozen=True)
class Profile:
    name: str
    overrides: dict[str, Any]                 # TrialConfig fields every trial gets (a spec may override)
    cpus_per_trial: float
    gpus_per_trial: float                     # fractions pack several trials on one GPU (the most with pack_by_memory)
    precisions: tuple[str, ...]               # what "the precisions the machine supports" means here
    step_scale: float = 1.0                   # shrinks max_steps for small profiles, keeping ratios
    description: str = ""
    # Memory planner (trainables/memory.py). pack_by_memory: each trial's GPU share is the smallest 1/k of a GPU
    # that holds its estimated peak (CPUs per trial then bound how many run at once). plan_micro_batch: a trial
    # trains at the largest micro-batch its share holds, same effective batch, checkpointing fewer layers or none
    # where that fits and is predicted clearly faster (trainables.memory.plan; execution only: same trial key).
    pack_by_memory: bool = False
    plan_micro_batch: bool = False
    gpu_mem_gib: float | None = None          # memory of one GPU for packing; None = this machine's GPU 0
    # Batches padded to a multiple of this many tokens (execution only: same loss, same trial key; a spec's
    # trainer.pad_to_multiple_of wins). cuDNN builds attention graphs per batch shape, 50-80 ms each per thread,
    # which costs a 135M model more than the padding: the local GPU profile's packed sweep ran 785 trials/h against
    # 582 unpadded (BENCHMARKS.md, 2026-11-24 evening; with cuDNN's attention, on by then). The `gpu` and 8B
    # profiles leave it off: not measured there.
    pad_to_multiple_of: int | None = None
    # False: SDPA without cuDNN's attention kernels (execution only: same trial key), whose graphs are built per
    # batch shape and per thread on the CPU. The local GPU profile's 16 packed SmolLM2 trials without them: warm
    # step 1 0.8 s against 3.8 (median), ~+12% trials/h (BENCHMARKS.md, 2026-11-24 midday; bench/packing.py
    # --mode packed packed-no-cudnn). The 8B profiles keep them: not measured there.
    cudnn_attention: bool = True
    # DPO/CITA trials read the reference log-probs from a cache shared by the trials of one model, precision and
    # training set (trainables/reference.py; execution only), under ALIGNSWEEP_CACHE: per machine, unless that is
    # on storage the nodes share. It computes them once for the whole training set: worth it where the trials
    # sharing one train on more pairs than the set holds (the study's matrix: 12 DPO/CITA trials of 2,400 pairs each
    # per precision, against 10,813 pairs computed once, when they run on one machine or share the cache).
    reference_cache: bool = False
    # A reused worker's next trial of the same model and precision trains on the base model its last trial left,
    # with a fresh adapter (trainables/warm_model.py; execution only: same losses, same trial key). On a GPU: warm
    # 8B trials reach the end of step 1 in 1.6-2.4 s against 4.0-4.4 s loading (BENCHMARKS.md, 2026-11-24 afternoon).
    reuse_base_model: bool = True
    # Liger's Triton kernels for RMSNorm, SwiGLU and RoPE on GPU trials (transformers' `use_liger_kernel`; execution
    # only, same trial key; needs the `gpu` extra's liger-kernel). The planner counts the smaller activations, so on
    # an 80 GB H100 the 8B step needs no checkpointing: DPO 1.773 -> 1.392 s, SFT 0.706 s at micro-batch 8 (4.6x and
    # 6.6x bare TRL batch 1; BENCHMARKS.md, 2026-11-24 15:40-17:10). The SmolLM2 profiles leave it off: each fresh
    # worker compiles the kernels, unmeasured there.
    liger_kernel: bool = False

    def execution(self) -> dict[str, Any]:
        """What this profile changes in how each trial runs, not in what it is: trainables.trial.run_trial's
        keyword arguments."""
        return {"plan_micro_batch": self.plan_micro_batch, "pad_to_multiple_of": self.pad_to_multiple_of,
                "cudnn_attention": self.cudnn_attention, "reference_cache": self.reference_cache,
                "reuse_base_model": self.reuse_base_model, "liger_kernel": self.liger_kernel}

    @property
    def cuda(self) -> bool:
        return self.gpus_per_trial > 0


def _local() -> Profile:
    import os

    import torch

    # SmolLM2-135M on generated data: the 18-trial multi-seed study fits 20 minutes on 2 CPU cores. Measured
    # there (1 thread per trial, 2 trials at once): ~3-4 s per SFT step, ~10 s per DPO/CITA step at micro-batch 2,
    # and ~1.5 s per held-out pair scored; hence 8 steps (the research's 300 x 8/300), 24 pairs, 8 generations.
    # The model's own chat template: Llama-3's header markers are plain text to SmolLM2's tokenizer and
    # would double every sequence's length.
    small = {"model": EMBEDDED, "data": "generated", "template": "model", "n_train": 512, "n_eval": 24,
             "micro_batch": 2,
             "grad_accum": 1, "max_length": 128, "max_prompt_length": 96, "gradient_checkpointing": False,
             "warmup_steps": 1, "eval": {"n_generate": 8, "max_new_tokens": 24, "batch_size": 8}}
    if torch.cuda.is_available():
        return Profile("local", small, cpus_per_trial=1, gpus_per_trial=1, precisions=("bf16", "nf4"),
                       step_scale=0.2, pack_by_memory=True, pad_to_multiple_of=64, cudnn_attention=False,
                       description="one local GPU, SmolLM2 trials packed on it by estimated memory")
    cpus = os.cpu_count() or 2
    # No base-model reuse: SmolLM2 loads in 0.1-0.3 s from the page cache, and checking a kept model costs as much
    # (BENCHMARKS.md, 2026-11-24 afternoon, CPU).
    return Profile("local", small, cpus_per_trial=max(1, cpus // 2), gpus_per_trial=0, precisions=("fp32",),
                   step_scale=8 / 300, reuse_base_model=False,
                   description=f"CPU only ({cpus} cores), 2 trials at a time, fp32")


def get(name: str) -> Profile:
    if name == "local":
        return _local()
    if name == "gpu":
        medium = {"model": EMBEDDED, "data": "generated", "template": "model", "n_train": 4096, "n_eval": 256,
                  "micro_batch": 8,
                  "grad_accum": 1, "max_length": 512, "max_prompt_length": 256,
                  "eval": {"n_generate": 128, "max_new_tokens": 128, "batch_size": 64}}
        return Profile("gpu", medium, cpus_per_trial=2, gpus_per_trial=1, precisions=("bf16", "nf4"),
                       step_scale=0.5, pack_by_memory=True,
                       description="one GPU node, SmolLM2 trials packed on each GPU by estimated memory")
    if name == "lambda":
        return Profile("lambda", _CLUSTER, cpus_per_trial=8, gpus_per_trial=1, precisions=("bf16", "nf4"),
                       plan_micro_batch=True, reference_cache=True, liger_kernel=True,
                       description="Lambda Cloud Ray cluster (cluster/lambda.yaml), one GPU per 8B trial")
    if name == "tacc":
        return Profile("tacc", _CLUSTER, cpus_per_trial=8, gpus_per_trial=1, precisions=("bf16", "nf4"),
                       plan_micro_batch=True, reference_cache=True, liger_kernel=True,
                       description="TACC SLURM allocation (cluster/tacc/), one GPU per 8B trial")
    raise ValueError(f"profile = {name!r}; allowed values: {', '.join(PROFILE_NAMES)}")
