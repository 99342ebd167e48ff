"""GRIT vs LoRA step time and peak memory, side by side in one process, with real TRL trainers.

    python bench/grit_speed.py                       # GPU: Llama-3-8B shape, seq 1024, bf16 and nf4, SFT and DPO
    python bench/grit_speed.py --cases sft-bf16 dpo-bf16 --stress
    python bench/grit_speed.py --tiny --warmup 50 --steps 10   # CPU smoke run of the same code, tiny shape

The model is built from a LlamaConfig with random weights (no hub): bf16 directly on the GPU; nf4 by saving
that random checkpoint once to local disk and loading it with a BitsAndBytesConfig (NF4, double quant, bf16
compute), the way trials load a real model. LoRA r16/alpha16 on all seven projections, gradient
checkpointing, batch 1, one micro-batch per step, adamw_torch. Every case is a real TRL SFTTrainer or
DPOTrainer (DPO: PEFT reference = adapters disabled) on synthetic token sequences of exactly --seq tokens
(DPO: prompt seq/2 + completion seq/2, chosen and rejected).

LoRA and GRIT run in ONE trainer per case, alternating in ABBA blocks of --block steps (see `schedule`), so
drift within a run (clocks, host load, allocator) hits both alike; a LoRA step is the same trainer with every
GRIT hook taken off. GRIT runs the research's defaults (sample_every=15, factor refresh and reprojection
every 50, every feature on, metrics() read at every step as trials log it): --warmup 50 GRIT steps first,
so every timed GRIT step is preconditioned and the timed window (--steps 50) holds a refresh + reprojection
at GRIT step 100 and three sampled steps. --stress adds a labelled second row: a second controller at
sample_every=1, refresh + reprojection every 5 steps, with its own interleaved LoRA blocks. Step time is
measured between on_step_begin and on_step_end with a CUDA sync at both ends; the table reports mean
(includes the sampled and refresh steps), median and the per-step overhead GRIT - LoRA. Peak memory:
torch.cuda.max_memory_allocated per step, maximum over a variant's timed steps (GRIT's few MiB of statistics
stay allocated during LoRA steps too). A failing case prints its error and the others still run. Appends
a table to BENCHMARKS.md.

GPU timing (about 300 s per precision on an H100, so one command each):
    python bench/grit_speed.py --cases sft-bf16 dpo-bf16 --stress
    python bench/grit_speed.py --cases sft-nf4 dpo-nf4 --stress
Where the overhead goes and how noisy a ratio is (--control: a LoRA-vs-LoRA row in the same alternation;
--profile N: N LoRA and N GRIT steps under torch.profiler, CPU self time vs GPU kernel time and the operators
GRIT adds):
    python bench/grit_speed.py --cases sft-bf16 --steps 100 --block 1 --control --profile 3
"""
from __future__ import annotations

import argparse
from collections import defaultdict
import datetime
import gc
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = ["sft-bf16", "dpo-bf16", "sft-nf4", "dpo-nf4"]
TARGET_RATIO = 1.15


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def publish(text: str, bench_file: str | None) -> None:
    """Print a benchmark's section and append it to the benchmarks file, if one is named (every bench/ script)."""
    print(text, flush=True)
    if bench_file:
        with open(bench_file, "a") as fh:
            fh.write(text)
        log(f"appended to {bench_file}")


class Interrupted(BaseException):
    """SIGTERM arrived (`timeout`, a scheduler): stop measuring, report what was measured."""


def report_on_sigterm():
    """Turn SIGTERM into `Interrupted`, so a run stopped by its time limit still writes the cases it finished
    (a stopped GPU session otherwise loses every finished case with the one cut short)."""
    def stop(signum, frame):
        raise Interrupted(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)


def mark_interrupted(results: dict, cases, err: Interrupted) -> None:
    """After an `Interrupted`: log it and mark every case not finished, so the report shows what was cut."""
    log(f"interrupted ({err}): reporting the {len(results)} case(s) finished")
    results.update({c: {"error": f"interrupted ({err})"} for c in cases if c not in results})


def abba_blocks(x, y, steps, block):
    """[(label, block)] in ABBA order (x y y x x y ...) until each side has >= `steps` steps: drift (clocks, host
    load, allocator state) then hits both sides alike."""
    out = []
    for k in range(-(-steps // block)):
        pair = (x, y) if k % 2 == 0 else (y, x)
        out += [(pair[0], block), (pair[1], block)]
    return out


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           pad_token_id=0, bos_token_id=1, eos_token_id=1)
    # Meta-Llama-3-8B's shape.
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       pad_token_id=0, bos_token_id=1, eos_token_id=1)


