"""The hardest (and easiest) training examples, decoded, with the tokens that carry the loss marked; training
dynamics per example id across the run."""

from __future__ import annotations

import contextlib
import csv
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_llmdbg import distributed
from lightning_llmdbg._lightning import Callback, LightningModule, Trainer, rank_zero_warn
from lightning_llmdbg.dynamics import DynamicsTable
from lightning_llmdbg.examples_stats import (
    IGNORE_INDEX,
    causal_lm_losses,
    classifier_stats,
    display_tokens,
    global_topk,
    labels_look_shifted,
    merge_topk,
    saliency,
)
from lightning_llmdbg.examples_text import (
    data_map_image,
    marked_html,
    marked_markdown,
    redacted_segments,
    token_list,
    token_pieces,
    top_tokens,
    validate_decoder,
)
from lightning_llmdbg.sampling import SampledStepCounters, SamplingSchedule, require_int
from lightning_llmdbg.selection import named_modules, no_match_error
from lightning_llmdbg.signals import PREFIX
from lightning_llmdbg.writers import Writers

TAG = f"{PREFIX}/hard_examples"
DATA_MAP_TAG = f"{PREFIX}/dynamics/data_map"
SUSPICIOUS_TAG = f"{PREFIX}/dynamics/suspicious"
DYNAMICS_CSV = "llmdbg_dynamics.csv"
# Fill values when kept rows of different sequence lengths are stacked: never a real token, label or loss.
PADS = {"input_ids": -1, "labels": IGNORE_INDEX, "attention_mask": 0, "per_token": float("nan")}
SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")
NEEDS_LOSSES = (
    "HardExampleLogger needs per-example losses. Return them from training_step: "
    "`return {'loss': loss, 'per_example_loss': per_example_loss}` (a [batch] tensor; optionally 'per_token_loss' "
    "[batch, seq], 'example_id' [batch], and for classifiers 'logits' [batch, classes] with 'target' [batch]); or pass "
    "`loss_fn=lambda batch, outputs: ...` returning a [batch] tensor; or, for a causal LM, put 'input_ids' and "
    "'labels' in the batch and return the logits: `return {'loss': loss, 'logits': logits}`."
)


def _eager() -> Any:
    """Run compiled functions eagerly within (``torch.compiler.set_stance``, torch >= 2.6; a no-op before)."""
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


class _NoLosses(RuntimeError):
    """training_step's output and the batch give no per-example losses."""


