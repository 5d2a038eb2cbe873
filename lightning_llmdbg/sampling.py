"""When a debugger measures: every ``every_n_steps`` optimizer steps, and every step during a warm-up."""

from __future__ import annotations

from dataclasses import dataclass


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
        if isinstance(self.every_n_steps, bool) or not isinstance(self.every_n_steps, int) or self.every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be a positive integer, got {self.every_n_steps!r}.")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be a non-negative integer, got {self.warmup_steps!r}.")

    def is_sampled(self, step: int) -> bool:
        return step < self.warmup_steps or step % self.every_n_steps == 0
