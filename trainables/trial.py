"""One trial: model at precision -> method trainer (TRL) with the adapter -> train -> evaluate -> log to MLflow.

`run_trial` is what Ray Tune calls on a worker (through sweeps.runner); it is a plain function, so tests and
notebooks can call it directly too. A trial whose training runs out of GPU memory is retried in the same
MLflow run (`after_oom`): at the planner's plan checkpointing every layer if it had planned fewer, then
with half the micro-batch and twice the accumulation (same effective batch), down to micro-batch 1.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from trainables import cita, data, dpo, evaluate, lora, memory, precision, sft, tracking, warm_model
from trainables.config import TrialConfig
from trainables.models import cache_root, load_tokenizer
from trainables.pinned_copies import pinned_small_copies
from trainables.stack_sampler import StackSampler

METHOD_TRAINERS = {"sft": sft.build_trainer, "dpo": dpo.build_trainer, "cita": cita.build_trainer}
# Trials this process started: any, and it is a reused (warm) Ray worker, with torch/TRL imported and caches filled.
# Their (method, adapter, precision): this kind's first-use costs (TRL's Triton kernels, quantization kernels,
# GRIT's hooks) were paid too, which a kind's first trial here pays in its first step even on a warm worker.
_trials_in_this_process = 0
_kinds_in_this_process: set[tuple[str, str, str]] = set()
_frozen = False  # see _freeze_once
_this_thread = threading.local()  # .trials: trials this thread started (per-thread caches: sweeps.runner._TrialThread)


class TrainingOOM(RuntimeError):
    """Training (not evaluation) ran out of GPU memory: checkpointing or a smaller micro-batch may fit."""


def prepare(cfg: TrialConfig, workdir: str, callbacks=(), train_ds=None, reuse_base_model: bool = False):
    """Seeded base model at precision + the method's TRL trainer with the adapter, ready to train (bench/ times this
    too). `train_ds` replaces the config's data (already in TRL's format). reuse_base_model: take the base model an
    earlier trial in this process left (trainables/warm_model.py; `trainer.base_model_source` says "reused" or
    "loaded"). Returns (trainer, tokenizer, held_out)."""
    from transformers import PrinterCallback, set_seed

    set_seed(cfg.seed)  # python, numpy, torch: SFT's LoRA init, data sampling (TRL re-seeds with it for DPO/CITA)
    tokenizer = load_tokenizer(cfg.model)
    train_raw, held_out = data.load_preferences(cfg.data, cfg.n_train, cfg.n_eval, cfg.data_seed)
    if train_ds is None:
        train_ds = data.cached_trl(train_raw, cfg.template, tokenizer, cfg.method, cache_root() / "trl_datasets",
                                   max_prompt_tokens=cfg.max_prompt_length)
    with pinned_small_copies():  # small host-to-GPU copies queued, not waited for (a packed GPU serves each wait late)
        if reuse_base_model:
            model, reused = warm_model.take(cfg)
        else:
            warm_model.drop()  # a model an earlier trial here kept would sit beside this one's on the GPU
            model, reused = precision.load_model(cfg), False
    lora.check_targets(model, cfg)
    trainer = METHOD_TRAINERS[cfg.method](cfg, model, tokenizer, train_ds, workdir, callbacks)  # pins its LoRA moves
    trainer.base_model_source = "reused" if reused else "loaded"
    trainer.remove_callback(PrinterCallback)  # metrics go to MLflow and Tune, not as dicts on stdout
    return trainer, tokenizer, held_out


def _step_clock(started: float, name: str = "trial"):
    """Times the per-trial overhead and the steps, from `started` (trial start): to_first_step = before_first_step
    (setup, entering the loop, the first batch, and the device finishing what setup queued) + first_step (the
    step itself, between two CUDA syncs: first-use costs on a GPU show there); later_steps = end of step 1 -> end
    of the last step (what a longer run of this trial adds per step), later_step = its mean per step.
    first_step_cpu_s: the training thread's own CPU time in step 1. Far below first_step_s, the thread waited (a
    lock, the GIL held by another thread, I/O); close to it is ambiguous, since CUDA's default spin-wait for the
    device counts as CPU time too. first_step_gc_s: the process's garbage collections during step 1 (in any
    thread: a collection stops them all), whose cost grows with everything alive in the process. On a GPU,
    sys/first_step_cuda_mallocs: the cudaMalloc calls the caching allocator made in step 1.

    With $ALIGNSWEEP_PROFILE_STEP1 set to a directory, the training thread's stack is sampled through step 1
    (trainables/stack_sampler.py, every 2 ms; also inside a Ray worker) and saved there as
    `{name}-{pid}-{n}.folded` (n: the worker_trial tag), and from this clock's creation (the trial's setup, after
    its MLflow run started) to step 1 as the same name under `before_step1/`; bench/step1_profiles.py compares
    groups of them. Give an absolute path: Ray Tune runs each trial in its own working directory. Such trials log
    sys/first_step_sampled, since the sampler's GIL share (a few % on Python-bound code) is in their times."""
    from transformers import TrainerCallback

    profile_dir = os.environ.get("ALIGNSWEEP_PROFILE_STEP1")
    sampler = StackSampler(threading.get_ident()).start() if profile_dir else None

    def save(samples: StackSampler, directory: str):
        try:  # a profile is never worth a trial
            Path(directory).mkdir(parents=True, exist_ok=True)
            samples.dump(f"{directory}/{name}-{os.getpid()}-{_trials_in_this_process - 1}.folded")
        except OSError as err:
            print(f"stack samples not saved: {err}", flush=True)

    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _cuda_mallocs() -> int:  # segments the caching allocator got from cudaMalloc so far (a slow driver call)
        return torch.cuda.memory_stats().get("segment.all.allocated", 0) if torch.cuda.is_available() else 0

    class StepClock(TrainerCallback):
        first_begin = first_end = later_from = last_end = first_cpu = setup_samples = _time_gc = None
        first_mallocs = 0
        later = 0  # steps after the first
        first_gc = 0.0

        def _add_gc(self, info, seconds):
            self.first_gc += seconds

        def on_step_begin(self, args, state, control, **kwargs):
            if self.first_begin is None:
                _sync()  # once per trial, at both ends of step 1: the step alone, its device work included
                self._time_gc = gc_pause_timer(self._add_gc)
                gc.callbacks.append(self._time_gc)
                self.first_mallocs = _cuda_mallocs()
                if profile_dir:
                    nonlocal sampler
                    self.setup_samples = sampler.stop()  # saved after step 1, out of the times
                    sampler = StackSampler(threading.get_ident()).start()
                self.first_begin, self.first_cpu = time.perf_counter(), time.thread_time()

        def on_step_end(self, args, state, control, **kwargs):
            if self.first_end is None:
                _sync()
                self.first_end = self.later_from = self.last_end = time.perf_counter()
                self.first_cpu = time.thread_time() - self.first_cpu
                self.first_mallocs = _cuda_mallocs() - self.first_mallocs
                self.stop_probes()
                if sampler is not None:
                    save(self.setup_samples, f"{profile_dir}/before_step1")
                    save(sampler, profile_dir)
                    self.later_from = self.last_end = time.perf_counter()  # later steps leave out the write
            else:
                self.last_end = time.perf_counter()
                self.later += 1

        def stop_probes(self):  # after step 1, or when training fails inside it
            if self._time_gc in gc.callbacks:
                gc.callbacks.remove(self._time_gc)
            if sampler is not None:
                sampler.stop()

        def metrics(self) -> dict[str, float]:
            if self.first_end is None:  # no step finished
                return {}
            return {"time/to_first_step_s": self.first_end - started,
                    "time/before_first_step_s": self.first_begin - started,
                    "time/first_step_s": self.first_end - self.first_begin,
                    "time/first_step_cpu_s": self.first_cpu, "time/first_step_gc_s": self.first_gc,
                    "time/later_steps_s": self.last_end - self.later_from,
                    **({"time/later_step_s": (self.last_end - self.later_from) / self.later} if self.later else {}),
                    **({"sys/first_step_cuda_mallocs": self.first_mallocs} if torch.cuda.is_available() else {}),
                    **({"sys/first_step_sampled": 1.0} if sampler is not None else {})}  # its times include it

    return StepClock()