class HardExampleLogger(SampledStepCounters, Callback):
    r"""Log the hardest training examples of each window of steps and of the whole run, and (``dynamics=True``)
    score every example id over the run for how likely it is mislabeled or garbage.

    Where per-example losses come from, in this order:

    1. ``training_step`` returns a dict with ``per_example_loss`` ``[B]``; optionally ``per_token_loss``
       (``[B, T']``: one loss per scored target position, in order: ``T - 1`` columns for Hugging Face labels,
       ``T`` for labels that are already the next tokens), ``example_id`` ``[B]`` (else taken from
       the batch), and for classifiers ``logits`` ``[B, C]`` with ``target`` ``[B]`` (else the batch's ``target``),
       from which margins and confidences follow.
    2. ``loss_fn(batch, outputs)`` returning ``[B]``.
    3. Causal-LM batches (Hugging Face convention): ``input_ids`` and ``labels`` in the batch, ``logits``
       ``[B, T, V]`` in the outputs; next-token cross-entropy, ``-100`` labels ignored, each example's loss the mean
       over its scored tokens. Labels equal to the inputs are shifted (as HF models do); labels that are visibly the
       inputs already shifted by one are not (checked once, or set ``shift_labels``).
    4. ``logits`` ``[B, C]`` and ``target`` ``[B]`` alone: cross-entropy of a classifier.

    Anything else: one warning that says what to return, and the logger switches itself off for the run (agreed
    across ranks on the first batch); training goes on. NaN per-example losses (an example with no target token)
    are left out of the rankings, with one warning that gives their count.

    Per step (the hot path) the batch's losses are merged into on-device top-k buffers: one ``topk`` and a gather of
    the kept rows' token ids per buffer, no host synchronisation. Only on a logged step do the kept few move to the
    host. A logged step (every ``every_n_steps`` optimizer steps, and at the end of training) writes one table:

    - ``llmdbg/hard_examples``: rows ``window`` (the ``k`` hardest since the last log) and ``run`` (the ``k``
      hardest of the run so far, ranked by ``excess``, the loss above the mean of the batch the example came in,
      since early in training every loss is high; with example ids, each id once, at its hardest presentation), with ``window easiest``/``run easiest`` for ``easiest=True``. Columns: scope,
      ``#``, step (the optimizer step whose batch held the example), loss, perplexity (``exp(loss)``), id; for
      excess; classifiers target, predicted, margin, confidence; ``text`` (decoded, the ``mark_tokens`` hardest tokens in
      bold); ``hardest tokens`` (those tokens and their losses); ``saliency`` (the tokens with the largest
      gradient × input on the input embeddings). TensorBoard: a markdown table in the Text tab (TensorBoard keeps
      only 10 samples per text tag by default: start it with ``--samples_per_plugin text=0`` to see every logged
      step). W&B: a ``wandb.Table`` under the same key, its ``text`` column HTML with each token shaded by its
      loss (loss and saliency in the tooltip).

    With ``dynamics=True``, at the end of training:

    - ``llmdbg/dynamics/data_map``: dataset cartography's data map (variability × confidence), the most suspicious
      5% of ids in red (TensorBoard image, ``wandb.Image``);
    - ``llmdbg/dynamics/suspicious``: a table of the ``k`` most suspicious ids and their scores;
    - ``llmdbg_dynamics.csv`` in the log directory: every id's scores (:meth:`dynamics_scores`).

    Token attribution (``attribution=True``): for the window's logged rows, gradient × input on the output of the
    input-embedding module (``get_input_embeddings()``, else the first ``nn.Embedding``, or ``embedding=`` by
    name), summed over the hidden dimension. It runs after the optimizer step, on those few rows only, in eval
    mode, with the RNG state saved and restored, through ``torch.autograd.grad`` with respect to the embedding
    output only, so no parameter's ``.grad``, no optimizer state and no later random draw changes. The same
    forward pass gives per-token losses when the training step did not. It is skipped (with a warning) under
    sharded strategies (FSDP, DeepSpeed), where a forward pass on one rank alone would hang.

    Privacy: ``redact(text) -> text`` sees each example's whole decoded text, on the rank that holds it, before the
    text goes to another process, a logger or a checkpoint; tokens inside redacted stretches are shown by position
    only. ``log_text=False`` logs example ids, positions and numbers only (no text, no token ids).

    Distributed: on a logged step the ranks gather each other's candidate losses (one collective), every rank
    renders its own selected rows, and the rows are gathered (``all_gather_object``), so that the table holds the
    global top-k and every rank keeps the same run-wide rows. With ``dynamics=True`` each step's per-example rows
    are gathered from all ranks (two small collectives per step) so that every rank holds the same table, combined
    by id.

    Memory: the window buffers hold ``k`` rows (``2k`` with ``easiest``) of token ids, labels and per-token losses
    on the device; the run-wide rows are ``k`` rendered rows on the host; dynamics: 64 bytes per example id (up to
    the largest id seen; up to twice that while the table grows).

    Checkpoints keep the sampling counters, the window buffers, the run-wide rows and the dynamics table. Under
    DDP only rank zero's checkpoint is written: on resume the other ranks start their current window empty.

    Args:
        k: examples per scope.
        every_n_steps: log every this many optimizer steps (step 0 included), and at the end of training.
        easiest: also keep and log the ``k`` easiest examples.
        decode: a Hugging Face tokenizer, a callable ``list[int] -> str`` (called per token to place marks), or
            None: bytes (UTF-8) when every id is below 256, else the ids.
        loss_fn: ``loss_fn(batch, outputs) -> Tensor[B]``, used when ``training_step`` returns no
            ``per_example_loss``.
        redact: ``redact(text) -> text``, applied to each example's decoded text before it leaves the process.
        log_text: False logs no text and no token ids: example ids, positions and numbers only.
        attribution: compute the per-token saliency of the window's logged rows.
        embedding: the name (in ``named_modules()``) of the input-embedding module.
        forward_fn: ``forward_fn(pl_module, inputs) -> logits`` for the attribution pass (``inputs``: the kept
            rows' ``input_ids`` and, when the batch had one, ``attention_mask``); default ``pl_module(**inputs)``,
            taking ``.logits`` or ``["logits"]`` of what it returns.
        dynamics: keep per-id training dynamics (needs ``example_id`` in the outputs or the batch).
        mark_tokens: how many tokens per example are marked as hardest and listed by saliency.
        shift_labels: True for Hugging Face labels (``labels == input_ids``, shifted inside), False for labels
            that are already the next tokens; None decides from the first batch.

    Example::

        from pytorch_lightning import Trainer
        from lightning_llmdbg import HardExampleLogger

        trainer = Trainer(callbacks=[HardExampleLogger(k=16, every_n_steps=100, decode=tokenizer)])
    """

    def __init__(
        self,
        k: int = 16,
        every_n_steps: int = 100,
        easiest: bool = False,
        decode: Any = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        redact: Callable[[str], str] | None = None,
        log_text: bool = True,
        attribution: bool = True,
        embedding: str | None = None,
        forward_fn: Callable[[LightningModule, dict], Any] | None = None,
        dynamics: bool = False,
        mark_tokens: int = 5,
        shift_labels: bool | None = None,
    ) -> None:
        require_int("k", k, minimum=1)
        require_int("mark_tokens", mark_tokens, minimum=1)
        self.schedule = SamplingSchedule(every_n_steps=every_n_steps, warmup_steps=0)
        validate_decoder(decode)
        for name, fn in (("loss_fn", loss_fn), ("redact", redact), ("forward_fn", forward_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"`{name}` must be callable or None, got {fn!r}.")
        if embedding is not None and not isinstance(embedding, str):
            raise ValueError(f"`embedding` must be a module name (str) or None, got {embedding!r}.")
        if shift_labels not in (None, True, False):
            raise ValueError(f"`shift_labels` must be True, False or None, got {shift_labels!r}.")
        self.k = k
        self.easiest = bool(easiest)
        self.decode = decode
        self.loss_fn = loss_fn
        self.redact = redact
        self.log_text = bool(log_text)
        self.attribution = bool(attribution)
        self.embedding = embedding
        self.forward_fn = forward_fn
        self.dynamics = bool(dynamics)
        self.mark_tokens = mark_tokens
        self.shift_labels = shift_labels
        self.last_logged: list[dict[str, Any]] = []  # the rows of the latest table, for inspection in code
        self._scopes = ("hardest", "easiest") if self.easiest else ("hardest",)
        # On-device top-k buffers: the window's rows by loss, and the run's candidates by loss above the batch mean.
        self._buffers = self._scopes + tuple(f"run_{s}" for s in self._scopes)
        self._windows: dict[str, tuple[Tensor, dict[str, Tensor]]] = {}
        self._run: dict[str, list[dict[str, Any]]] = {s: [] for s in self._scopes}
        self._window_batches = 0
        self._batch_step = 0
        self._shift: bool | None = shift_labels
        self._table = DynamicsTable("cpu") if self.dynamics else None
        self._embedding_module: nn.Module | None = None
        self._inspect = True
        self._reset_run_flags()
        self._writers: Writers | None = None
        self._clear_windows()

    # -- Lightning hooks ---------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._writers = Writers.for_trainer(trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset_run_flags()
        if self._table is not None:
            self._table.to(trainer.strategy.root_device)
        self._inspect = True
        if type(trainer.strategy).__name__ in SHARDED_STRATEGIES:
            self._inspect = False
            rank_zero_warn(
                f"HardExampleLogger: token attribution and per-token losses need a forward pass on one rank alone, "
                f"which would hang under {type(trainer.strategy).__name__}; they are off."
            )
        self._embedding_module = self._find_embedding(pl_module) if self.attribution else None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_step = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._off:
            return
        # None or {}: training_step returned None (a skipped step) or the batch was skipped; nothing to rank.
        skipped = outputs is None or (isinstance(outputs, Mapping) and not outputs)
        examples, missing = None, None
        try:
            examples = None if skipped else self._examples(outputs, batch)
        except _NoLosses as err:
            missing = str(err)
        if not self._losses_checked:  # the first batch, on every rank: agree whether there are losses to rank
            self._losses_checked = True
            if distributed.agree_any(missing is not None, trainer.strategy.root_device):
                self._switch_off(missing or NEEDS_LOSSES)
                return
        elif missing is not None and "later_missing" not in self._warned:
            # A later batch without losses adds nothing on this rank; agreeing to switch off now would cost a
            # collective on every batch, so the rest goes on as before (the same collectives on every rank).
            self._warned.add("later_missing")
            warnings.warn(f"{missing} (from step {trainer.global_step} on, such batches are left out.)")
        if examples is not None:
            self._collect(examples)
        if self._table is not None:
            local = examples["dynamics"] if examples is not None else torch.empty(0, 5, dtype=torch.float64, device=trainer.strategy.root_device)
            rows = distributed.all_gather_rows(local)  # on every rank (the rows themselves without a process group)
            self._table.add(rows)
        step = self._batch_step
        # Log once the optimizer step is taken (after its last micro-batch), so that attribution sees the new weights.
        if trainer.global_step > step and self.schedule.is_sampled(step) and step != self.last_sampled_step:
            self._log(trainer, pl_module, step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._off:
            return
        step = max(trainer.global_step - 1, 0)
        if distributed.agree_any(self._window_batches > 0, trainer.strategy.root_device) and step != self.last_sampled_step:
            self._log(trainer, pl_module, step)
        if self._table is not None and len(self._table):
            self._write_dynamics(trainer, step)
        if self._writers is not None:
            self._writers.flush()

    # -- where per-example losses come from --------------------------------------------------------------------
    def _examples(self, outputs: Any, batch: Any) -> dict[str, Any]:
        """The batch's per-example losses and the row data to keep, all on the device, without host syncs."""
        out = outputs if isinstance(outputs, Mapping) else {}
        data = batch if isinstance(batch, Mapping) else {}
        logits = out.get("logits", getattr(outputs, "logits", None))
        target = out.get("target", data.get("target"))
        classifier = None
        if isinstance(logits, Tensor) and logits.dim() == 2 and isinstance(target, Tensor):
            classifier = classifier_stats(logits, target)
        per_token = None
        aligned = False  # whether per_token already has the never-predicted first position in front
        if isinstance(out.get("per_example_loss"), Tensor):
            if self.loss_fn is not None and "loss_fn" not in self._warned:
                self._warned.add("loss_fn")
                rank_zero_warn("HardExampleLogger: training_step returns `per_example_loss`, which comes first; `loss_fn` is not used.")
            loss = out["per_example_loss"]
            per_token = out.get("per_token_loss")
        elif self.loss_fn is not None:
            loss = self.loss_fn(batch, outputs)
        elif isinstance(logits, Tensor) and logits.dim() == 3 and isinstance(data.get("labels"), Tensor) and "input_ids" in data:
            with torch.no_grad():
                loss, per_token = causal_lm_losses(logits.detach(), data["labels"], self._shift_for(data))
            aligned = True
        elif classifier is not None:
            loss = classifier["loss"]
        else:
            raise _NoLosses(NEEDS_LOSSES)
        if not isinstance(loss, Tensor) or loss.dim() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise _NoLosses(f"HardExampleLogger: per-example losses must be a [batch] tensor, got {shape}. {NEEDS_LOSSES}")
        loss = loss.detach().float()
        batch_size, device = loss.shape[0], loss.device

        ids = out.get("example_id", data.get("example_id"))
        ids = ids.detach().to(device).long().view(-1) if isinstance(ids, Tensor) else None
        if ids is not None and ids.shape[0] != batch_size:
            raise RuntimeError(f"HardExampleLogger: example_id has {ids.shape[0]} entries for {batch_size} losses.")
        rows: dict[str, Tensor] = {
            "loss": loss,
            # Loss above the batch's mean: what ranks the run's rows (see `run_topk`).
            "excess": loss - loss.nanmean(),
            "id": ids if ids is not None else torch.full((batch_size,), -1, dtype=torch.long, device=device),
            "step": torch.full((batch_size,), self._batch_step, dtype=torch.long, device=device),
        }
        for name in ("input_ids", "labels", "attention_mask"):
            value = data.get(name)
            if isinstance(value, Tensor) and value.dim() == 2 and value.shape[0] == batch_size:
                rows[name] = value.detach().to(device).long()
        if "labels" in rows and "input_ids" in rows:
            self._shift_for(data)
        if isinstance(per_token, Tensor) and per_token.dim() == 2:
            per_token = per_token.detach().float()
            # Aligned with the displayed tokens: the first is never predicted.
            rows["per_token"] = per_token if aligned else torch.cat([torch.full_like(per_token[:, :1], float("nan")), per_token], dim=1)
        if classifier is not None:
            rows["classifier"] = torch.stack([target.to(device).float(), classifier["predicted"], classifier["margin"], classifier["confidence"]], dim=1)

        dynamics = None
        if self._table is not None:
            if ids is None:
                raise RuntimeError(
                    "HardExampleLogger(dynamics=True) needs example ids: put 'example_id' [batch] in the batch or in "
                    "training_step's returned dict."
                )
            if classifier is not None:
                margin, confidence, correct = classifier["margin"], classifier["confidence"], classifier["correct"]
            else:  # a language model: the geometric-mean probability of its tokens; no margin, no correctness
                margin, confidence, correct = torch.full_like(loss, float("nan")), torch.exp(-loss), torch.full_like(loss, float("nan"))
            dynamics = torch.stack([ids.double(), loss.double(), margin.double(), confidence.double(), correct.double()], dim=1)
        return {"rows": rows, "dynamics": dynamics}

    def _shift_for(self, data: Mapping) -> bool:
        if self._shift is None:  # one host synchronisation, on the first batch only
            self._shift = not labels_look_shifted(data["input_ids"], data["labels"])
        return self._shift

    # -- the hot path: on-device top-k ---------------------------------------------------------------------------
    def _clear_windows(self) -> None:
        self._windows = {b: (torch.empty(0), {}) for b in self._buffers}
        self._window_batches = 0

    def _reset_run_flags(self) -> None:
        """What one fit learns about its inputs, forgotten when the next fit starts."""
        self._warned: set[str] = set()
        self._off = False  # switched off for the run: no per-example losses to rank
        self._losses_checked = False
        self._collected_any = False
        self._nonfinite_losses: Tensor | None = None  # on the device: NaN per-example losses left out of the ranking

    def _switch_off(self, reason: str) -> None:
        self._off = True
        self._clear_windows()
        rank_zero_warn(f"{reason} HardExampleLogger is off for the rest of this run; training goes on.")

    def _collect(self, examples: dict[str, Any]) -> None:
        rows = examples["rows"]
        loss = rows["loss"]
        self._collected_any = True
        nonfinite = loss.isnan().sum()  # +inf still ranks first; NaN (e.g. no target token) cannot be ranked
        self._nonfinite_losses = nonfinite if self._nonfinite_losses is None else self._nonfinite_losses + nonfinite
        for buffer in self._buffers:
            keys, kept = self._windows[buffer]
            if keys.numel() and (keys.device != loss.device or set(kept) != set(rows)):
                if set(kept) != set(rows):  # the batch layout changed: keep only what both have
                    rows = {n: t for n, t in rows.items() if n in kept}
                kept = {n: t.to(loss.device) for n, t in kept.items() if n in rows}
                keys = keys.to(loss.device)
            value = rows["excess"] if buffer.startswith("run_") else loss
            new_keys = value if buffer.endswith("hardest") else -value
            self._windows[buffer] = merge_topk(keys, kept, new_keys, rows, self.k, PADS)
        self._window_batches += 1

    # -- a logged step -------------------------------------------------------------------------------------------
    def _log(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        self._warn_about_inputs(step)
        device = trainer.strategy.root_device
        rank = trainer.global_rank
        # Every rank's candidate keys and ids, padded to k: one collective for all buffers.
        padded = torch.full((len(self._buffers), 2, self.k), float("-inf"), dtype=torch.float64, device=device)
        for i, buffer in enumerate(self._buffers):
            keys, rows = self._windows[buffer]
            padded[i, 0, : keys.numel()] = keys.to(device, torch.float64)
            if keys.numel():
                padded[i, 1, : keys.numel()] = rows["id"].to(device, torch.float64)
        gathered = distributed.all_gather_rows(padded.unsqueeze(0)).cpu()  # [world, buffers, 2, k]
        picks: dict[str, list[tuple[int, int]]] = {}
        survivors: dict[str, list[dict[str, Any]]] = {}
        for i, buffer in enumerate(self._buffers):
            candidates = global_topk(gathered[:, i, 0], self.k)
            if not buffer.startswith("run_"):
                picks[buffer] = candidates
                continue
            # Which candidates enter the run's top k is decided from keys and ids alone (the same on every rank),
            # so that only those are rendered.
            scope = buffer.removeprefix("run_")
            sign = 1.0 if scope == "hardest" else -1.0
            pseudo = []
            for r, j in candidates:
                example = int(gathered[r, i, 1, j])
                pseudo.append({"excess": sign * float(gathered[r, i, 0, j]), "id": example if example >= 0 else None, "_pick": (r, j)})
            survivors[scope] = run_topk(self._run[scope], pseudo, self.k, hardest=(scope == "hardest"))
            picks[buffer] = [row["_pick"] for row in survivors[scope] if "_pick" in row]
        mine = {}
        for buffer in self._buffers:
            local = [j for r, j in picks[buffer] if r == rank]
            mine[buffer] = self._render(pl_module, buffer, local, attribute=buffer.endswith("hardest"))
        everyone = distributed.all_gather_objects(mine)
        rendered = {b: [dict(zip(*e[b])) for e in everyone] for b in self._buffers}  # per buffer, per rank: j -> row
        window = {s: [rendered[s][r][j] for r, j in picks[s]] for s in self._scopes}
        for scope in self._scopes:
            by_rank = rendered[f"run_{scope}"]
            self._run[scope] = [by_rank[row["_pick"][0]][row["_pick"][1]] if "_pick" in row else row for row in survivors[scope]]
        self._clear_windows()
        self._count_sample(step)
        self._write_table(step, window)

    def _warn_about_inputs(self, step: int) -> None:
        if not self._collected_any and "no_rows" not in self._warned:
            self._warned.add("no_rows")
            rank_zero_warn(
                f"HardExampleLogger: no per-example losses reached it by step {step}: training_step returned None "
                f"(manual optimization?) or every batch was skipped. {NEEDS_LOSSES}"
            )
        if self._nonfinite_losses is not None and "nan" not in self._warned:
            count = int(self._nonfinite_losses)  # a logged step: the host synchronises here anyway
            if count:
                self._warned.add("nan")
                warnings.warn(
                    f"HardExampleLogger: {count} per-example losses were NaN by step {step} (an example with no target "
                    f"token, or a NaN in the model); they are left out of the rankings. AnomalyAlert checks the loss."
                )

    def _render(self, pl_module: LightningModule, buffer: str, local: list[int], attribute: bool) -> tuple[list[int], list[dict]]:
        """This rank's selected rows of a buffer, as host dicts (text decoded and redacted here, on this rank)."""
        if not local:
            return local, []
        rows = {n: t.index_select(0, torch.tensor(local, device=t.device)) for n, t in self._windows[buffer][1].items()}
        per_token, sal = self._inspect_rows(pl_module, rows, attribute and self._embedding_module is not None)
        host = {n: t.cpu() for n, t in rows.items()}  # the one host transfer of the kept few
        rendered = []
        for i in range(len(local)):
            rendered.append(self._render_row(host, i, per_token[i] if per_token is not None else None, sal[i] if sal is not None else None))
        return local, rendered

    def _render_row(self, host: dict[str, Tensor], i: int, per_token: list[float] | None, sal: list[float] | None) -> dict[str, Any]:
        loss = float(host["loss"][i])
        row: dict[str, Any] = {
            "step": int(host["step"][i]),
            "loss": loss,
            "excess": float(host["excess"][i]),
            "perplexity": float(torch.tensor(loss).exp()),
            "id": int(host["id"][i]) if int(host["id"][i]) >= 0 else None,
        }
        if "classifier" in host:
            target, predicted, margin, confidence = host["classifier"][i].tolist()
            row.update(target=int(target), predicted=int(predicted), margin=margin, confidence=confidence)
        if "input_ids" not in host:
            return row
        tokens = self._display_tokens(host, i)
        length = len(tokens)
        per_token = (per_token or [])[:length] or None
        sal = (sal or [])[:length] or None
        segments = redacted_segments(token_pieces(tokens, self.decode), self.redact) if self.log_text else None
        hardest = top_tokens(per_token, self.mark_tokens) if per_token else []
        if segments is not None:
            row["text"] = marked_markdown(segments, set(hardest))
            row["html"] = marked_html(segments, per_token or [], sal or [], set(hardest))
        row["hardest tokens"] = token_list(hardest, per_token, segments) if per_token else ""
        row["saliency"] = token_list(top_tokens(sal, self.mark_tokens, by_abs=True), sal, segments) if sal else ""
        return row

    def _display_tokens(self, host: dict[str, Tensor], i: int) -> list[int]:
        ids = host["input_ids"][i]
        valid = ids >= 0
        if "attention_mask" in host:
            valid &= host["attention_mask"][i] > 0
        length = int(valid.sum())
        labels = host["labels"][i : i + 1, :length] if "labels" in host else None
        tokens = display_tokens(ids[None, :length], labels, shift=self._shift is not False)[0]
        return [t for t in tokens.tolist() if t >= 0]

    # -- token attribution ---------------------------------------------------------------------------------------
    def _find_embedding(self, pl_module: LightningModule) -> nn.Module | None:
        if self.embedding is not None:
            modules = named_modules(pl_module)
            if self.embedding not in modules:
                raise no_match_error("embedding module", self.embedding, [n for n in modules if n])
            return modules[self.embedding]
        for module in pl_module.modules():
            getter = getattr(module, "get_input_embeddings", None)
            if callable(getter):
                try:
                    found = getter()
                except (NotImplementedError, AttributeError):
                    continue
                if isinstance(found, nn.Module):
                    return found
        found = next((m for m in pl_module.modules() if isinstance(m, nn.Embedding)), None)
        if found is None:
            rank_zero_warn("HardExampleLogger: no input-embedding module found (no get_input_embeddings(), no nn.Embedding); pass `embedding=` by name. Attribution is off.")
        return found

    def _inspect_rows(self, pl_module: LightningModule, rows: dict[str, Tensor], attribute: bool) -> tuple[list | None, list | None]:
        """Per-token losses (where the training step gave none) and saliency of a few kept rows, outside the
        training graph: rows grouped by length so that no padding enters the model."""
        per_token = rows["per_token"].tolist() if "per_token" in rows else None
        scorable = "labels" in rows or "classifier" in rows
        need_tokens = per_token is None and "labels" in rows
        if not self._inspect or "input_ids" not in rows or not scorable or not (attribute or need_tokens):
            return per_token, None
        n = rows["input_ids"].shape[0]
        lengths = (rows["input_ids"] >= 0).sum(dim=1).tolist()
        tokens_out: list[list[float] | None] = [None] * n
        sal_out: list[list[float] | None] = [None] * n
        try:
            # Eagerly, even inside a `torch.compile`d model: a few rows of other shapes, with a hook on the
            # embedding, would otherwise compile graphs of their own (and replace the training step's).
            with _eager():
                for length in sorted(set(lengths)):
                    index = [i for i in range(n) if lengths[i] == length]
                    group = {name: t[index][:, :length] if t.dim() == 2 and name != "classifier" else t[index] for name, t in rows.items()}
                    tok, sal = self._attribute(pl_module, group, attribute)
                    for j, i in enumerate(index):
                        tokens_out[i] = tok[j] if tok is not None else None
                        sal_out[i] = sal[j] if sal is not None else None
        except Exception as err:  # noqa: BLE001 - a display feature must never stop training
            self._inspect = False
            rank_zero_warn(f"HardExampleLogger: the attribution forward pass failed ({type(err).__name__}: {err}); per-token losses and saliency are off. Pass `forward_fn=` or `attribution=False`.")
            return per_token, None
        return (per_token if per_token is not None else tokens_out), (sal_out if attribute else None)

    def _attribute(self, pl_module: LightningModule, rows: dict[str, Tensor], attribute: bool) -> tuple[list | None, list | None]:
        captured: list[Tensor] = []

        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            # A leaf cut off from the embedding weights: gradients go to it alone, never to a parameter.
            leaf = output.detach().requires_grad_(True)
            captured.append(leaf)
            return leaf

        inputs = {"input_ids": rows["input_ids"]}
        if "attention_mask" in rows:
            inputs["attention_mask"] = rows["attention_mask"]
        modes = {m: m.training for m in pl_module.modules()}
        device = rows["input_ids"].device
        handle = self._embedding_module.register_forward_hook(hook) if attribute else None
        try:
            # The CPU generator always, the device's too: nothing here may shift a later dropout mask or shuffle.
            rng_devices = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=rng_devices), torch.set_grad_enabled(attribute):
                pl_module.eval()
                output = self.forward_fn(pl_module, inputs) if self.forward_fn is not None else pl_module(**inputs)
                logits = output if isinstance(output, Tensor) else (output["logits"] if isinstance(output, Mapping) else output.logits)
                per_token = None
                if "labels" in rows and logits.dim() == 3:
                    per_example, aligned = causal_lm_losses(logits, rows["labels"], self._shift is not False)
                    per_token = aligned.detach().tolist()
                    total = per_example.nansum()
                else:
                    total = F.cross_entropy(logits.float(), rows["classifier"][:, 0].long(), reduction="sum")
                sal = None
                if attribute and captured:
                    grad = torch.autograd.grad(total, captured[0])[0]
                    values = saliency(captured[0], grad)
                    if self._shift is False and "labels" in rows:  # the displayed tokens end with the last label
                        values = torch.cat([values, torch.full_like(values[:, :1], float("nan"))], dim=1)
                    sal = values.tolist()
        finally:
            if handle is not None:
                handle.remove()
            for module, mode in modes.items():
                module.training = mode
        return per_token, sal

    # -- output --------------------------------------------------------------------------------------------------
    def _write_table(self, step: int, window: dict[str, list[dict[str, Any]]]) -> None:
        sections = []
        for scope in self._scopes:
            suffix = "" if scope == "hardest" else " easiest"
            sections.append((f"window{suffix}", window[scope]))
            sections.append((f"run{suffix}", self._run[scope]))
        rows = [(name, i, row) for name, part in sections for i, row in enumerate(part, start=1)]
        self.last_logged = [{"scope": name, "#": i, **row} for name, i, row in rows]
        if self._writers is None or not rows:
            return
        has = lambda key: any(key in row for _, _, row in rows)
        columns = ["scope", "#", "step", "loss", "excess", "perplexity", "id"]
        columns += ["target", "predicted", "margin", "confidence"] if has("target") else []
        columns += ["text"] if has("text") else []
        columns += ["hardest tokens", "saliency"] if has("hardest tokens") else []
        table = [[_cell(row.get(c)) for c in columns] for row in self.last_logged]
        html = {"text": [row.get("html", "") for row in self.last_logged]} if "text" in columns else None
        self._writers.table(TAG, columns, table, step, html=html)

    def _write_dynamics(self, trainer: Trainer, step: int) -> None:
        scores = self.dynamics_scores()
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective on every rank: call it everywhere
        if not trainer.is_global_zero:
            return
        os.makedirs(log_dir, exist_ok=True)
        names = list(scores)
        with open(os.path.join(log_dir, DYNAMICS_CSV), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(names)
            for values in zip(*(scores[n].tolist() for n in names)):
                writer.writerow([int(v) if n in ("id", "presentations") else f"{v:.6g}" for n, v in zip(names, values)])
        if self._writers is None:
            return
        order = scores["suspicion"].nan_to_num(float("-inf")).argsort(descending=True)
        flagged = torch.zeros(len(order), dtype=torch.bool)
        flagged[order[: max(1, round(0.05 * len(order)))]] = True
        image = data_map_image(scores["confidence"].tolist(), scores["variability"].tolist(), flagged.tolist())
        self._writers.image(DATA_MAP_TAG, image, step)
        top = order[: self.k].tolist()
        columns = ["#", "id", "suspicion", "presentations", "mean loss", "aum", "confidence", "variability", "forgetting"]
        keys = ["id", "suspicion", "presentations", "mean_loss", "aum", "confidence", "variability", "forgetting"]
        table = [[i + 1] + [_cell(scores[key][j].item()) for key in keys] for i, j in enumerate(top)]
        self._writers.table(SUSPICIOUS_TAG, columns, table, step)

    # -- public ------------------------------------------------------------------------------------------------
    def dynamics_scores(self) -> dict[str, Tensor]:
        """Per example id seen (ascending), on the CPU: ``id``, ``presentations``, ``mean_loss``, ``last_loss``,
        ``aum`` (mean margin; NaN for language models), ``confidence`` and ``variability`` (mean and standard
        deviation over presentations of the probability of the given label; for language models of
        ``exp(-loss)``), ``forgetting`` (events; NaN for language models) and ``suspicion`` (−AUM for classifiers,
        mean loss for language models)."""
        if self._table is None:
            raise RuntimeError("HardExampleLogger: training dynamics are off; construct it with dynamics=True.")
        return self._table.scores()

    def suspicious_examples(self, n: int | None = None) -> list[int]:
        """Example ids, most likely mislabeled or garbage first (by ``suspicion``); the first ``n`` if given."""
        scores = self.dynamics_scores()
        order = scores["suspicion"].nan_to_num(float("-inf")).argsort(descending=True, stable=True)
        return scores["id"][order[:n] if n is not None else order].tolist()

    # -- checkpoint ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            rank=torch.distributed.get_rank() if distributed.is_distributed() else 0,
            windows={s: {"keys": keys.cpu(), "rows": {n: t.cpu() for n, t in rows.items()}} for s, (keys, rows) in self._windows.items()},
            window_batches=self._window_batches,
            run={s: [dict(r) for r in rows] for s, rows in self._run.items()},
            shift=self._shift,
            dynamics=self._table.state_dict() if self._table is not None else None,
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        rank = torch.distributed.get_rank() if distributed.is_distributed() else 0
        windows = state_dict.get("windows", {})
        if state_dict.get("rank", 0) == rank and all(b in windows for b in self._buffers):
            self._windows = {b: (windows[b]["keys"], dict(windows[b]["rows"])) for b in self._buffers}
            self._window_batches = int(state_dict.get("window_batches", 0))
        run = state_dict.get("run", {})
        self._run = {s: [dict(r) for r in run.get(s, [])] for s in self._scopes}
        if self._shift is None:
            self._shift = state_dict.get("shift")
        if self._table is not None and state_dict.get("dynamics") is not None:
            self._table.load_state_dict(state_dict["dynamics"])


def run_topk(run: list[dict[str, Any]], window: list[dict[str, Any]], k: int, hardest: bool) -> list[dict[str, Any]]:
    """The run's k hardest (or easiest) examples: the top k of the previous run rows and this window's by their
    loss above the mean of the batch they came in, each example id once, at its hardest (easiest) presentation.
    Every rank does the same stable sort.

    Not by the loss itself: early in training every example's loss is high, so the run's highest losses would be the
    first batches' ordinary examples; the excess over the batch finds the examples that are hard for the model of
    their time (garbage, mislabeled data) in any phase of training.
    """
    sign = 1.0 if hardest else -1.0
    out, seen = [], set()
    for row in sorted(run + window, key=lambda row: -sign * row["excess"]):
        if row["id"] is not None and row["id"] in seen:
            continue
        seen.add(row["id"])
        out.append(row)
    return out[:k]


def _cell(value: Any) -> Any:
    """Table cells: floats to 6 significant digits, None as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value
