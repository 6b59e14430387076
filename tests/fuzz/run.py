"""Runs one fuzz target under atheris: python tests/fuzz/run.py TARGET [libFuzzer flags] [CORPUS_DIR]."""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports():
    import jinja2.compiler  # noqa: F401 - chat templates: coverage of the template compiler guides that target
    import jinja2.sandbox  # noqa: F401
    from targets import TARGETS

    import cepe.config  # noqa: F401
    import cepe.files  # noqa: F401
    import cepe.gguf_io  # noqa: F401
    import cepe.load  # noqa: F401
    import cepe.rope  # noqa: F401
    import cepe.safetensors_io  # noqa: F401
    import cepe.tokenizer  # noqa: F401
    import cepe.train  # noqa: F401

if __name__ == "__main__":
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