def gc_pause_timer(on_pause: Callable[[dict, float], None]):
    """A gc.callbacks entry that calls on_pause(info, seconds) after each collection (info: its generation...)."""
    started = None

    def timer(phase, info):
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        elif started is not None:
            on_pause(info, time.perf_counter() - started)
            started = None

    return timer


def train_and_evaluate(cfg: TrialConfig, workdir: str, callbacks=(), on_trainer=None, started: float | None = None,
                       reuse_base_model: bool = False):
    """Train one config and evaluate it; returns (model, tokenizer, items, metrics, global_step).

    metrics include time/* seconds per phase (setup, train, eval) and the step clock's (see `_step_clock`), so
    per-trial overhead is measured."""
    clock = time.perf_counter()
    steps = _step_clock(started if started is not None else clock, f"{cfg.method}-{cfg.adapter}-{cfg.precision}")
    try:
        trainer, tokenizer, held_out = prepare(cfg, workdir, [*callbacks, steps], reuse_base_model=reuse_base_model)
        if on_trainer is not None:
            on_trainer(trainer)
        phases = {"time/setup_s": time.perf_counter() - clock}
        _freeze_first_trial()
        clock = time.perf_counter()
        try:
            trainer.train()
        except torch.OutOfMemoryError as err:
            raise TrainingOOM(f"{plan_text(cfg)}: {err}") from None
    finally:
        steps.stop_probes()
    phases["time/train_s"] = time.perf_counter() - clock
    phases.update(steps.metrics())
    clock = time.perf_counter()
    items, metrics = evaluate.evaluate(trainer.model, tokenizer, held_out, cfg)
    phases["time/eval_s"] = time.perf_counter() - clock
    return trainer.model, tokenizer, items, {**metrics, **phases}, trainer.state.global_step


