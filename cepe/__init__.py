"""cepe: long-context LLaMA-family models on the CPU (CEPE, E2-LLM), in C.

import cepe
model = cepe.load("path/to/hf-model-dir")
logits = model.forward(ids)               # NumPy in, NumPy out
new_ids = model.generate(ids, max_new_tokens=32)
"""

from __future__ import annotations

from .attach import attach_encoder
from .backends import backends
from .config import DecoderConfig, parse_config
from .errors import CheckpointError, ConfigError
from .load import load
from .model import KVCache, LongInputWarning, Model
from .pull import pull  # cepe.pull("smollm2-135m") (the module is importlib.import_module("cepe.pull"))
from .sampling import Generation, Sampler, StreamToken
from .tokenizer import Tokenizer
from .train import Trainer

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "ConfigError",
    "DecoderConfig",
    "Generation",
    "KVCache",
    "LongInputWarning",
    "Model",
    "Sampler",
    "StreamToken",
    "Tokenizer",
    "Trainer",
    "backends",
    "load",
    "parse_config",
    "pull",
    "__version__",
    "attach_encoder",
]
