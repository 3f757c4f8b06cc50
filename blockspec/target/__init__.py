"""Target adapters: Hugging Face causal LMs run through blockspec's own forward with tapped hidden states."""

from blockspec.target.loading import Target, load_target, resolve_device, resolve_dtype, target_from_hf
from blockspec.target.model import TargetConfig, TargetModel

__all__ = ["Target", "TargetConfig", "TargetModel", "load_target", "resolve_device", "resolve_dtype", "target_from_hf"]
