"""``llmdbg report LOGDIR``: a health summary of a run from its TensorBoard event files, and PNG plots.

For machines without a browser: reads what the callbacks logged (finished or still running), prints the alerts,
the gradient, update, activation and attention findings, each with its likely cause and a next step, the hardest
examples, and writes PNG plots beside the events (a grad-norm heatmap block × step, activation RMS and kurtosis
by layer × step, and the data map when HardExampleLogger drew one).

    llmdbg report lightning_logs/version_0            # or: python -m lightning_llmdbg.report ...
    llmdbg report lightning_logs --out /tmp/plots
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning_llmdbg.signals import PREFIX

EVENT_GLOB = "events.out.tfevents.*"
SEVERITIES = ("error", "warn", "info")

# Rules of thumb behind the findings, and where they come from.
UPDATE_RATIO_HIGH = 1e-2  # cs231n: updates around 1e-3 of the weights are healthy; 1e-2 per step is too fast
UPDATE_RATIO_LOW = 1e-5  # three decades under 1e-3 (lower learning rate than that rarely teaches anything)
VANISHING_FACTOR = 1e-2  # a group's gradient 100x under the median group's
GROWTH_FACTOR = 10.0  # a signal 10x its early level
# Half of a layer's channels never positive over a batch (AnomalyAlert's dead-units rule). Lower fractions are
# common in the residual stream of a healthy small model, where a channel may keep one sign for a while.
DEAD_FRACTION = 0.5
KURTOSIS_GROWTH = 3.0  # value kurtosis tripling: outlier features forming (LLM.int8, Dettmers et al. 2022)
ENTROPY_COLLAPSE = 0.25  # attention entropy under a quarter of its early level (Zhai et al. 2023, "entropy collapse")
OUTLIER_MAX_RMS = 3.0  # outlier features (|x| >= 6) are only told apart from scale below this RMS
LSE_SQ_HIGH = 100.0  # logsumexp² the z-loss of PaLM (Chowdhery et al. 2022) would push back on


class ReportError(Exception):
    """A LOGDIR that cannot be reported on: missing, or without event files."""


@dataclass
class Run:
    """What one run directory's event files hold (``llmdbg`` tags and any ``*loss*`` scalar)."""

    path: Path
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    images: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)

    def family(self, family: str, stat: str | None = None) -> dict[str, list[tuple[int, float]]]:
        """``llmdbg/<family>/<name>[/<stat>]`` series by name, in natural order (block_2 before block_10)."""
        out = {}
        for tag, series in self.scalars.items():
            parts = tag.split("/")
            if len(parts) < 3 or parts[0] != PREFIX or parts[1] != family:
                continue
            if stat is None and len(parts) == 3:
                out[parts[2]] = series
            elif stat is not None and len(parts) >= 4 and parts[-1] == stat:
                out["/".join(parts[2:-1])] = series
        return dict(sorted(out.items(), key=lambda kv: model_order(kv[0])))


@dataclass
class Finding:
    severity: str
    what: str
    cause: str = ""
    next_step: str = ""


def model_order(name: str) -> tuple:
    """Embeddings first, then blocks and layers in natural order (block_2 before block_10), the head last."""
    rank = 0 if name.startswith("embeddings") else 3 if name.startswith("head") else 2 if name.startswith("total") else 1
    return (rank, [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)])


# -- reading -----------------------------------------------------------------------------------------------------
def find_runs(logdir: str | Path) -> list[Path]:
    root = Path(logdir)
    if not root.exists():
        raise ReportError(f"LOGDIR {str(root)!r} does not exist.")
    files = [root] if root.is_file() else sorted(root.rglob(EVENT_GLOB))
    dirs = sorted({f.parent for f in files if f.name.startswith("events.out.tfevents.")})
    if not dirs:
        raise ReportError(
            f"No TensorBoard event files ({EVENT_GLOB}) under {str(root)!r}. Point it at the log dir a run with a "
            "TensorBoardLogger wrote (the demo prints it), e.g. lightning_logs/version_0."
        )
    return dirs


def load_run(path: Path) -> Run:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    run = Run(path)
    tags = acc.Tags()
    for tag in tags.get("scalars", []):
        if tag.startswith(f"{PREFIX}/") or "loss" in tag:
            run.scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    for tag in tags.get("tensors", []):  # the text plugin stores strings as tensors
        if tag.startswith(f"{PREFIX}/"):
            texts = []
            for e in acc.Tensors(tag):
                values = e.tensor_proto.string_val
                if values:
                    texts.append((e.step, values[0].decode("utf-8", "replace")))
            if texts:
                run.texts[tag.removesuffix("/text_summary")] = texts
    for tag in tags.get("images", []):
        if tag.startswith(f"{PREFIX}/"):
            run.images[tag] = [(e.step, e.encoded_image_string) for e in acc.Images(tag)]
    return run


