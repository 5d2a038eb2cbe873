"""Train the reference GPT through LightningCLI, with the debugger's callbacks configured in YAML.

    python examples/cli.py fit --config examples/llmdbg_cli.yaml
    python examples/cli.py fit --config examples/llmdbg_cli.yaml --trainer.max_steps 50
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytorch_lightning.cli import LightningCLI  # noqa: E402

from lightning_llmdbg.testing import PydocDataModule, TinyGPTModule  # noqa: E402


def main(args=None) -> LightningCLI:
    return LightningCLI(TinyGPTModule, PydocDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
