"""Continued pre-training: next-token loss on every token of plain text, concatenated and cut into cutoff_len
chunks by the data layer. It is SFT's flow without a chat template (`prepare_template` gives none for pt), so the
stage is SFT's `run` itself.

    tunelab train examples/smollm2_lora_pt.yaml
"""

from tunelab.training.stages.sft import run

__all__ = ["run"]
