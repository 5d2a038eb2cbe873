"""Fit the small reference GPT with DDP on 2 CPU processes; NaN in rank 1's gradients only, at one step.

Run as a script (Lightning's launcher re-runs ``sys.argv`` for the second rank, so it cannot run inside pytest):

    python tests/scripts/anomaly_ddp.py {skip,stop} OUT_DIR

Each rank writes ``OUT_DIR/rank<r>.json``: its final step, counters, and a checksum of its parameters.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from lightning_llmdbg import AnomalyAlert, GradientMonitor  # noqa: E402
from tests.helpers import small_data, small_gpt, trainer_kwargs  # noqa: E402

BAD_STEP = 3
STEPS = 8


class NaNOnRankOne(pl.Callback):
    """After DDP has averaged the gradients, so that only rank 1 holds the NaN."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == BAD_STEP and trainer.global_rank == 1:
            pl_module.model.transformer.h[2].attn.c_attn.weight.grad.view(-1)[0] = float("nan")


def main(action: str, out_dir: str) -> None:
    alert = AnomalyAlert(action=action)
    trainer = pl.Trainer(
        max_steps=STEPS,
        logger=False,
        default_root_dir=out_dir,  # where the anomaly bundles go without a logger
        callbacks=[NaNOnRankOne(), GradientMonitor(every_n_steps=2), alert],
        **trainer_kwargs(devices=2, strategy="ddp"),
    )
    trainer.fit(small_gpt(), small_data(batch_size=2))
    params = torch.cat([p.detach().flatten() for p in trainer.lightning_module.parameters()])
    result = {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "skipped": alert.skipped_steps_total,
        "alerts": alert.alerts_total,
        "finite": bool(torch.isfinite(params).all()),
        "checksum": float(params.double().sum()),
    }
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
