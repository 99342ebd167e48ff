"""What a warm Ray trial's first step pays that the same trial alone does not, without any training: per context
(this process, a new thread of it, a Ray task, three new threads of one Ray actor one after another, as Tune runs
a reused worker's trials), the cost of cudaMalloc (the caching allocator emptied first, as accelerate empties it
at every trainer.train() start) and of the thread's first scaled_dot_product_attention call at SmolLM2's shapes.

Why (BENCHMARKS.md, 2026-11-24 midday): a warm Ray trial's step 1 spent 1.2-2.9 s of CPU in the SDPA call
(stack samples), as much as a process's very first trial (1.5 s), against 0.07-0.18 s for warm trials alone
(each in a new thread too). cudaMalloc was ruled out: 0.06 ms per call in Ray, 0.11 in this process.
Found (2026-11-24 evening): any new thread pays 52-84 ms for its first SDPA call at a shape (cuDNN's graphs are
cached per thread), in Ray and out of it; sweeps now keep one thread per worker (sweeps/runner.py _TrialThread).

    python bench/ray_thread_probe.py
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time


def allocate(rounds: int, sizes_mib: list[int], per_size: int) -> dict:
    """Per round: empty the cache, allocate per_size tensors of each size (each a new segment: cudaMalloc),
    sync. Returns the median round's wall and thread-CPU seconds per cudaMalloc, and the mallocs per round."""
    import torch

    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    walls, cpus, mallocs = [], [], []
    for _ in range(rounds):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_stats().get("segment.all.allocated", 0)
        wall, cpu = time.perf_counter(), time.thread_time()
        held = [torch.empty(size * 2**20, dtype=torch.uint8, device="cuda") for size in sizes_mib
                for _ in range(per_size)]
        torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        n = torch.cuda.memory_stats().get("segment.all.allocated", 0) - before
        del held
        walls.append(wall / max(n, 1))
        cpus.append(cpu / max(n, 1))
        mallocs.append(n)
    torch.cuda.empty_cache()
    return {"ms_per_malloc": 1e3 * statistics.median(walls), "cpu_ms_per_malloc": 1e3 * statistics.median(cpus),
            "mallocs_per_round": statistics.median(mallocs)}


def first_sdpa(batch: int = 2, heads: int = 9, kv_heads: int = 3, seq: int = 1024, head_dim: int = 64) -> dict:
    """Seconds of this thread's first SDPA forward + backward at SmolLM2-135M's attention shapes in bf16, in the
    two ways transformers 5.17 calls it: no mask (is_causal, enable_gqa) and a padded batch (a boolean mask, K/V
    expanded per head), each first and second time. Backends and their first-call costs may differ between the
    two. CPU is the forward's only: a CUDA backward runs in autograd's device thread."""
    import torch
    import torch.nn.functional as F

    def qkv(expand: bool):
        q = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(batch, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16,
                            requires_grad=True) for _ in range(2))
        return (q, k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)) \
            if expand else (q, k, v)

    mask = torch.ones(seq, seq, device="cuda", dtype=torch.bool).tril().expand(batch, 1, seq, seq).clone()
    mask[0, :, :, seq // 2:] = False  # the first row padded at its end
    calls = {"causal_gqa": lambda: F.scaled_dot_product_attention(*qkv(False), is_causal=True, enable_gqa=True),
             "padded_mask": lambda: F.scaled_dot_product_attention(*qkv(True), attn_mask=mask)}
    out = {}
    for variant, call in calls.items():
        for n in ("first", "second"):
            torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.thread_time()
            y = call()
            cpu = time.thread_time() - cpu
            y.sum().backward()
            torch.cuda.synchronize()
            out[f"{variant}_{n}_s"], out[f"{variant}_{n}_fwd_cpu_s"] = time.perf_counter() - wall, cpu
    out["cudnn_sdp_enabled"] = torch.backends.cuda.cudnn_sdp_enabled()
    return out


def probe(rounds: int, sizes_mib: list[int], per_size: int) -> dict:
    return allocate(rounds, sizes_mib, per_size) | first_sdpa()


def in_thread(fn, *args):
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))
    t.start()
    t.join()
    return out[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[2, 20, 64, 256])
    ap.add_argument("--per-size", type=int, default=25)
    a = ap.parse_args()
    args = (a.rounds, a.sizes_mib, a.per_size)
    rows = {"this process": probe(*args), "a new thread of it": in_thread(probe, *args),
            "another new thread of it": in_thread(probe, *args)}

    import ray

    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        rows["a Ray task"] = ray.get(ray.remote(num_gpus=1)(probe).remote(*args))

        @ray.remote(num_gpus=1)
        class Worker:  # as Ray Tune runs a reused worker's trials: each in a new thread of the actor
            def run(self, *args):
                return in_thread(probe, *args)

        worker = Worker.remote()
        for n in (1, 2, 3):
            rows[f"a Ray actor's new thread, #{n}"] = ray.get(worker.run.remote(*args))
    finally:
        ray.shutdown()
    import torch

    print(f"{torch.cuda.get_device_name()}; sizes {a.sizes_mib} MiB x {a.per_size}, {a.rounds} rounds (medians)")
    print("| where | cudaMalloc calls per round | ms per cudaMalloc (wall / thread CPU) | SDPA causal+GQA fwd+bwd s: "
          "first (fwd CPU) / second | SDPA padded mask: first (fwd CPU) / second | cuDNN SDPA enabled |")
    print("|---|---|---|---|---|---|")
    for where, r in rows.items():
        sdpa = " | ".join(f"{r[f'{v}_first_s']:.3f} ({r[f'{v}_first_fwd_cpu_s']:.3f}) / {r[f'{v}_second_s']:.4f}"
                          for v in ("causal_gqa", "padded_mask"))
        print(f"| {where} | {r['mallocs_per_round']:.0f} | {r['ms_per_malloc']:.3f} / {r['cpu_ms_per_malloc']:.3f} | "
              f"{sdpa} | {r['cudnn_sdp_enabled']} |")


if __name__ == "__main__":
    main()
