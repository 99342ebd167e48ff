"""Is cudaMalloc slower inside a Ray worker? Times fresh device allocations (the caching allocator emptied first,
as accelerate empties it at every trainer.train() start) in this process, in a new thread of it, and in a Ray
task and a Ray actor's thread, all on one GPU.

Why: a warm Ray trial's step 1 made 57-116 cudaMalloc calls (sys/first_step_cuda_mallocs, 2026-11-24) and spent
1-3 s more CPU in its training thread than the same trial alone, while its Python-visible work was the same
(bench/step1_profiles.py). If cudaMalloc costs more in a Ray worker, this shows it without any training.

    python bench/cuda_malloc_probe.py --rounds 5 --sizes-mib 2 20 64 256 --per-size 25
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
    rows = {"this process": allocate(*args), "a new thread of it": in_thread(allocate, *args)}

    import ray

    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        rows["a Ray task"] = ray.get(ray.remote(num_gpus=1)(allocate).remote(*args))

        @ray.remote(num_gpus=1)
        class Worker:  # as Ray Tune runs a function trainable: in a thread of the actor
            def run(self, *args):
                return in_thread(allocate, *args)

        rows["a Ray actor's new thread"] = ray.get(Worker.remote().run.remote(*args))
    finally:
        ray.shutdown()
    import torch

    print(f"{torch.cuda.get_device_name()}; sizes {a.sizes_mib} MiB x {a.per_size}, {a.rounds} rounds (medians)")
    print("| where | cudaMalloc calls per round | ms per cudaMalloc (wall) | thread CPU ms per cudaMalloc |")
    print("|---|---|---|---|")
    for where, r in rows.items():
        print(f"| {where} | {r['mallocs_per_round']:.0f} | {r['ms_per_malloc']:.3f} | {r['cpu_ms_per_malloc']:.3f} |")


if __name__ == "__main__":
    main()