def free_memory():
    """Give a finished or failed attempt's memory back (a reused worker runs the next trial in this process).
    A failed attempt's objects are garbage only once its traceback is: call this after the except block too."""
    if not _frozen:
        gc.unfreeze()  # what _freeze_first_trial froze, this attempt's model with it, becomes collectable again
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _freeze_first_trial():
    """In a process's first trial (nothing frozen for good yet, see _freeze_once), what lives once its trainer is
    built (imports, its model and trainer) is frozen until free_memory: Python's full collections while it trains
    then walk ~6.5k objects, not ~840k. On the 8B shape: 0.03 s in 60 dpo-nf4 steps against 1.2 s (2.5% of the
    training; bench/gc_census.py). Collected first, so no garbage is frozen with it (a failed trial's model, held
    by a cycle, included); that walk replaces accelerate's at the start of train(), which then walks little."""
    if not _frozen:
        gc.collect()
        gc.freeze()


def _freeze_once():
    """After this process's first finished trial, freeze what is alive (imported torch/transformers/TRL, caches:
    nearly all of a warm worker's heap) out of the garbage collector's view, so the full collection each
    trainer.train() starts with (accelerate's free_memory) skips it: ~0.5 s of every later trial's start
    (bench/first_step.py). Once only: whatever is frozen is never collected, so a caller's per-trial objects
    (Ray's session, a callback) that die in reference cycles would leak at every freeze. Not after a failure: its
    traceback still holds the trial's model."""
    global _frozen
    if not _frozen:
        gc.freeze()
        _frozen = True


