import importlib.util
from pathlib import Path

from tests.helpers import read_events

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_job_logs_every_callback_raises_the_scheduled_alert_and_says_where(tmp_path, capsys):
    args = ["--steps", "30", "--fault-step", "24", "--batch-size", "4", "--log-dir", str(tmp_path), "--no-progress-bar"]
    log_dir = _load("train_tiny_gpt").main(args)
    out = capsys.readouterr().out
    assert "scheduled fault: learning rate x100 at step 24" in out
    assert f"tensorboard --logdir {log_dir}" in out and f"llmdbg report {log_dir}" in out
    alerts = [line for line in out.splitlines() if line.startswith("  step ")]
    assert alerts and all(int(line.split()[1].rstrip(":")) >= 24 for line in alerts), out  # nothing before the fault
    events = read_events(str(log_dir))
    tags = set(events.Tags()["scalars"])
    blocks = [f"llmdbg/grad_norm/block_{i}" for i in range(4)]
    assert set(blocks) | {"llmdbg/grad_norm/total", "llmdbg/update_ratio/block_0", "llmdbg/alerts/count"} <= tags
    assert "llmdbg/grad_hist/block_3" in events.Tags()["histograms"]
    assert {"llmdbg/act/block_3/kurtosis", "llmdbg/act_grad/block_0/rms", "llmdbg/attn/block_2/entropy_min", "llmdbg/logits/lse_sq"} <= tags
    assert [e.step for e in events.Scalars("llmdbg/act/block_0/rms")] == [0]
    assert [e.step for e in events.Scalars("llmdbg/grad_norm/total")] == list(range(10)) + [10, 20]
    assert "llmdbg/hard_examples/text_summary" in events.Tags()["tensors"]

    from lightning_llmdbg.report import main as report

    assert report(["report", str(log_dir), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    assert alerts[0].split(":")[0].strip() in printed  # "step N" of the first alert
    assert (tmp_path / "plots" / "grad_norm_heatmap.png").exists() and (tmp_path / "plots" / "activation_rms.png").exists()


def test_lightning_cli_yaml_configures_every_callback(tmp_path):
    config = EXAMPLES / "llmdbg_cli.yaml"
    cli = _load("cli").main([
        "fit", "--config", str(config), "--trainer.max_steps", "12", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_checkpointing", "false",
    ])
    by_type = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    monitor, probe = by_type["GradientMonitor"], by_type["ActivationProbe"]
    # The YAML's values, not the defaults (25 / 10 / False / 100).
    assert (monitor.schedule.every_n_steps, monitor.schedule.warmup_steps, monitor.update_ratio) == (10, 5, True)
    assert probe.schedule.every_n_steps == 50
    assert by_type["HardExampleLogger"].k == 4 and by_type["AnomalyAlert"].action == "skip"
    events = read_events(cli.trainer.logger.log_dir)
    assert [e.step for e in events.Scalars("llmdbg/grad_norm/block_1")] == [0, 1, 2, 3, 4, 10]
    assert [e.step for e in events.Scalars("llmdbg/act/block_1/rms")] == [0]
    assert "llmdbg/update_ratio/head" in events.Tags()["scalars"]
    assert [e.step for e in events.Tensors("llmdbg/hard_examples/text_summary")][0] == 0


def test_hf_gpt2_example_resolves_its_blocks_from_transformer_h(tmp_path, capsys):
    log_dir = _load("hf_gpt2").main(["--steps", "3", "--batch-size", "2", "--n-layer", "2", "--log-dir", str(tmp_path)])
    tags = set(read_events(str(log_dir)).Tags()["scalars"])
    assert {"llmdbg/grad_norm/block_0", "llmdbg/grad_norm/block_1", "llmdbg/grad_norm/embeddings"} <= tags
    assert "llmdbg/grad_norm/block_2" not in tags
    assert {"llmdbg/act/transformer.h.1/rms", "llmdbg/attn/transformer.h.1/entropy_min"} <= tags


def test_classifier_label_noise_example_finds_flipped_labels(tmp_path, capsys):
    result = _load("classifier_label_noise").main(["--n", "300", "--max-epochs", "12", "--log-dir", str(tmp_path)])
    # Far above the 20% a random ranking would get, even on this short run.
    assert result["precision_at_k"] >= 0.6 and result["auroc"] >= 0.85, result
    assert (result["log_dir"] / "llmdbg_dynamics.csv").exists()
    assert "llmdbg/dynamics/data_map" in read_events(str(result["log_dir"])).Tags()["images"]
    assert "Most suspicious ids" in capsys.readouterr().out


def test_lightning_cli_yaml_configures_llm_debugger_parts(tmp_path):
    config = tmp_path / "llm.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_llmdbg.LLMDebugger\n"
        "      init_args:\n"
        "        gradients: {every_n_steps: 1}\n"
        "        examples: false\n"
        "        alerts: {action: skip}\n"
    )
    cli = _load("cli").main([
        "fit", "--config", str(EXAMPLES / "llmdbg_cli.yaml"), "--config", str(config), "--trainer.max_steps", "3",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_checkpointing", "false",
    ])
    (debugger,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "LLMDebugger"]
    assert list(debugger.parts) == ["gradients", "activations", "alerts"]
    assert debugger.gradients.schedule.every_n_steps == 1 and debugger.alerts.action == "skip"
    assert [e.step for e in read_events(cli.trainer.logger.log_dir).Scalars("llmdbg/grad_norm/total")] == [0, 1, 2]
