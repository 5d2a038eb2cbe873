"""The two Lightning namespaces: ``pytorch_lightning`` and ``lightning.pytorch`` (the unified ``lightning`` package).

Each namespace's Trainer accepts only callbacks that are instances of its own ``Callback`` class, and a user may
have either package or both. The package's callbacks derive from :data:`Callback`, a class that is both, so that
either Trainer takes them. Loggers and strategies are recognised by class name (``writers.py``), never by
``isinstance`` against one namespace's classes. Rank-zero logging goes through ``lightning_utilities``, whose rank
both namespaces set.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


def _available_namespaces() -> list[Any]:
    found = []
    for name in NAMESPACES:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
        except Exception:  # noqa: BLE001 - a broken extra install must not break the namespace that works
            if not found:
                raise
    if not found:
        raise ImportError(
            "lightning_llmdbg needs PyTorch Lightning: `pip install pytorch-lightning` (or the unified `lightning`)."
        )
    return found


_MODULES = _available_namespaces()

if TYPE_CHECKING:
    from pytorch_lightning import Callback, LightningModule, Trainer
else:
    Callback = type(
        "Callback",
        tuple(module.Callback for module in _MODULES),
        {"__module__": __name__, "__doc__": "A Lightning ``Callback`` of every installed namespace."},
    )
    # Only annotations use these two; the first installed namespace's classes stand for both.
    Trainer = _MODULES[0].Trainer
    LightningModule = _MODULES[0].LightningModule

__all__ = ["Callback", "LightningModule", "Trainer", "rank_zero_info", "rank_zero_warn"]