def tokenizer(vocab_size: int):
    """A word-level tokenizer: "t17" -> 17. Enough for TRL to tokenize synthetic text without the hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def text(gen, n, vocab_size):
    # The trailing space keeps an EOS that TRL appends as text ("...<eos>") a word of its own.
    return "".join(f"t{i} " for i in torch.randint(3, vocab_size, (n,), generator=gen).tolist())


def datasets(seq: int, vocab_size: int, n: int):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(0)
    sft = Dataset.from_list([{"text": text(gen, seq - 1, vocab_size)} for _ in range(n)])  # + eos = seq
    half = seq // 2
    dpo = Dataset.from_list([{"prompt": text(gen, half, vocab_size), "chosen": text(gen, seq - half - 1, vocab_size),
                              "rejected": text(gen, seq - half - 1, vocab_size)} for _ in range(n)])
    return sft, dpo


def build_base(config, device, dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    return model


def load_nf4(ckpt: Path, tiny: bool, device):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.float32 if tiny else torch.bfloat16
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=q, dtype=compute,
                                                 device_map={"": 0} if device == "cuda" else "cpu")
    model.config.use_cache = False
    return model


def callback(on_step_begin=None, on_step_end=None):
    """A TrainerCallback from two functions (imported late: the script's --help needs no transformers)."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if on_step_begin:
                on_step_begin(state)

        def on_step_end(self, args, state, control, **kw):
            if on_step_end:
                on_step_end(state)

    return _Callback()


def schedule(a):
    """The label of every optimizer step of one trainer, and which labels are timed.

    LoRA and GRIT run in ONE trainer, one process, alternating in blocks of --block steps in ABBA order
    (L G G L L G G L ...), so drift (clocks, host load, allocator state) hits both alike. A LoRA step is the
    trainer with every GRIT hook taken off (controller.remove(): no module, optimizer or clip work at all);
    a GRIT step has them on (controller.resume()). GRIT's schedule counts only its own steps, so its run is
    exactly a GRIT run: --warmup GRIT steps first (factors refreshed at step kfac_update_freq, so every timed
    step is preconditioned), then --steps timed GRIT steps, the last of which holds a factor refresh and a
    reprojection (at 2 x 50). The stress setting (a second controller, sample_every=1, refresh + reprojection
    every 5 steps) follows in the same way with its own interleaved LoRA blocks."""
    def abba(x, y, n):
        return [label for label, k in abba_blocks(x, y, n, a.block) for _ in range(k)]
    steps = ["warm-lora"] * 5 + ["warm-grit"] * a.warmup + abba("lora", "grit", a.steps)
    if a.control:  # A/A: LoRA against LoRA in the same alternation, the noise floor of a ratio
        steps += abba("ctl-a", "ctl-b", a.control_steps or a.steps)
    if a.profile:
        steps += ["prof-lora", "prof-grit"] * a.profile
    if a.stress:
        steps += ["warm-grit-stress"] * 5 + abba("lora-s", "grit-stress", a.stress_steps)
    return steps


def controller_for(label):
    """The GRIT controller a step's label turns on (None: a LoRA step, every hook off)."""
    label = label.removeprefix("warm-").removeprefix("prof-")
    return label if label in ("grit", "grit-stress") else None


def timer(device, labels, controllers, times, peaks, profiles):
    """Switches GRIT on/off before each step (labels[step]) and records each step's wall time, with a device
    sync at both ends, and its peak allocated memory, under the step's label. Steps labelled prof-* run under
    torch.profiler; their key averages go to profiles[label] (a list, one per step)."""
    start, prof = [], []

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def begin(state):
        label = labels[state.global_step]
        on = controller_for(label)
        for name, ctrl in controllers.items():  # off first, then on: one set of hooks at a time
            if name != on:
                ctrl.remove()
        if on:
            controllers[on].resume()
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if label.startswith("prof-"):
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            prof[:] = [profile(activities=activities)]
            prof[0].__enter__()
        start[:] = [time.perf_counter(), label]

    def end(state):
        sync()
        dt, label = time.perf_counter() - start[0], start[1]
        if prof:
            prof[0].__exit__(None, None, None)
            profiles.setdefault(label, []).append((dt, prof[0].key_averages()))
            prof.clear()
        times.setdefault(label, []).append(dt)
        if device == "cuda":
            peaks[label] = max(peaks.get(label, 0.0), torch.cuda.max_memory_allocated() / 2**30)
        if state.global_step % 25 == 0:
            log(f"    step {state.global_step} ({label}): {dt:.3f} s")

    return callback(begin, end)


def strip_adapters(model):
    """Put every adapter-wrapped layer's base layer back: the next case starts from the same base model, even
    when the last one failed halfway (PEFT injects its layers into the model it is given)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, module.get_base_layer())


def run_method(method, base, tok, data, a, device):
    """One trainer (SFT or DPO) on `base`, LoRA and GRIT steps interleaved; returns {label: row}."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from trainables import grit
    from trainables.config import GritConfig

    labels = schedule(a)
    common = dict(output_dir=a.out_dir, report_to="none", save_strategy="no",
                  max_steps=len(labels), per_device_train_batch_size=1, gradient_accumulation_steps=1,
                  gradient_checkpointing=True, learning_rate=2e-4, logging_steps=10_000, disable_tqdm=True,
                  seed=0, optim="adamw_torch", use_cpu=device == "cpu", bf16=device == "cuda",
                  dataloader_num_workers=0, max_length=a.seq)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=TARGETS,
                      task_type="CAUSAL_LM")
    controllers, times, peaks, trainer = {}, {}, {}, None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    try:
        if method == "sft":
            trainer = SFTTrainer(model=base, args=SFTConfig(**common), train_dataset=data["sft"],
                                 processing_class=tok, peft_config=lora)
        else:
            trainer = DPOTrainer(model=base, args=DPOConfig(beta=0.1, **common), train_dataset=data["dpo"],
                                 processing_class=tok, peft_config=lora)
        # The research's defaults (what trials run): sample_every=15, refresh and reprojection every 50.
        controllers["grit"] = grit.attach(trainer, GritConfig())
        if a.stress:
            controllers["grit-stress"] = grit.attach(trainer, GritConfig(sample_every=1, kfac_update_freq=5,
                                                                         reprojection_freq=5))
        for ctrl in controllers.values():
            ctrl.remove()  # the timer turns the step's controller on

        def log_metrics(state):  # trials log controller.metrics() at every logging step (default 1): time it
            on = controller_for(labels[state.global_step - 1])
            if on:
                controllers[on].metrics()

        profiles = {}
        trainer.add_callback(callback(on_step_end=log_metrics))
        trainer.add_callback(timer(device, labels, controllers, times, peaks, profiles))
        trainer.train()
        rows = {"profile": profiles} if profiles else {}
        for label, ts in times.items():
            if label.startswith(("warm-", "prof-")):
                continue
            rows[label] = dict(mean=statistics.mean(ts), median=statistics.median(ts), n=len(ts),
                               peak=peaks.get(label, float("nan")))
        for label, ctrl in controllers.items():
            m = ctrl.metrics()
            rows[label]["grit"] = m
            want = a.steps + a.warmup + a.profile if label == "grit" else a.stress_steps + 5
            if m["grit/steps"] != want:
                rows[label]["note"] = f"GRIT counted {m['grit/steps']:.0f} steps, expected {want}"
        return rows
    finally:
        for ctrl in controllers.values():
            ctrl.remove()
        trainer = None
        strip_adapters(base)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def bases(precisions, config, device, a):
    """Yield (precision, base model) one at a time; the nf4 base is loaded from the random bf16 checkpoint."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ckpt = None
    try:
        try:
            model = build_base(config, device, dtype)
        except Exception:
            traceback.print_exc()
            for p in precisions:
                yield p, None
            return
        log(f"built random {config.num_hidden_layers}-layer model on {device} ({dtype})")
        if "nf4" in precisions:
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            shm = Path("/dev/shm")
            root = a.ckpt_dir or (str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > 1.5 * size else None)
            ckpt = Path(tempfile.mkdtemp(prefix="grit_bench_ckpt_", dir=root))
            t = time.time()
            model.save_pretrained(ckpt)
            log(f"saved the random checkpoint to {ckpt} ({size / 2**30:.1f} GiB, {time.time() - t:.0f} s)")
        if "bf16" in precisions:
            yield "bf16", model
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        if "nf4" in precisions:
            t = time.time()
            try:
                nf4 = load_nf4(ckpt, a.tiny, device)
            except Exception:
                traceback.print_exc()
                yield "nf4", None
                return
            log(f"loaded nf4 base ({time.time() - t:.0f} s)")
            yield "nf4", nf4
    finally:
        if ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)


def profile_lines(case, profiles):
    """Profiled LoRA and GRIT steps: wall, CPU self time and GPU kernel time per step, and the operators whose
    self CPU time differs most (GRIT - LoRA): where GRIT's overhead goes, on the CPU or on the GPU."""
    from torch.autograd import DeviceType

    def per_step(label):
        steps = profiles.get(label, [])
        if not steps:
            return None
        n = len(steps)
        ops = defaultdict(float)
        for _, ka in steps:
            for e in ka:
                if e.device_type == DeviceType.CPU:
                    ops[e.key] += e.self_cpu_time_total / n / 1e3   # ms per step
        return dict(wall=statistics.median(dt for dt, _ in steps),
                    cpu=sum(ops.values()) / 1e3,
                    gpu=statistics.median(sum(e.self_device_time_total for e in ka if e.device_type == DeviceType.CUDA)
                                          for _, ka in steps) / 1e6,
                    ops=ops, n=n)

    lo, gr = per_step("prof-lora"), per_step("prof-grit")
    if not lo or not gr:
        return []
    lines = [f"\n{case}, profiled steps (torch.profiler, {lo['n']} LoRA + {gr['n']} GRIT, alternating; the "
             "profiler slows the CPU side, so compare the two rows, not with the table above): LoRA wall "
             f"{lo['wall']:.3f} s, CPU self {lo['cpu']:.3f} s, GPU kernels {lo['gpu']:.3f} s; GRIT wall "
             f"{gr['wall']:.3f} s, CPU self {gr['cpu']:.3f} s, GPU kernels {gr['gpu']:.3f} s. Operators with the "
             "largest self-CPU difference, ms/step (GRIT - LoRA):"]
    diff = {k: gr["ops"].get(k, 0.0) - lo["ops"].get(k, 0.0) for k in set(lo["ops"]) | set(gr["ops"])}
    top = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:10]
    lines.append("; ".join(f"`{k}` {v:+.1f}" for k, v in top))
    return lines


