from lightning_llmdbg.callbacks.activation_probe import ActivationProbe
from lightning_llmdbg.callbacks.anomaly_alert import AnomalyAlert, TrainingAnomalyError, load_anomaly_bundle
from lightning_llmdbg.callbacks.gradient_monitor import GradientMonitor
from lightning_llmdbg.callbacks.hard_example_logger import HardExampleLogger
from lightning_llmdbg.callbacks.llm_debugger import LLMDebugger

__all__ = [
    "ActivationProbe",
    "AnomalyAlert",
    "GradientMonitor",
    "HardExampleLogger",
    "LLMDebugger",
    "TrainingAnomalyError",
    "load_anomaly_bundle",
]
