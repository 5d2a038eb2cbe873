"""What a sampled step measured, shared between callbacks through explicit subscription (no globals).

A callback that measures (``GradientMonitor``, later ``ActivationProbe``) is a :class:`SignalSource`; a callback
that reacts (anomaly rules) calls :meth:`SignalSource.subscribe` on the sources it finds in
``trainer.callbacks`` and receives every :class:`Signals` they publish, on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

# Every key the package logs or publishes is `llmdbg/<family>/<name>[/<stat>]`.
PREFIX = "llmdbg"


@dataclass
class Signals:
    """The values one sampled step produced.

    Attributes:
        source: the name of the callback that measured them (``"gradient_monitor"``).
        step: the optimizer step they belong to (``trainer.global_step`` when measured).
        values: metric key (``llmdbg/grad_norm/block_3``) to value; the same keys the writers log.
        details: structured extras, e.g. ``{"nonfinite_parameters": [(name, count), ...]}``.
        before_update: published before the optimizer step it measures, so that a rule may still skip it.
    """

    source: str
    step: int
    values: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    before_update: bool = False


SignalListener = Callable[[Signals], None]


class SignalSource:
    """Mixin for callbacks that publish :class:`Signals`."""

    signal_source_name = "signals"
    latest_signals: Signals | None = None

    def __init_signal_source(self) -> None:
        if not hasattr(self, "_signal_listeners"):
            self._signal_listeners: list[SignalListener] = []

    def subscribe(self, listener: SignalListener) -> Callable[[], None]:
        """Call ``listener`` with every :class:`Signals` published from now on; returns a function that unsubscribes."""
        self.__init_signal_source()
        self._signal_listeners.append(listener)
        return lambda: self._signal_listeners.remove(listener) if listener in self._signal_listeners else None

    def _publish(self, signals: Signals) -> None:
        self.__init_signal_source()
        self.latest_signals = signals
        for listener in list(self._signal_listeners):
            listener(signals)


def signal_sources(callbacks: Iterable[Any]) -> list[SignalSource]:
    """The :class:`SignalSource` callbacks among ``callbacks`` (``trainer.callbacks``), also those inside a
    composite callback such as ``LLMDebugger`` that lists its parts in a ``callbacks`` attribute."""
    found: list[SignalSource] = []
    for callback in callbacks:
        if isinstance(callback, SignalSource):
            found.append(callback)
        inner = getattr(type(callback), "callbacks", None)
        if isinstance(inner, property):
            found.extend(signal_sources(callback.callbacks))
    return found
