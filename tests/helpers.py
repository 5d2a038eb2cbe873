"""Shared pieces for tests: a small reference GPT, trainer settings, event-file reading, independent norms."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_llmdbg.testing import GPTConfig, PydocDataModule, TinyGPTModule
from lightning_llmdbg.testing.hooks import count_hooks  # noqa: F401 - the tests import it from here

SMALL = dict(vocab_size=256, block_size=32, n_layer=3, n_head=4, n_embd=32)


def _has_cpp_compiler() -> bool:
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
    except Exception:
        return False
    return True


# Compiled statistics on the CPU need the C++ compiler of torch.compile's CPU backend; without one they run eager.
requires_compiler = pytest.mark.skipif(not _has_cpp_compiler(), reason="torch.compile's CPU backend has no C++ compiler")


def compiler_missing(monkeypatch) -> list[str]:
    """``torch.compile`` as on a machine without a C++ compiler: each compiled function raises when called, as the CPU
    backend does. Returns the names of the functions called, one per attempt; resets the process's compile state."""
    from lightning_llmdbg import stats

    attempts = []

    def compile_without_compiler(fn, **kwargs):
        def compiled(*args):
            attempts.append(fn.__name__)
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return compiled

    monkeypatch.setattr(stats, "_COMPILED", {})
    monkeypatch.setattr(stats, "_COMPILE_FAILURE", [])
    monkeypatch.setattr(torch, "compile", compile_without_compiler)
    return attempts


def small_gpt(seed: int = 0, **overrides) -> TinyGPTModule:
    pl.seed_everything(seed, verbose=False)
    return TinyGPTModule(GPTConfig(**{**SMALL, **overrides}))


def small_data(batch_size: int = 4, train_samples: int = 256) -> PydocDataModule:
    return PydocDataModule(block_size=SMALL["block_size"], batch_size=batch_size, train_samples=train_samples)


def trainer_kwargs(**overrides) -> dict:
    base = dict(
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    base.update(overrides)
    return base


def read_events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


# The groups of the reference GPT, written out by hand so that the test does not lean on the selection module.
def reference_group_of(name: str) -> str:
    name = name.removeprefix("model.")
    match = re.match(r"transformer\.h\.(\d+)\.", name)
    if match:
        return f"block_{match.group(1)}"
    if name.startswith(("transformer.wte", "transformer.wpe")):
        return "embeddings"
    if name.startswith("transformer.ln_f"):
        return "ln_f"
    if name.startswith("lm_head"):
        return "head"
    raise AssertionError(name)


def independent_group_norms(module: torch.nn.Module) -> dict[str, float]:
    """Float64 L2 norms of each group's concatenated gradient, and the total (of full tensors under FSDP2, where
    gathering each DTensor gradient is a collective: call it on every rank)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for name, p in module.named_parameters():
        if p.grad is not None:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            parts.setdefault(reference_group_of(name), []).append(grad.detach().double().flatten())
    norms = {g: torch.cat(v).norm().item() for g, v in parts.items()}
    norms["total"] = torch.cat([torch.cat(v) for v in parts.values()]).norm().item()
    return norms


class RecordGradNorms(pl.Callback):
    """Records independent per-group gradient norms at the same hook the monitor measures in."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.by_step[trainer.global_step] = independent_group_norms(pl_module)


def assert_close(actual: float, expected: float, rel: float, what: str = "") -> None:
    err = abs(actual - expected) / max(abs(expected), 1e-30)
    assert err < rel, f"{what}: {actual} vs {expected} (relative error {err:.2e} >= {rel:.0e})"


ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def run_script(script: Path, *args: str, timeout: float = 240) -> str:
    """Run a multi-process training script (Lightning's launcher re-runs ``sys.argv`` for the other ranks, so it
    cannot run inside pytest) in a new session, so that a hang kills every rank; fail the test on a hang or an error.
    Returns its output."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the second rank is a grandchild of this process
        output, _ = proc.communicate()
        pytest.fail(f"{script.name} {' '.join(map(str, args))} hung for {timeout}s:\n{output[-3000:]}")
    assert proc.returncode == 0, f"{script.name} {' '.join(map(str, args))} failed:\n{output[-5000:]}"
    return output
