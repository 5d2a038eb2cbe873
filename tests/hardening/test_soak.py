"""Soak: 3000 steps with every callback at every step (``benchmarks/soak.py``, in its own process so that its
resident memory is its own): memory flat after warm-up, a constant hook count, logs growing linearly."""

import json
from pathlib import Path

from tests.helpers import run_script

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "soak.py"
STEPS, WARMUP = 3000, 300


def test_3000_steps_of_every_callback_hold_memory_hooks_and_log_rate(tmp_path):
    result = tmp_path / "rows.json"
    run_script(SCRIPT, "--steps", STEPS, "--warmup", WARMUP, "--out", tmp_path, "--json", result, timeout=600)
    rows = json.loads(result.read_text())
    assert rows[-1]["step"] == STEPS
    after = [r for r in rows if r["step"] >= WARMUP]
    assert max(r["rss_mb"] for r in after) - after[0]["rss_mb"] < 50, [(r["step"], r["rss_mb"]) for r in rows]
    assert {r["hooks"] for r in rows} == {rows[0]["hooks"]}  # the probe's hooks never outlive a step
    # Linear growth: the second half of the run writes as much per step as the first half (within 20%).
    middle = after[len(after) // 2]
    first = (middle["log_bytes"] - after[0]["log_bytes"]) / (middle["step"] - after[0]["step"])
    second = (after[-1]["log_bytes"] - middle["log_bytes"]) / (after[-1]["step"] - middle["step"])
    assert abs(second / first - 1) < 0.2, (first, second)
