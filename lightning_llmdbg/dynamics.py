"""Training dynamics per example id: O(1) numbers per id across the whole run.

References: area under the margin (AUM, Pleiss et al. 2020: the margin ``z_y - max_{c != y} z_c`` averaged over
the run is low or negative for mislabeled examples), dataset cartography (Swayamdipta et al. 2020: mean and
standard deviation over the run of the probability of the given label, "confidence" and "variability"), and
forgetting events (Toneva et al. 2019: presentations at which an example that was classified correctly is not).

Memory: 8 float64 numbers (64 bytes) per id up to the largest id seen, and up to twice that while the table
grows by doubling. Sums (not Welford running means) so that partial tables add up; the values summed are
bounded (probabilities, losses, logit margins), so float64 sums lose nothing over any realistic run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# Columns of one presentation row, as the callback hands them over.
ROW = ("id", "loss", "margin", "confidence", "correct")
# Per-id columns of the table.
COUNT, LOSS_SUM, MARGIN_SUM, CONF_SUM, CONF_SQ_SUM, LAST_LOSS, LAST_CORRECT, FORGETTING = range(8)
COLUMNS = ("count", "loss_sum", "margin_sum", "confidence_sum", "confidence_sq_sum", "last_loss", "last_correct", "forgetting")


class DynamicsTable:
    """Per-id sums over every presentation of an example, fed a step at a time.

    Presentations are queued on the device (no host synchronisation) and applied in order every
    ``flush_every`` steps, or when the table is read or saved; applying needs one host synchronisation (the
    largest id, to grow the table).

    Args:
        device: where the table lives.
        flush_every: apply queued presentations after this many steps.
    """

    def __init__(self, device: torch.device | str = "cpu", flush_every: int = 32) -> None:
        self.device = torch.device(device)
        self.flush_every = flush_every
        self.table = self._empty(0)
        self._queue: list[Tensor] = []

    def _empty(self, n: int) -> Tensor:
        table = torch.zeros(n, len(COLUMNS), dtype=torch.float64, device=self.device)
        table[:, LAST_CORRECT] = -1.0  # not seen yet
        table[:, LAST_LOSS] = float("nan")
        return table

    def add(self, rows: Tensor) -> None:
        """Queue one step's presentations: ``[B, 5]`` with columns ``id, loss, margin, confidence, correct``
        (``margin`` and ``correct`` NaN where unknown, e.g. for language models)."""
        self._queue.append(rows.detach().to(self.device, torch.float64))
        if len(self._queue) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        largest = int(max(q[:, 0].max() for q in queue if q.numel()).item()) if any(q.numel() for q in queue) else -1
        if largest >= len(self.table):
            grown = self._empty(max(largest + 1, 2 * len(self.table), 1024))
            grown[: len(self.table)] = self.table
            self.table = grown
        for rows in queue:  # in order: forgetting events and the last loss depend on it
            self._apply(rows)

    def _apply(self, rows: Tensor) -> None:
        # A row without a usable id (negative) or loss (NaN: every label ignored) would poison its id's sums for the
        # rest of the run (or index out of range): left out.
        rows = rows[(rows[:, 0] >= 0) & torch.isfinite(rows[:, 1])] if rows.numel() else rows
        if rows.numel() == 0:
            return
        ids = rows[:, 0].long()
        loss, margin, conf, correct = rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4]
        sums = torch.stack([torch.ones_like(loss), loss, margin, conf, conf * conf], dim=1)
        self.table[:, :5].index_add_(0, ids, sums)
        self.table[ids, LAST_LOSS] = loss
        known = ~torch.isnan(correct)
        previous = self.table[ids, LAST_CORRECT]
        forgot = known & (previous == 1.0) & (correct == 0.0)
        self.table[:, FORGETTING].index_add_(0, ids, forgot.double())
        self.table[ids, LAST_CORRECT] = torch.where(known, correct, previous)

    def to(self, device: torch.device | str) -> None:
        self.flush()
        self.device = torch.device(device)
        self.table = self.table.to(self.device)

    def __len__(self) -> int:
        self.flush()
        return int((self.table[:, COUNT] > 0).sum())

    def scores(self) -> dict[str, Tensor]:
        """Per seen id (ascending): ``id``, ``presentations``, ``mean_loss``, ``last_loss``, ``aum`` (mean margin),
        ``confidence``, ``variability``, ``forgetting`` and ``suspicion`` (see :func:`suspicion`), on the CPU."""
        self.flush()
        table = self.table.cpu()
        seen = table[:, COUNT] > 0
        t = table[seen]
        n = t[:, COUNT]
        confidence = t[:, CONF_SUM] / n
        # Population variance, as in dataset cartography; clamp the rounding error of E[p^2] - E[p]^2.
        variability = (t[:, CONF_SQ_SUM] / n - confidence**2).clamp_min(0).sqrt()
        out = {
            "id": torch.nonzero(seen).squeeze(1),
            "presentations": n,
            "mean_loss": t[:, LOSS_SUM] / n,
            "last_loss": t[:, LAST_LOSS],
            "aum": t[:, MARGIN_SUM] / n,
            "confidence": confidence,
            "variability": variability,
            "forgetting": t[:, FORGETTING].masked_fill(t[:, LAST_CORRECT] < 0, float("nan")),
        }
        out["suspicion"] = suspicion(out["aum"], out["mean_loss"])
        return out

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        used = int(torch.nonzero(self.table[:, COUNT] > 0).max().item()) + 1 if len(self) else 0
        return {"table": self.table[:used].cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._queue = []
        self.table = state["table"].to(self.device, torch.float64).clone()


def suspicion(aum: Tensor, mean_loss: Tensor) -> Tensor:
    """How likely an example is mislabeled or garbage, higher = more: minus the area under the margin where
    margins are known (classifiers), else the mean loss over the run (language models, where garbage stays hard)."""
    return torch.where(torch.isnan(aum), mean_loss, -aum)