def after_oom(attempt: TrialConfig, checkpointed: TrialConfig | None) -> TrialConfig | None:
    """The next attempt after running out of memory, at the same effective batch, or None when nothing is left:
    the planner's plan checkpointing every layer (`checkpointed`) where it had planned fewer, else half the
    micro-batch, twice the accumulation."""
    if checkpointed is not None and memory.checkpoint_every(attempt) != 1:
        return checkpointed
    if attempt.micro_batch == 1:
        return None
    return attempt.model_copy(update={"micro_batch": attempt.micro_batch // 2, "grad_accum": attempt.grad_accum * 2})


def run_trial(config: dict, label: str, tracking_uri: str, experiment_id: str, parent_run_id: str | None = None,
              report: Callable[[dict], None] | None = None, threads: int | None = None,
              variant: str = "", gpu_share: float = 1.0, plan_micro_batch: bool = False,
              pad_to_multiple_of: int | None = None, cudnn_attention: bool = True, reference_cache: bool = False,
              reuse_base_model: bool = False, liger_kernel: bool = False, callbacks=()) -> dict[str, float]:
    """Run one trial, filed as an MLflow child run. A failure is recorded on the run, then re-raised.

    gpu_share: the fraction of the GPU this trial was given (Ray's fractional GPU). plan_micro_batch: train at the
    micro-batch and checkpointing the memory planner picks for that share (`memory.plan`), at the same effective
    batch. pad_to_multiple_of: pad batches to a multiple of this many tokens unless the config's trainer knobs say
    (fewer shapes for cuDNN's attention graphs; the loss is the same). cudnn_attention=False: SDPA without cuDNN's
    kernels, for this process (no graph builds per shape). reference_cache: DPO/CITA read the reference log-probs
    from the cache shared across trials (trainables/reference.py) unless the config's trainer knobs say.
    reuse_base_model: train on the base model this process's last trial left, when of the same model and precision
    (trainables/warm_model.py), and leave this one's for the next. liger_kernel: Liger's kernels for RMSNorm, SwiGLU
    and RoPE on a GPU (`use_liger_kernel`) unless the config's trainer knobs say (Liger's patches of transformers'
    modules are undone after the trial). These change how the trial runs, not its key.
    callbacks: more transformers TrainerCallbacks for its trainer (bench/first_step.py profiles with one)."""
    global _trials_in_this_process
    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    if torch.cuda.is_available():  # per-trial peak, also on a reused worker
        torch.cuda.reset_peak_memory_stats()
        torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)
    cfg = TrialConfig(**config)
    client = tracking.client(tracking_uri)
    kind = (cfg.method, cfg.adapter, cfg.precision)
    thread_trials = getattr(_this_thread, "trials", 0)
    run_id = tracking.start_trial_run(client, experiment_id, parent_run_id, cfg, label, variant, execution={
        "gpu_share": f"{gpu_share:.4g}", "warm_worker": str(_trials_in_this_process > 0).lower(),
        "warm_kind": str(kind in _kinds_in_this_process).lower(),
        # which process ran it, and its how-manieth trial there (0: the process's first)
        "worker_pid": str(os.getpid()), "worker_trial": str(_trials_in_this_process),
        "thread_trial": str(thread_trials),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        **({} if cudnn_attention else {"exec_cudnn_attention": "false"}),
        **({"exec_reuse_base_model": "true"} if reuse_base_model else {})})
    _kinds_in_this_process.add(kind)
    _trials_in_this_process += 1
    _this_thread.trials = thread_trials + 1
    metrics = _run_attempts(cfg, label, client, run_id, report, started, gpu_share, plan_micro_batch,
                            pad_to_multiple_of, reference_cache, reuse_base_model, liger_kernel, callbacks)
    _freeze_once()
    if report is not None:
        report({k.replace("/", "_"): v for k, v in metrics.items()} | {"done": True})
    return metrics


def _run_attempts(cfg, label, client, run_id, report, started, gpu_share, plan_micro_batch, pad_to_multiple_of,
                  reference_cache, reuse_base_model, liger_kernel, callbacks) -> dict:
    """The trial's attempts: OOM in training retries as `after_oom` says."""
    attempt, checkpointed, retries = cfg, None, 0
    try:
        execution = {}  # trainer knobs that change how the trial runs, not its result (the config's own win)
        if pad_to_multiple_of:
            execution["pad_to_multiple_of"] = pad_to_multiple_of
        if reference_cache and cfg.method in ("dpo", "cita"):
            execution["precompute_ref_log_probs"] = True
        if liger_kernel and torch.cuda.is_available() and cfg.precision in memory.LIGER_PRECISIONS:
            if importlib.util.find_spec("liger_kernel"):
                execution["use_liger_kernel"] = True
            else:  # a profile's speed-up, not the trial's definition: train without it, and say so
                print(f"{label}: liger-kernel is not installed (pip install -e '.[gpu]'): training without its "
                      "kernels", flush=True)
        execution = {k: v for k, v in execution.items() if k not in cfg.trainer}
        if execution:
            attempt = cfg.model_copy(update={"trainer": {**cfg.trainer, **execution}})
            tracking.set_tags(client, run_id, {f"exec_{k}": v for k, v in execution.items()})
        if plan_micro_batch:
            attempt, checkpointed = _planned(attempt, gpu_share, client, run_id)
        while True:
            tracking.set_tags(client, run_id, {"exec_micro_batch": attempt.micro_batch,
                                               "exec_grad_accum": attempt.grad_accum,
                                               "exec_gradient_checkpointing":
                                                   str(attempt.gradient_checkpointing).lower(),
                                               "exec_checkpoint_every_n_layers": memory.checkpoint_every(attempt)})
            try:
                metrics = _attempt(attempt, client, run_id, report, started, {"sys/oom_retries": retries},
                                   reuse_base_model, callbacks)
                break
            except TrainingOOM as err:
                following = after_oom(attempt, checkpointed)
                if following is None:
                    raise
                message = str(err)
            # out of the except block: the traceback (and the model it holds) is gone, so memory can be freed
            free_memory()
            retries += 1
            attempt = following
            change = plan_text(attempt)
            tracking.set_tags(client, run_id, {"oom_retries": retries,
                                               f"oom_retry_{retries}": f"-> {change} after {message}"})
            print(f"{label}: out of GPU memory; retrying with {change}", flush=True)
    except BaseException as err:
        tracking.fail_trial_run(client, run_id, err)
        raise
    finally:  # a reused Ray worker runs the next trial in this process: give its memory back
        free_memory()
    return metrics


@contextlib.contextmanager
def _module_patches_undone(cfg: TrialConfig):
    """Liger patches transformers' modeling modules for the whole process (its RoPE function, RMSNorm and MLP
    classes), besides each model instance: put the modules back after a trial that used it, so that a later trial's
    layers do not depend on which trials this worker ran before (warm_model undoes a kept model's instance
    patches)."""
    if not memory.uses_liger(cfg):
        yield
        return
    modules = {name: module for name, module in list(sys.modules.items())
               if name.startswith("transformers.models.") and ".modeling_" in name}
    saved = {name: dict(vars(module)) for name, module in modules.items()}
    try:
        yield
    finally:
        for name, module in modules.items():
            for key, value in saved[name].items():
                if vars(module).get(key) is not value:
                    setattr(module, key, value)


def plan_text(cfg: TrialConfig) -> str:
    every_n = memory.checkpoint_every(cfg)
    return (f"micro_batch={cfg.micro_batch} grad_accum={cfg.grad_accum} gradient_checkpointing="
            f"{str(cfg.gradient_checkpointing).lower()}" + (f" every_n_layers={every_n}" if every_n > 1 else ""))


def _planned(cfg: TrialConfig, gpu_share: float, client, run_id: str) -> tuple[TrialConfig, TrialConfig | None]:
    """The config at the memory planner's micro-batch and checkpointing for this trial's share of the GPU, and,
    where the plan checkpoints fewer layers than all, the planner's plan checkpointing all (the fallback on OOM:
    it needs far less activation memory, even at a larger micro-batch)."""
    if not torch.cuda.is_available():  # CPU trials train as configured
        return cfg, None
    budget = int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory * gpu_share)
    chosen = memory.plan(cfg, memory.model_shape(cfg.model), budget)
    client.set_tag(run_id, "memory_plan", f"{plan_text(chosen.config)}: estimated peak {chosen.estimate.gib:.1f} "
                   f"GiB of a {budget / 2**30:.1f} GiB share")
    return chosen.config, (chosen.fallback.config if chosen.fallback else None)


