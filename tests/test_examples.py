import importlib.util
from pathlib import Path

from tests.helpers import read_events

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_job_logs_gradient_monitor_keys_and_says_where(tmp_path, capsys):
    log_dir = _load("train_tiny_gpt").main(["--steps", "12", "--batch-size", "4", "--log-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {log_dir}" in out
    events = read_events(str(log_dir))
    tags = set(events.Tags()["scalars"])
    blocks = [f"llmdbg/grad_norm/block_{i}" for i in range(4)]
    assert set(blocks) | {"llmdbg/grad_norm/total", "llmdbg/update_ratio/block_0"} <= tags
    assert "llmdbg/grad_hist/block_3" in events.Tags()["histograms"]
    assert {"llmdbg/act/block_3/kurtosis", "llmdbg/act_grad/block_0/rms", "llmdbg/attn/block_2/entropy_min", "llmdbg/logits/lse_sq"} <= tags
    assert [e.step for e in events.Scalars("llmdbg/act/block_0/rms")] == [0]
    assert [e.step for e in events.Scalars("llmdbg/grad_norm/total")] == list(range(10)) + [10]
