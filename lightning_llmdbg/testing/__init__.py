"""The reference model and data used by tests, benchmarks and the demo (no downloads: Python's own docs)."""

from lightning_llmdbg.testing.data import PydocDataModule, pydoc_corpus
from lightning_llmdbg.testing.tiny_gpt import GPTConfig, TinyGPT, TinyGPTModule

__all__ = ["GPTConfig", "PydocDataModule", "TinyGPT", "TinyGPTModule", "pydoc_corpus"]