def _attempt(cfg: TrialConfig, client, run_id: str, report, started: float, extra: dict,
             reuse_base_model: bool = False, callbacks=()) -> dict[str, float]:
    """Train, evaluate and file one attempt of a trial; returns its metrics."""
    grit_controller = []

    def attach_adapter_extras(trainer):
        client.set_tag(run_id, "base_model", trainer.base_model_source)  # "reused": this process's last trial's
        if getattr(trainer, "reference_cache", None):  # trainables/reference.py: "hit" or "miss" (its pass is
            client.set_tag(run_id, "reference_cache", trainer.reference_cache)  # in time/setup_s)
        if cfg.adapter == "grit":
            from trainables import grit
            grit_controller.append(grit.attach(trainer, cfg.grit))

    def extra_metrics():
        return grit_controller[0].metrics() if grit_controller else {}

    logger = tracking.step_logger(client, run_id, report, extra_metrics)
    with tempfile.TemporaryDirectory() as workdir, _module_patches_undone(cfg):
        try:
            model, _, items, metrics, step = train_and_evaluate(cfg, workdir, [logger, *callbacks],
                                                                attach_adapter_extras, started, reuse_base_model)
        finally:
            logger.flush()  # the failed attempt's steps too
        metrics.update(extra_metrics(), **extra)
        metrics["time/report_wait_s"] = logger.report_wait_s  # inside train: Tune's blocking progress reports
        metrics["eval/trial_seconds"] = time.perf_counter() - started
        if torch.cuda.is_available():
            metrics["sys/peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        model.save_pretrained(f"{workdir}/adapter")
        if grit_controller:  # rank and top eigenvalues per module (the metrics summarize them per projection type)
            client.log_dict(run_id, grit_controller[0].module_stats(), "grit_modules.json")
        tracking.finish_trial_run(client, run_id, metrics, items, f"{workdir}/adapter", step)
    if reuse_base_model:
        try:
            differs = warm_model.keep(model)
        except Exception as err:  # reuse is an optimisation: a finished trial stays finished
            differs = f"{type(err).__name__}: {err}"
        if differs:  # the next trial in this process loads its own
            client.set_tag(run_id, "base_model_kept", f"false: {differs}"[:500])
    return metrics
