"""Model layer: tokenizer and model loading, the fine-tuning methods (full, freeze, lora), and tiny test models.

Imports only `tunelab.config`. torch, transformers and peft are imported inside the functions, so importing this
package stays cheap until a model is actually loaded.
"""

from tunelab.model.loader import load_model, load_tokenizer
from tunelab.model.methods import count_parameters
from tunelab.model.tiny import build_tiny_model

__all__ = ["build_tiny_model", "count_parameters", "load_model", "load_tokenizer"]
