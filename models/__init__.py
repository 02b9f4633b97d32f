"""Model definitions, checkpoint readers and tokenizers. Knows nothing of requests or pages."""

from meshserve.models.attention import AttentionBackend, KVCache
from meshserve.models.config import ModelConfig
from meshserve.models.loader import DEFAULT_MODEL, MODELS, Model, load_model
from meshserve.models.tokenizer import IncrementalDetokenizer, Tokenizer
from meshserve.models.transformer import Transformer

__all__ = [
  "AttentionBackend",
  "DEFAULT_MODEL",
  "MODELS",
  "IncrementalDetokenizer",
  "KVCache",
  "Transformer",
  "Model",
  "ModelConfig",
  "Tokenizer",
  "load_model",
]
