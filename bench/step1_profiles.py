"""Compare step-1 profiles (trainables/trial.py's $ALIGNSWEEP_PROFILE_STEP1) between groups of trials: where a
trial's first optimizer step spends its time, per trial on average, and what one group spends more than another.

    python bench/step1_profiles.py results/prof-alone results/prof/per-gpu-1gpu      # A, then B
    python bench/step1_profiles.py results/prof/per-gpu-1gpu --top 40 --cold

Each DIR is a group of `{kind}-{pid}-{n}.prof` files; n = 0 (the worker's first, cold trial) is left out unless
--cold. Prints, per group, the functions by own time and by cumulative time (mean seconds per trial); with two
groups, the functions whose mean own and cumulative time differ most (B - A). cProfile slows Python-bound code
alike in both groups, so differences are meaningful, absolute times less so.
"""
from __future__ import annotations

import argparse
import pstats
from pathlib import Path


def load(directory: str, cold: bool) -> tuple[dict, int]:
    """{(file, line, function): (own s, cumulative s)} summed over the group's trials, and the trial count."""
    files = [p for p in sorted(Path(directory).glob("*.prof")) if cold or not p.stem.endswith("-0")]
    if not files:
        raise SystemExit(f"{directory}: no step-1 profiles (*.prof{'' if cold else ', warm trials'})")
    stats = pstats.Stats(str(files[0]))
    for p in files[1:]:
        stats.add(str(p))
    return {func: (tt, ct) for func, (_, _, tt, ct, _) in stats.stats.items()}, len(files)


def name(func) -> str:
    file, line, function = func
    return f"{Path(file).name}:{line}({function})" if line else function


def table(rows, headers) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def summary(funcs: dict, n: int, top: int) -> str:
    out = []
    for col, label in ((0, "own"), (1, "cumulative")):
        ranked = sorted(funcs, key=lambda f: -funcs[f][col])[:top]
        out.append(table([(name(f), f"{funcs[f][col] / n:.4f}") for f in ranked], ["function", f"{label} s/trial"]))
    return "\n\n".join(out)


def difference(a: dict, na: int, b: dict, nb: int, top: int) -> str:
    out = []
    for col, label in ((0, "own"), (1, "cumulative")):
        delta = {f: b.get(f, (0, 0))[col] / nb - a.get(f, (0, 0))[col] / na for f in set(a) | set(b)}
        ranked = sorted(delta, key=lambda f: -abs(delta[f]))[:top]
        out.append(table([(name(f), f"{a.get(f, (0, 0))[col] / na:.4f}", f"{b.get(f, (0, 0))[col] / nb:.4f}",
                           f"{delta[f]:+.4f}") for f in ranked], ["function", f"A {label} s", f"B {label} s", "B - A"]))
    return "\n\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="one group of profiles per directory (two: A then B, compared)")
    ap.add_argument("--top", type=int, default=25, help="functions per table")
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
