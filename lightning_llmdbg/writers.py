"""One layer over the Trainer's loggers: the only place that touches ``SummaryWriter`` or ``wandb``.

Callbacks hand it scalars, histograms, text, tables, images and alerts; it sends each to every logger that
can show it. Only global rank zero writes. With no logger at all it warns once and writes to Python logging.
"""

from __future__ import annotations

import importlib
import logging
import sys
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_llmdbg._lightning import rank_zero_warn
from lightning_llmdbg.stats import Histogram

log = logging.getLogger("lightning_llmdbg")

ALERT_LEVELS = ("INFO", "WARN", "ERROR")
# The custom-scalars category that tells a run's health story on one page; it comes first in the layout, whichever
# callback adds to it first. The per-family categories follow in the order they were added.
HEALTH_CATEGORY = "llmdbg: health"
WANDB_INSTALL_HINT = 'wandb is not installed. Install it with: pip install "lightning-llmdbg[wandb]"'


def import_wandb() -> Any:
    """Import ``wandb`` on demand, with an error that names the extra to install."""
    try:
        return importlib.import_module("wandb")
    except ImportError as err:
        raise ImportError(WANDB_INSTALL_HINT) from err


def _is_logger(logger: Any, class_name: str) -> bool:
    # By class name so that loggers from both `pytorch_lightning` and `lightning.pytorch` are recognised.
    return any(cls.__name__ == class_name for cls in type(logger).__mro__)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


