"""Continued pre-training: next-token loss on every token of plain text, concatenated and cut into cutoff_len
chunks by the data layer. It is SFT's flow without a chat template.

    tunelab train examples/pt_lora.yaml
"""

from typing import Any

from tunelab.config import Config
from tunelab.training.stages import sft


def run(config: Config) -> dict[str, Any]:
    return sft.run(config, use_template=False)
