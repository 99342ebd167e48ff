"""Benchmark scripts: a run stopped by its time limit still reports what it finished."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_grit_speed_stopped_by_sigterm_writes_the_finished_cases(tmp_path):
    out = tmp_path / "bench.md"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "grit_speed.py"), "--tiny", "--cases", "sft-bf16", "dpo-bf16",
         "--warmup", "50", "--steps", "4", "--block", "1", "--bench-file", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    log = []
    try:
        for line in proc.stdout:  # stop it as `timeout` would, once the first case is measured
            log.append(line)
            if "dpo-bf16 ..." in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    log.append(rest)
    rows = [r for r in out.read_text().splitlines() if r.startswith("| ")]
    assert any(r.startswith("| sft-bf16 | research defaults |") and r.rstrip().endswith(("pass |", "FAIL |"))
               for r in rows), "".join(log)
    assert any(r.startswith("| dpo-bf16 |") and "interrupted (signal 15)" in r for r in rows), rows
