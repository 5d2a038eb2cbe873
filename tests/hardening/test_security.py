"""What the debugger writes: example text only after `redact`, no environment variable or API key anywhere, and
reproduction bundles that load with `weights_only=True`."""

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from torch.utils.data import DataLoader

from lightning_llmdbg import LLMDebugger
from lightning_llmdbg.report import main as llmdbg_main
from lightning_llmdbg.testing.data import pydoc_corpus
from tests.hardening.test_bad_input import FAULT_AT, Faulty
from tests.helpers import SMALL, small_gpt, trainer_kwargs

SECRET = "sk-live-4f9c2b7e1d"  # in every training example
REDACTED = "REDACTEDCREDENTIAL"  # no character in common with SECRET, none that markdown escapes
PLANTED_ENV = {
    "WANDB_API_KEY": "7e57" * 10,  # the shape of a real key: 40 hex digits
    "HF_TOKEN": "hf_llmdbgPlantedTokenNotReal",
    "LLMDBG_TEST_SECRET": "planted-environment-value-9d81",
}


def examples_with_the_secret(n=48, block_size=SMALL["block_size"]):
    corpus = torch.tensor(list(pydoc_corpus()[: 64 * n]), dtype=torch.long)
    secret = torch.tensor(list(SECRET.encode()), dtype=torch.long)
    items = []
    for i in range(n):
        chunk = corpus[i * 64 : i * 64 + block_size + 1].clone()
        chunk[5 : 5 + len(secret)] = secret
        items.append({"input_ids": chunk[:-1], "labels": chunk[1:], "example_id": torch.tensor(i)})
    return DataLoader(items, batch_size=4)


def test_no_secret_or_environment_value_reaches_any_written_file(tmp_path, monkeypatch, caplog):
    for name, value in PLANTED_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    every = {"every_n_steps": 1}
    debugger = LLMDebugger(
        gradients={**every, "warmup_steps": 0, "histograms": True},
        activations={**every, "histograms": True},
        examples={**every, "k": 3, "dynamics": True, "redact": lambda text: text.replace(SECRET, REDACTED)},
        alerts={"action": "skip"},
    )
    loggers = [
        TensorBoardLogger(str(tmp_path), name="tb", version=0),
        WandbLogger(save_dir=str(tmp_path), offline=True, project="llmdbg-security"),
        CSVLogger(str(tmp_path), name="csv", version=0),
    ]
    model = Faulty(small_gpt().config, "gradient")  # a NaN gradient: an alert and a reproduction bundle
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = pl.Trainer(
        max_steps=6, logger=loggers, callbacks=[debugger, checkpoints], **trainer_kwargs(enable_checkpointing=True)
    )
    with caplog.at_level(logging.DEBUG):
        trainer.fit(model, examples_with_the_secret())
        loggers[1].experiment.finish()
        assert llmdbg_main(["report", loggers[0].log_dir, "--out", str(tmp_path / "report")]) == 0

    files = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    contents = {p: p.read_bytes() for p in files}
    # The text was there to leak: it reached the tables, redacted.
    assert any(REDACTED.encode() in c for p, c in contents.items() if "tb" in p.parts)
    # (W&B keeps the table's HTML cells in the artifact staging folder, WANDB_DATA_DIR: inside tmp_path here.)
    assert any(REDACTED.encode() in c for p, c in contents.items() if any("wandb" in part for part in p.parts))
    assert any(REDACTED.encode() in c for p, c in contents.items() if p.suffix == ".ckpt")  # the run's table
    for needle in [SECRET, *PLANTED_ENV.values()]:
        leaked = [str(p.relative_to(tmp_path)) for p, c in contents.items() if needle.encode() in c]
        assert leaked == [], f"{needle!r} written to {leaked}"
        assert needle not in caplog.text

    bundles = [p for p in files if p.suffix == ".pt" and "anomalies" in p.parts]
    assert bundles, "the NaN gradient should have written a reproduction bundle"
    for bundle in bundles:
        content = torch.load(bundle, weights_only=True)  # tensors and plain containers only
        assert content["step"] == FAULT_AT
