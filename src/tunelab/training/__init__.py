"""Training layer: stages built on transformers' Trainer, with tunelab's outputs, callbacks and plots."""
