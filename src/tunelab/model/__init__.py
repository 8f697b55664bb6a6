"""Model layer: tokenizer and model loading, the fine-tuning methods (full, freeze, lora), and tiny test models.

Imports only `tunelab.config`. torch, transformers and peft are imported inside the functions, so importing this
package stays cheap until a model is actually loaded.
"""

from tunelab.model.loader import load_model, load_tokenizer
from tunelab.model.methods import count_parameters
from tunelab.model.processor_files import copy_processor_files
from tunelab.model.tiny import build_tiny_model
from tunelab.model.tiny_vl import build_tiny_vl_model

__all__ = ["build_tiny_model", "build_tiny_vl_model", "copy_processor_files", "count_parameters", "load_model",
           "load_tokenizer"]