class Writers:
    """Where callbacks write. Get the one for a trainer with :meth:`Writers.for_trainer` so that callbacks share it.

    Args:
        trainer: the Trainer whose loggers to write to.
    """

    _by_trainer: "weakref.WeakKeyDictionary[Any, Writers]" = weakref.WeakKeyDictionary()

    def __init__(self, trainer: Any) -> None:
        # Weak, so that the cache below (keyed weakly by trainer) does not keep every Trainer alive.
        self._trainer_ref = weakref.ref(trainer)
        self._layout: dict[str, dict[str, list]] = {}
        self._warned_no_logger = False

    @classmethod
    def for_trainer(cls, trainer: Any) -> "Writers":
        writers = cls._by_trainer.get(trainer)
        if writers is None:
            writers = cls._by_trainer[trainer] = cls(trainer)
        return writers

    # -- where -----------------------------------------------------------------------------------------------
    @property
    def _trainer(self) -> Any:
        trainer = self._trainer_ref()
        if trainer is None:
            raise RuntimeError("lightning_llmdbg: the Trainer these writers belong to no longer exists.")
        return trainer

    @property
    def enabled(self) -> bool:
        return bool(self._trainer.is_global_zero)

    @property
    def loggers(self) -> list:
        return list(self._trainer.loggers)

    def _tensorboards(self) -> list:
        return [lg.experiment for lg in self.loggers if _is_logger(lg, "TensorBoardLogger")]

    def _wandb_runs(self) -> list:
        return [lg.experiment for lg in self.loggers if _is_logger(lg, "WandbLogger")]

    def _python_logging_only(self, scalars: bool = False) -> bool:
        """Whether output of this kind goes to Python logging: all of it with no logger; text and tables when no
        logger shows them (a CSVLogger takes scalars only). Warns once, naming the loggers."""
        loggers = self.loggers
        if scalars and loggers:
            return False
        if any(_is_logger(lg, n) for lg in loggers for n in ("TensorBoardLogger", "WandbLogger")):
            return False
        if not self._warned_no_logger:
            self._warned_no_logger = True
            if loggers:
                names = ", ".join(type(lg).__name__ for lg in loggers)
                message = (
                    f"lightning_llmdbg: the Trainer's loggers ({names}) take scalars only, so debugger tables, text "
                    "and alerts go to Python logging (logger 'lightning_llmdbg') and histograms and images are not "
                    "written. Add a TensorBoardLogger or a WandbLogger to see them."
                )
            else:
                message = (
                    "lightning_llmdbg: the Trainer has no logger, so debugger output goes to Python logging "
                    "(logger 'lightning_llmdbg'). Pass `logger=TensorBoardLogger(...)` or a WandbLogger to see it as charts."
                )
            rank_zero_warn(message)
        return True

    # -- what ------------------------------------------------------------------------------------------------
    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Every logger, through ``log_metrics``."""
        if not self.enabled or not metrics:
            return
        if self._python_logging_only(scalars=True):
            body = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            log.info("step %d %s", step, body)
            return
        for logger in self.loggers:
            if _is_logger(logger, "TensorBoardLogger"):
                self._tensorboard_scalars(logger, metrics, step)
            else:
                logger.log_metrics(dict(metrics), step=step)

    @staticmethod
    def _tensorboard_scalars(logger: Any, metrics: Mapping[str, float], step: int) -> None:
        """All of a step's scalars as one event. Through ``log_metrics`` each scalar is an event of its own, and
        ``SummaryWriter``'s bounded queue (10 events by default) makes the training thread wait on the writer thread
        for most of them: about 25 µs a scalar, 1.3 ms for the 46 scalars of a probed step of the reference GPT."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        prefix = getattr(logger, "_prefix", "") or ""
        join = getattr(logger, "LOGGER_JOIN_CHAR", "-")
        summary = Summary(
            value=[Summary.Value(tag=f"{prefix}{join}{k}" if prefix else k, simple_value=float(v)) for k, v in metrics.items()]
        )
        logger.experiment._get_file_writer().add_summary(summary, step)

    def histogram(self, tag: str, hist: Histogram, step: int) -> None:
        """TensorBoard ``add_histogram_raw`` and ``wandb.Histogram``; non-finite values are reported, never binned."""
        if not self.enabled or self._python_logging_only():
            return
        if hist.nonfinite:
            log.warning("%s at step %d: %d non-finite values left out of the histogram", tag, step, hist.nonfinite)
        if hist.num == 0:
            return
        for writer in self._tensorboards():
            writer.add_histogram_raw(
                tag,
                min=hist.min,
                max=hist.max,
                num=hist.num,
                sum=hist.sum,
                sum_squares=hist.sum_squares,
                bucket_limits=hist.edges[1:],
                bucket_counts=hist.counts,
                global_step=step,
            )
        runs = self._wandb_runs()
        if runs:
            wandb = import_wandb()
            value = wandb.Histogram(np_histogram=(hist.counts, hist.edges))
            for run in runs:
                run.log({tag: value, "trainer/global_step": step})

    def text(self, tag: str, markdown: str, step: int) -> None:
        if not self.enabled:
            return
        if self._python_logging_only():
            log.info("%s (step %d):\n%s", tag, step, markdown)
            return
        for writer in self._tensorboards():
            writer.add_text(tag, markdown, global_step=step)
        runs = self._wandb_runs()
        if runs:
            wandb = import_wandb()
            for run in runs:
                run.log({tag: wandb.Html(f"<pre>{markdown}</pre>"), "trainer/global_step": step})

    def table(
        self,
        tag: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        step: int,
        html: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """TensorBoard: a markdown table in the text tab. W&B: a ``wandb.Table``.

        Args:
            html: W&B only: per column name, one HTML string per row that replaces that column's cells as
                ``wandb.Html`` (TensorBoard's markdown renderer drops most HTML, so it keeps the plain cells).
        """
        if not self.enabled:
            return
        if self._python_logging_only():
            log.info("%s (step %d):\n%s", tag, step, markdown_table(columns, rows))
            return
        for writer in self._tensorboards():
            writer.add_text(tag, markdown_table(columns, rows), global_step=step)
        runs = self._wandb_runs()
        if runs:
            wandb = import_wandb()
            data = [list(r) for r in rows]
            for name, cells in (html or {}).items():
                col = list(columns).index(name)
                for row, cell in zip(data, cells):
                    row[col] = wandb.Html(cell)
            for run in runs:
                run.log({tag: wandb.Table(columns=list(columns), data=data), "trainer/global_step": step})

    def image(self, tag: str, image_hwc: Any, step: int) -> None:
        """An ``H×W×3`` uint8 array."""
        if not self.enabled or self._python_logging_only():
            return
        for writer in self._tensorboards():
            writer.add_image(tag, image_hwc, global_step=step, dataformats="HWC")
        runs = self._wandb_runs()
        if runs:
            wandb = import_wandb()
            for run in runs:
                run.log({tag: wandb.Image(image_hwc), "trainer/global_step": step})

    def alert(self, title: str, text: str, step: int, level: str = "WARN", wait_duration: float = 300.0) -> None:
        """W&B ``run.alert`` (also when wandb was started outside Lightning), TensorBoard text, Python logging."""
        if level not in ALERT_LEVELS:
            raise ValueError(f"Alert `level` must be one of {ALERT_LEVELS}, got {level!r}.")
        if not self.enabled:
            return
        (log.error if level == "ERROR" else log.warning)("%s (step %d): %s", title, step, text)
        for writer in self._tensorboards():
            writer.add_text("llmdbg/alerts", f"**{title}** (step {step})\n\n{text}", global_step=step)
        runs = self._wandb_runs()
        if not runs and "wandb" in sys.modules and getattr(sys.modules["wandb"], "run", None) is not None:
            runs = [sys.modules["wandb"].run]
        if runs:
            wandb = import_wandb()
            for run in runs:
                run.alert(
                    title=title[:63],
                    text=text,
                    level=getattr(wandb.AlertLevel, level),
                    wait_duration=wait_duration,
                )

    def custom_scalars(self, category: str, charts: Mapping[str, Sequence[str]]) -> None:
        """Add TensorBoard custom-scalar charts (``{title: [tag regex, ...]}``), merged with those added before.

        TensorBoard keeps one layout per run, so the merged layout is written whole each time, with
        :data:`HEALTH_CATEGORY` first.
        """
        if not self.enabled:
            return
        section = self._layout.setdefault(category, {})
        for title, patterns in charts.items():
            section[title] = ["Multiline", list(patterns)]
        layout = dict(sorted(self._layout.items(), key=lambda kv: kv[0] != HEALTH_CATEGORY))
        for writer in self._tensorboards():
            writer.add_custom_scalars(layout)

    def flush(self) -> None:
        if not self.enabled:
            return
        for writer in self._tensorboards():
            writer.flush()


