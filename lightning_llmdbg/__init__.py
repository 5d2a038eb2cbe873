"""PyTorch Lightning callbacks that debug language-model training from inside the training loop."""

from lightning_llmdbg.callbacks import ActivationProbe, GradientMonitor
from lightning_llmdbg.sampling import SamplingSchedule
from lightning_llmdbg.signals import Signals, SignalSource

__version__ = "0.1.0"
__all__ = ["ActivationProbe", "GradientMonitor", "SamplingSchedule", "Signals", "SignalSource", "__version__"]
