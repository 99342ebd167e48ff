"""Compare step-1 stack samples (trainables/trial.py's $ALIGNSWEEP_PROFILE_STEP1) between groups of trials: where
a trial's training thread spends its first optimizer step, per trial on average, and what one group spends more
than another. The same for the trial's setup before step 1: give the groups' `before_step1/` directories.

    python bench/step1_profiles.py results/prof/alone-as-sweep results/prof/per-gpu-1gpu     # A, then B
    python bench/step1_profiles.py results/prof/per-gpu-1gpu --top 40 --cold
    python bench/step1_profiles.py results/prof/packed/before_step1                           # setup

Each DIR is a group of `{kind}-{pid}-{n}.folded` files; n = 0 (the worker's first, cold trial) is left out unless
--cold. Frames are `file:function:line`. Prints, per group, the frames by own time (the sampled stack's top: time
in C shows as the Python line that called it) and by inclusive time (on the stack at all), in mean seconds per
trial; with two groups, the frames whose mean own and inclusive time differ most (B - A).
"""
from __future__ import annotations

import argparse
import collections
from pathlib import Path


def load(directory: str, cold: bool) -> tuple[dict, int]:
    """{frame: [own s, inclusive s]} summed over the group's trials, and the trial count."""
    files = [p for p in sorted(Path(directory).glob("*.folded")) if cold or not p.stem.endswith("-0")]
    if not files:
        raise SystemExit(f"{directory}: no step-1 samples (*.folded{'' if cold else ', warm trials'})")
    funcs = collections.defaultdict(lambda: [0.0, 0.0])
    for path in files:
        lines = path.read_text().splitlines()
        per_sample = float(lines[0].split()[-1])  # "# seconds_per_sample S"
        for line in lines[1:]:
            stack, n = line.rsplit(" ", 1)
            frames = stack.split(";")
            funcs[frames[-1]][0] += int(n) * per_sample
            for frame in set(frames):
                funcs[frame][1] += int(n) * per_sample
    return dict(funcs), len(files)


def table(rows, headers) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def summary(funcs: dict, n: int, top: int) -> str:
    out = []
    for col, label in ((0, "own"), (1, "inclusive")):
        ranked = sorted(funcs, key=lambda f: -funcs[f][col])[:top]
        out.append(table([(f, f"{funcs[f][col] / n:.4f}") for f in ranked], ["frame", f"{label} s/trial"]))
    return "\n\n".join(out)


def difference(a: dict, na: int, b: dict, nb: int, top: int) -> str:
    out = []
    for col, label in ((0, "own"), (1, "inclusive")):
        delta = {f: b.get(f, (0, 0))[col] / nb - a.get(f, (0, 0))[col] / na for f in set(a) | set(b)}
        ranked = sorted(delta, key=lambda f: -abs(delta[f]))[:top]
        out.append(table([(f, f"{a.get(f, (0, 0))[col] / na:.4f}", f"{b.get(f, (0, 0))[col] / nb:.4f}",
                           f"{delta[f]:+.4f}") for f in ranked], ["frame", f"A {label} s", f"B {label} s", "B - A"]))
    return "\n\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="one group of samples per directory (two: A then B, compared)")
    ap.add_argument("--top", type=int, default=25, help="frames per table")
    ap.add_argument("--cold", action="store_true", help="include each worker's first trial (n = 0)")
    a = ap.parse_args(argv)
    groups = [(d, *load(d, a.cold)) for d in a.dirs]
    for d, funcs, n in groups:
        print(f"## {d}: {n} trials\n\n{summary(funcs, n, a.top)}\n")
    if len(groups) == 2:
        (da, fa, na), (db, fb, nb) = groups
        print(f"## B - A, mean per trial (A = {da}, B = {db})\n\n{difference(fa, na, fb, nb, a.top)}")


if __name__ == "__main__":
    main()
