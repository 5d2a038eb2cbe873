"""When a debugger measures: every ``every_n_steps`` optimizer steps, and every step during a warm-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingSchedule:
    """Decides which optimizer steps are sampled.

    Args:
        every_n_steps: sample every this many optimizer steps (step 0 included).
        warmup_steps: additionally sample every step below this one; the first steps of a run are where
            initialisation and learning-rate warm-up problems show.

    Example::

        >>> schedule = SamplingSchedule(every_n_steps=25, warmup_steps=3)
        >>> [s for s in range(60) if schedule.is_sampled(s)]
        [0, 1, 2, 25, 50]
    """

    every_n_steps: int = 25
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        require_int("every_n_steps", self.every_n_steps, minimum=1)
        require_int("warmup_steps", self.warmup_steps, minimum=0)

    def is_sampled(self, step: int) -> bool:
        return step < self.warmup_steps or step % self.every_n_steps == 0


def require_int(name: str, value: object, minimum: int) -> None:
    """Raise a ValueError naming ``name`` and ``value`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}.")


class SampledStepCounters:
    """Mixin for sampling callbacks: which step was sampled last and how many were, kept in checkpoints so that a
    resumed run continues its schedule. Comes before ``Callback`` in the bases so that its ``state_dict`` wins."""

    last_sampled_step: int = -1
    samples_taken: int = 0

    def _count_sample(self, step: int) -> None:
        self.last_sampled_step = step
        self.samples_taken += 1

    def state_dict(self) -> dict[str, Any]:
        return {"last_sampled_step": self.last_sampled_step, "samples_taken": self.samples_taken}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_sampled_step = int(state_dict.get("last_sampled_step", -1))
        self.samples_taken = int(state_dict.get("samples_taken", 0))