# -- findings ----------------------------------------------------------------------------------------------------
def _values(series: Sequence[tuple[int, float]]) -> list[float]:
    return [v for _, v in series if math.isfinite(v)]


def _early_late(series: Sequence[tuple[int, float]]) -> tuple[float, float] | None:
    """Medians of the first and last quarter of a series' finite values (None with fewer than 4 of them)."""
    values = _values(series)
    if len(values) < 4:
        return None
    q = max(1, len(values) // 4)
    return statistics.median(values[:q]), statistics.median(values[-q:])


def gradient_findings(run: Run) -> list[Finding]:
    out = []
    norms = {g: s for g, s in run.family("grad_norm").items() if not g.startswith("total")}
    for group, series in run.family("grad_nonfinite").items():
        bad = [step for step, v in series if v > 0]
        if bad:
            out.append(Finding(
                "error", f"non-finite gradients in {group} at steps {bad[:5]}{' ...' if len(bad) > 5 else ''}",
                "an overflow (fp16 without a loss scaler, a too-high learning rate) or NaN/Inf in the data or loss",
                "log which parameters (GradientMonitor warns with their names), check the batch at that step, "
                "lower the learning rate or use bf16 / a GradScaler",
            ))
    late = {g: el[1] for g, s in norms.items() if (el := _early_late(s))}
    if late:
        middle = statistics.median(late.values())
        for group, value in late.items():
            if middle > 0 and value < VANISHING_FACTOR * middle:
                out.append(Finding(
                    "warn", f"gradient of {group} is {middle / max(value, 1e-30):.0f}x under the median group's",
                    "dead or saturated units, a broken residual path, or parameters that the loss no longer reaches",
                    f"check llmdbg/act/{group}*/dead_frac and the initialisation of that block",
                ))
    for group, series in norms.items():
        el = _early_late(series)
        if el and el[0] > 0 and el[1] > GROWTH_FACTOR * el[0]:
            out.append(Finding(
                "warn", f"gradient norm of {group} grew {el[1] / el[0]:.0f}x ({el[0]:.3g} -> {el[1]:.3g})",
                "training becoming unstable: a learning rate too high for this group, or growing activations",
                "lower the learning rate or lengthen warm-up, clip gradients (gradient_clip_val=1.0)",
            ))
    ratios = {g: el[1] for g, s in run.family("update_ratio").items() if (el := _early_late(s))}
    high = {g: r for g, r in ratios.items() if r > UPDATE_RATIO_HIGH}
    if high and len(high) == len(ratios):
        out.append(Finding(
            "warn", f"update/weight ratio of every group is above {UPDATE_RATIO_HIGH:g} per step "
            f"(median {statistics.median(high.values()):.2g}; healthy: about 1e-3)",
            "learning rate too high overall (early in training, Adam on small-init weights also looks like this)",
            "lower the learning rate or lengthen warm-up, and look again once warm-up is over",
        ))
    else:
        for group, ratio in high.items():
            out.append(Finding(
                "warn", f"update/weight ratio of {group} is {ratio:.2g} per step (healthy: about 1e-3)",
                "learning rate too high for that group",
                "try a lower learning rate for it (a param group of its own) or a longer warm-up",
            ))
    for group, ratio in ratios.items():
        if 0 < ratio < UPDATE_RATIO_LOW:
            out.append(Finding(
                "info", f"update/weight ratio of {group} is {ratio:.2g} per step (healthy: about 1e-3)",
                "that group barely learns: learning rate too low, or weight decay / clipping dominates",
                "raise its learning rate, or check that it is meant to be (nearly) frozen",
            ))
    return out


def activation_findings(run: Run) -> list[Finding]:
    out = []
    for module, series in run.family("act", "dead_frac").items():
        values = _values(series)
        if values and values[-1] > DEAD_FRACTION:
            el = _early_late(series)
            growing = bool(el and el[1] > el[0] + 0.05)
            out.append(Finding(
                "warn", f"{values[-1]:.0%} of {module}'s channels are dead (never positive over a batch)"
                + (f", up from {el[0]:.0%}" if growing else ""),
                "a large negative bias or a too-high learning rate pushed units below zero for good",
                "check the initialisation and the activation's bias; lower the learning rate; consider GELU/SiLU",
            ))
    rms = run.family("act", "rms")
    for module, series in run.family("act", "outliers").items():
        values = _values(series)
        scale = _values(rms.get(module, []))
        # |x| >= 6 marks an outlier only where the typical value is well below 6 (LLM.int8's layers are normalised):
        # a residual stream at RMS 5 has most channels past 6 at 6% of positions, which is scale, not outliers.
        if values and values[-1] > 0 and (not scale or scale[-1] < OUTLIER_MAX_RMS):
            out.append(Finding(
                "info", f"{module} has {values[-1]:.0f} outlier features (|x| >= 6 at >= 6% of positions)",
                "emergent outlier dimensions (LLM.int8): normal in larger transformers, trouble for int8 quantisation",
                "watch the count over training; quantise with outlier-aware methods (LLM.int8, SmoothQuant)",
            ))
    for module, series in run.family("act", "kurtosis").items():
        el = _early_late(series)
        if el and el[0] > 0 and el[1] > KURTOSIS_GROWTH * el[0]:
            out.append(Finding(
                "warn", f"kurtosis of {module}'s activations grew {el[1] / el[0]:.1f}x ({el[0]:.3g} -> {el[1]:.3g})",
                "a few channels or positions taking over (outlier features, attention sinks)",
                "look at llmdbg/act/.../channel_kurtosis and outliers; a lower learning rate or QK-norm can help",
            ))
    # The mean over heads: single heads legitimately go near 0 (a previous-token head); a collapse takes most heads.
    for module, series in run.family("attn", "entropy_mean").items():
        # Attention starts near uniform (entropy log T) and sharpens as heads learn: the baseline is the second
        # quarter of the run, not its first steps.
        el = _early_late(series[len(series) // 4 :]) if len(series) >= 8 else None
        if el and el[0] > 0 and el[1] < ENTROPY_COLLAPSE * el[0]:
            out.append(Finding(
                "warn", f"mean attention entropy of {module} fell from {el[0]:.3g} to {el[1]:.3g}",
                "attention entropy collapse: attention logits growing until one key takes every query",
                "QK-layernorm, a lower learning rate or a longer warm-up (Zhai et al. 2023)",
            ))
    lse = _values(run.scalars.get(f"{PREFIX}/logits/lse_sq", []))
    if lse and lse[-1] > LSE_SQ_HIGH:
        out.append(Finding(
            "info", f"output logits drift: mean logsumexp² is {lse[-1]:.3g}",
            "the softmax normaliser growing without bound, which bf16 then represents poorly",
            "add a z-loss (1e-4 · logsumexp², PaLM)",
        ))
    return out


def loss_findings(run: Run) -> list[Finding]:
    out = []
    for tag, series in run.scalars.items():
        # Lightning's `self.log(..., on_step=True, on_epoch=True)` writes `<name>_step` and `<name>_epoch`.
        if tag.startswith(f"{PREFIX}/") or not re.sub(r"_(step|epoch)$", "", tag).endswith("loss"):
            continue
        values = [v for _, v in series]
        if any(not math.isfinite(v) for v in values):
            out.append(Finding("error", f"{tag} became non-finite", "see the non-finite gradient findings and alerts",
                               "find the first bad step in the alerts; AnomalyAlert(action='skip') keeps the run going"))
        el = _early_late(series)
        if el:
            out.append(Finding("info", f"{tag}: {el[0]:.4g} early -> {el[1]:.4g} late"))
    return out


def all_findings(run: Run) -> list[Finding]:
    found = loss_findings(run) + gradient_findings(run) + activation_findings(run)
    return sorted(found, key=lambda f: SEVERITIES.index(f.severity))


def alerts(run: Run) -> list[tuple[int, str]]:
    """``(step, title)`` of each alert, from the ``**title** (step N)`` first line the writers give it."""
    found = []
    for step, text in run.texts.get(f"{PREFIX}/alerts", []):
        first = text.split("\n", 1)[0]
        match = re.match(r"\*\*(.*)\*\*", first)
        found.append((step, match.group(1) if match else first))
    return found


# -- plots -------------------------------------------------------------------------------------------------------
def _color(t: float) -> tuple[int, int, int]:
    """A dark-blue -> teal -> yellow ramp (viridis-like) for t in [0, 1]; grey for NaN."""
    if not math.isfinite(t):
        return (128, 128, 128)
    stops = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    a, b, f = stops[i], stops[i + 1], t - i
    return tuple(round(a[c] + (b[c] - a[c]) * f) for c in range(3))


def heatmap_png(path: Path, title: str, rows: dict[str, list[tuple[int, float]]], log_scale: bool) -> Path | None:
    """Rows × sampled steps, coloured by value (log10 when ``log_scale``), with row labels and the value range."""
    from PIL import Image, ImageDraw

    if not rows:
        return None
    steps = sorted({s for series in rows.values() for s, _ in series})
    column = {s: i for i, s in enumerate(steps)}

    def scale(v: float) -> float:
        if not math.isfinite(v):
            return math.nan
        return math.log10(v) if log_scale else v

    scaled = {name: {column[s]: scale(v) if (v > 0 or not log_scale) else math.nan for s, v in series} for name, series in rows.items()}
    finite = [v for row in scaled.values() for v in row.values() if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = (hi - lo) or 1.0
    label_w, cell_h, top = 8 * max(len(n) for n in rows) + 10, 16, 30
    cell_w = max(2, min(24, 900 // max(len(steps), 1)))
    width, height = label_w + cell_w * len(steps) + 10, top + cell_h * len(rows) + 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), title, fill="black")
    for r, (name, row) in enumerate(scaled.items()):
        y = top + r * cell_h
        draw.text((4, y + 3), name, fill="black")
        for c, v in row.items():
            x = label_w + c * cell_w
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 2], fill=_color((v - lo) / span if math.isfinite(v) else v))
    unit = "log10 " if log_scale else ""
    draw.text((label_w, height - 24), f"steps {steps[0]}..{steps[-1]}; colour: {unit}value {lo:.3g} (dark) .. {hi:.3g} (yellow)", fill="black")
    image.save(path)
    return path


def write_plots(run: Run, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    grad = {g: s for g, s in run.family("grad_norm").items() if not g.startswith("total")}
    written = [
        heatmap_png(out_dir / "grad_norm_heatmap.png", "gradient norm by group x step (log10)", grad, log_scale=True),
        heatmap_png(out_dir / "activation_rms.png", "activation RMS by layer x step (log10)", run.family("act", "rms"), log_scale=True),
        heatmap_png(out_dir / "activation_kurtosis.png", "activation kurtosis by layer x step (log10)", run.family("act", "kurtosis"), log_scale=True),
    ]
    for tag, images in run.images.items():
        if tag.endswith("data_map") and images:
            path = out_dir / "data_map.png"
            path.write_bytes(images[-1][1])
            written.append(path)
    return [p for p in written if p is not None]


# -- output ------------------------------------------------------------------------------------------------------
def render(run: Run, findings: list[Finding], plots: list[Path], max_rows: int = 10) -> str:
    lines = [f"# llmdbg report: {run.path}", ""]
    steps = [s for series in run.scalars.values() for s, _ in series]
    if steps:
        lines.append(f"steps {min(steps)}..{max(steps)}; {len(run.scalars)} scalar series")
    found = alerts(run)
    lines += ["", f"## Alerts ({len(found)})"]
    lines += [f"- step {step}: {title}" for step, title in found[:max_rows]] or ["- none"]
    if len(found) > max_rows:
        lines.append(f"- ... {len(found) - max_rows} more")

    norms = {g: _values(s) for g, s in run.family("grad_norm").items() if not g.startswith("total") and _values(s)}
    if norms:
        ranked = sorted(norms, key=lambda g: norms[g][-1], reverse=True)
        lines += ["", "## Gradient norms (last sampled step; trend = late / early median)"]
        for group in ranked[:3] + [g for g in ranked[-3:] if g not in ranked[:3]]:
            el = _early_late(run.family("grad_norm")[group])
            trend = f", trend x{el[1] / el[0]:.2g}" if el and el[0] > 0 else ""
            lines.append(f"- {group}: {norms[group][-1]:.4g}{trend}")

    lines += ["", f"## Findings ({len(findings)})"]
    for f in findings:
        lines.append(f"- [{f.severity}] {f.what}")
        if f.cause:
            lines.append(f"  likely cause: {f.cause}")
        if f.next_step:
            lines.append(f"  next step: {f.next_step}")
    if not findings:
        lines.append("- nothing out of the ordinary")

    hard = run.texts.get(f"{PREFIX}/hard_examples")
    if hard:
        step, table = hard[-1]
        rows = table.splitlines()
        lines += ["", f"## Hardest examples (step {step})"] + rows[: max_rows + 2]
    if plots:
        lines += ["", "## Plots"] + [f"- {p}" for p in plots]
    return "\n".join(lines)


def report(logdir: str | Path, out: str | Path | None = None) -> str:
    """The report of every run under ``logdir`` as text; plots go to ``out`` (default: each run's own dir)."""
    paths = find_runs(logdir)
    parts = []
    for path in paths:
        run = load_run(path)
        if out is None:
            plot_dir = path / "llmdbg_report"
        else:
            plot_dir = Path(out) / path.relative_to(logdir) if len(paths) > 1 else Path(out)
        parts.append(render(run, all_findings(run), write_plots(run, plot_dir)))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmdbg", description="lightning_llmdbg command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="health summary of a run from its TensorBoard logs, with PNG plots")
    rep.add_argument("logdir", help="a run's log dir (or a parent of several), e.g. lightning_logs/version_0")
    rep.add_argument("--out", help="where to write the PNGs (default: <run dir>/llmdbg_report)")
    args = parser.parse_args(argv)
    try:
        print(report(args.logdir, args.out))
    except ReportError as err:
        print(f"llmdbg report: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
