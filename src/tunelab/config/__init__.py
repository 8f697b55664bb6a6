"""Config layer: the typed schema, its loader and the cross-field rules. Imports nothing heavy."""

from tunelab.config.load import ConfigError, load_config
from tunelab.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config"]
