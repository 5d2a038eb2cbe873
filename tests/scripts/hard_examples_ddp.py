"""Fit the small reference GPT with HardExampleLogger on 2 CPU processes (DDP, gloo); each rank writes the
per-example losses it saw and its dynamics scores to OUT_DIR/rank<r>.json.

Run as a script (Lightning's launcher re-runs ``sys.argv`` for the second rank, so it cannot run inside pytest):

    python tests/scripts/hard_examples_ddp.py OUT_DIR
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402

from lightning_llmdbg import HardExampleLogger  # noqa: E402
from tests.callbacks.test_hard_example_logger import RecordLosses  # noqa: E402
from tests.helpers import small_data, small_gpt, trainer_kwargs  # noqa: E402

STEPS = 5


def main(out_dir: str) -> None:
    record = RecordLosses()
    logger = HardExampleLogger(k=3, every_n_steps=2, dynamics=True)
    trainer = pl.Trainer(
        max_steps=STEPS,
        logger=TensorBoardLogger(out_dir, name="ddp", version=0),
        callbacks=[record, logger],
        **trainer_kwargs(devices=2, strategy="ddp"),
    )
    # 16 windows: the distributed sampler gives each rank 8, so over 5 steps of 2 every id is seen more than once.
    trainer.fit(small_gpt(), small_data(batch_size=2, train_samples=16))
    scores = {k: v.tolist() for k, v in logger.dynamics_scores().items()}
    with open(Path(out_dir) / f"rank{trainer.global_rank}.json", "w") as f:
        json.dump({"seen": record.seen, "scores": scores, "last_logged": logger.last_logged}, f)


if __name__ == "__main__":
    main(sys.argv[1])
