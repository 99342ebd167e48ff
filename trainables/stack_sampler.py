"""A sampling profiler for one thread: a daemon thread reads the target thread's Python stack about every
`interval` seconds (sys._current_frames) and credits each stack with the time since the previous sample, written
out in the folded format flame-graph tools read (counts in microseconds).

Samples are weighted by elapsed time because they are not evenly spaced: while the target runs Python and holds
the GIL, the sampler waits up to the switch interval (5 ms); while it is in C that releases the GIL, the sampler
runs every `interval`. It cannot see C code that keeps the GIL, and a CUDA backward runs in autograd's own device
thread, so it shows as the `backward` line that waits for it.

Why not cProfile: on the GPU machine's Python (3.12+, sys.monitoring) it recorded every thread's calls into one
profile, so inside a Ray worker, whose main thread polls for the trial's results while the trial trains in another thread, the
training thread's times come out mixed with the poller's waits. Sampling one thread by id keeps them apart. Time
in C (a torch op, a CUDA call) shows as the Python line that called it. (py-spy does this from outside the
process, but it is not a dependency here and cannot be started from inside a Ray trial.)
"""
from __future__ import annotations

import collections
import sys
import threading
import time


class StackSampler:
    def __init__(self, thread_id: int, interval: float = 0.002):
        self.thread_id, self.interval = thread_id, interval
        self.stacks: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def start(self) -> StackSampler:
        self._thread.start()
        return self

    def _run(self):
        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            now = time.perf_counter()
            elapsed_us, last = round((now - last) * 1e6), now
            frame = sys._current_frames().get(self.thread_id)
            names = []
            while frame is not None:
                code = frame.f_code
                names.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}:{frame.f_lineno}")
                frame = frame.f_back
            if names:
                self.stacks[";".join(reversed(names))] += elapsed_us

    def stop(self) -> StackSampler:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        return self

    def dump(self, path: str):
        """Folded stacks (root;...;leaf microseconds), after a comment line with the seconds one count stands for."""
        with open(path, "w") as fh:
            fh.write("# seconds_per_sample 0.000001\n")
            fh.writelines(f"{stack} {n}\n" for stack, n in self.stacks.most_common())
