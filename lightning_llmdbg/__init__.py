"""PyTorch Lightning callbacks that debug language-model training from inside the training loop."""

from lightning_llmdbg.callbacks import (
    ActivationProbe,
    AnomalyAlert,
    GradientMonitor,
    HardExampleLogger,
    LLMDebugger,
    TrainingAnomalyError,
    load_anomaly_bundle,
)
from lightning_llmdbg.rules import (
    Anomaly,
    AttentionEntropyDrop,
    DeadUnits,
    ExplodingGradient,
    NonFinite,
    OutlierGrowth,
    ParamNormJump,
    Rule,
    Spike,
    UpdateRatio,
    VanishingGradient,
    default_rules,
)
from lightning_llmdbg.sampling import SamplingSchedule
from lightning_llmdbg.signals import Signals, SignalSource

__version__ = "0.1.0"
__all__ = [
    "ActivationProbe",
    "Anomaly",
    "AnomalyAlert",
    "AttentionEntropyDrop",
    "DeadUnits",
    "ExplodingGradient",
    "GradientMonitor",
    "HardExampleLogger",
    "LLMDebugger",
    "NonFinite",
    "OutlierGrowth",
    "ParamNormJump",
    "Rule",
    "SamplingSchedule",
    "SignalSource",
    "Signals",
    "Spike",
    "TrainingAnomalyError",
    "UpdateRatio",
    "VanishingGradient",
    "__version__",
    "default_rules",
    "load_anomaly_bundle",
]
