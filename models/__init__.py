"""Model definitions, checkpoint readers and tokenizers. Knows nothing of requests or pages."""

from models.attention import AttentionBackend, KVCache
from models.config import ModelConfig
from models.llama import Llama
from models.loader import DEFAULT_MODEL, MODELS, Model, load_model
from models.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = [
  "AttentionBackend",
  "DEFAULT_MODEL",
  "MODELS",
  "IncrementalDetokenizer",
  "KVCache",
  "Llama",
  "Model",
  "ModelConfig",
  "Tokenizer",
  "load_model",
]