def report(results, a, device, config):
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    import peft
    import transformers
    import trl

    shape = "tiny" if a.tiny else "Llama-3-8B shape (random weights)"
    lines = [
        f"\n### GRIT vs LoRA step time — bench/grit_speed.py — {date} — {machine}\n",
        f"{shape}, seq {a.seq}, batch 1, LoRA r16/alpha16 on all 7 projections, gradient checkpointing, "
        f"adamw_torch, bf16 autocast. LoRA and GRIT steps alternate in one trainer (ABBA blocks of {a.block}); "
        f"GRIT (research defaults: sample_every=15, refresh + reprojection every 50, all features on, "
        f"metrics() read at every step as trials log it) timed over {a.steps} steps after {a.warmup} warmup "
        f"steps (every timed step preconditioned; the window holds one refresh + reprojection and its sampled "
        f"steps)" + (f"; stress row: sample_every=1, refresh + reprojection every 5, {a.stress_steps} timed steps"
                     if a.stress else "") +
        f". Overhead = GRIT - LoRA per step. torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, peft {peft.__version__}, host {platform.node()}. "
        f"Target: GRIT <= {TARGET_RATIO} x LoRA (mean and median).\n",
        "| case | setting | LoRA s/step (mean / median) | GRIT s/step (mean / median) | GRIT/LoRA (mean / median) | "
        "overhead ms/step (mean / median) | LoRA peak GiB | GRIT peak GiB | steps (LoRA / GRIT) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in a.cases:
        res = results.get(case)
        if not isinstance(res, dict) or "error" in res:
            lines.append(f"| {case} | - | {res['error'] if res else 'not run'} | | | | | | | - |")
            continue
        for lo_key, gr_key, setting in (("lora", "grit", "research defaults"), ("lora-s", "grit-stress", "stress"),
                                        ("ctl-a", "ctl-b", "A/A control")):
            lo, gr = res.get(lo_key), res.get(gr_key)
            if not lo or not gr:
                continue
            ratios = gr["mean"] / lo["mean"], gr["median"] / lo["median"]
            verdict = "pass" if max(ratios) <= TARGET_RATIO else "FAIL"
            if setting == "stress":
                verdict += " (stress, not the target's setting)"
            if setting == "A/A control":  # both columns are LoRA: how far apart two identical variants land
                verdict = "noise floor (both LoRA)"
            if gr.get("note"):
                verdict += f" ({gr['note']})"
            lines.append(
                f"| {case} | {setting} | {lo['mean']:.3f} / {lo['median']:.3f} | {gr['mean']:.3f} / {gr['median']:.3f} | "
                f"{ratios[0]:.3f} / {ratios[1]:.3f} | {1e3 * (gr['mean'] - lo['mean']):+.1f} / "
                f"{1e3 * (gr['median'] - lo['median']):+.1f} | {lo['peak']:.2f} | {gr['peak']:.2f} | "
                f"{lo['n']} / {gr['n']} | {verdict} |")
    for case in a.cases:
        res = results.get(case)
        if isinstance(res, dict) and res.get("profile"):
            lines += profile_lines(case, res["profile"])
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU (checks the script, not the speed)")
    ap.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per variant (LoRA and GRIT each)")
    ap.add_argument("--warmup", type=int, default=50, help="untimed GRIT steps first (>= kfac_update_freq = 50)")
    ap.add_argument("--block", type=int, default=5, help="steps per block in the ABBA alternation")
    ap.add_argument("--stress", action="store_true", help="also time GRIT at sample_every=1, refresh every 5")
    ap.add_argument("--stress-steps", type=int, default=20, help="timed steps per variant in the stress setting")
    ap.add_argument("--control", action="store_true",
                    help="also time LoRA against LoRA in the same alternation: the noise floor")
    ap.add_argument("--control-steps", type=int, default=None, help="steps per variant of the control (default --steps)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then profile N LoRA and N GRIT steps (torch.profiler): CPU vs GPU time, top operators")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; tiny 64)")
    ap.add_argument("--ckpt-dir", default=None, help="where the random checkpoint for nf4 goes (default /dev/shm "
                                                     "when large enough, else the temp dir)")
    ap.add_argument("--bench-file", default=None,
                    help="Markdown file to append to (default BENCHMARKS.md; with --tiny nothing unless given)")
    a = ap.parse_args()
    a.seq = a.seq or (64 if a.tiny else 1024)
    a.out_dir = tempfile.mkdtemp(prefix="grit_bench_out_")  # TrainingArguments wants one; nothing is saved
    if a.warmup < 50 and not a.tiny:
        log(f"warning: warmup {a.warmup} < 50: early timed GRIT steps are not preconditioned")
    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    if device == "cpu" and not a.tiny:
        sys.exit("No CUDA device: run with --tiny for a CPU check of the script.")
    config = llama_config(a.tiny)
    tok = tokenizer(config.vocab_size)
    sft, dpo = datasets(a.seq, config.vocab_size, n=len(schedule(a)))
    data = {"sft": sft, "dpo": dpo}
    log(f"device {device}; cases {a.cases}; {len(schedule(a))} steps per case; seq {a.seq}")

    results = {}
    precisions = [p for p in ("bf16", "nf4") if any(c.endswith(p) for c in a.cases)]
    started = time.time()
    report_on_sigterm()
    try:
        for precision, base in bases(precisions, config, device, a):
            for case in [c for c in a.cases if c.endswith(precision)]:
                if base is None:
                    results[case] = {"error": "base model failed to load"}
                    continue
                log(f"{case} ...")
                try:
                    rows = run_method(case.split("-")[0], base, tok, data, a, device)
                    results[case] = rows
                    for label, row in rows.items():
                        if label == "profile":
                            continue
                        log(f"{case} {label}: mean {row['mean']:.3f} s/step, median {row['median']:.3f}, n {row['n']}, "
                            f"peak {row['peak']:.2f} GiB" + (f"; {row['note']}" if row.get("note") else ""))
                    for line in profile_lines(case, rows.get("profile", {})):  # in the log now, whatever follows
                        log(line.strip())
                except Exception as e:  # one failing case must not sink the others
                    traceback.print_exc()
                    results[case] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
                    if device == "cuda":
                        torch.cuda.empty_cache()
            del base
    except Interrupted as e:
        mark_interrupted(results, a.cases, e)
    publish(report(results, a, device, config), a.bench_file or (None if a.tiny else str(ROOT / "BENCHMARKS.md")))
    log(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
