from lightning_llmdbg.callbacks.activation_probe import ActivationProbe
from lightning_llmdbg.callbacks.gradient_monitor import GradientMonitor

__all__ = ["ActivationProbe", "GradientMonitor"]
