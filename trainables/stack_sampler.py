"""A sampling profiler for one thread: a daemon thread reads the target thread's Python stack every `interval`
seconds (sys._current_frames) and counts each stack, written out in the folded format flame-graph tools read.

Why not cProfile: from Python 3.12 it records every thread's calls into one profile (sys.monitoring), so inside a
Ray worker, whose main thread polls for the trial's results while the trial trains in another thread, the
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
        self._wall = 0.0

    def start(self) -> StackSampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self.thread_id)
            names = []
            while frame is not None:
                code = frame.f_code
                names.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}:{frame.f_lineno}")
                frame = frame.f_back
            if names:
                self.stacks[";".join(reversed(names))] += 1

    def stop(self) -> StackSampler:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self._wall = time.perf_counter() - self._started
        return self

    def dump(self, path: str):
        """Folded stacks (root;...;leaf count), after a comment line with the seconds one sample stands for."""
        samples = sum(self.stacks.values())
        with open(path, "w") as fh:
            fh.write(f"# seconds_per_sample {self._wall / max(samples, 1):.6f}\n")
            fh.writelines(f"{stack} {n}\n" for stack, n in self.stacks.most_common())
