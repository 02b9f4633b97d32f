"""Model definitions, checkpoint readers and tokenizers. Knows nothing of requests or pages."""

from models.attention import AttentionBackend, KVCache
from models.config import ModelConfig
from models.loader import DEFAULT_MODEL, MODELS, Model, load_model
from models.tokenizer import IncrementalDetokenizer, Tokenizer
from models.transformer import Transformer

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
