from lightning_llmdbg.callbacks.gradient_monitor import GradientMonitor

__all__ = ["GradientMonitor"]
