"""Tokenized sets kept on disk: a run on the same texts, tokenizer and formatting reads its token ids back.

Tokenizing is most of a data module's set-up on long texts (UltraFeedback at the paper's sizes spends
seconds in the tokenizer before the first step), and a set's ids depend only on its texts and on the
encoder. So each set is stored under an identity that names all of it:

* ``pairs``: a hash of every screened pair's prompt, responses and margin, in order;
* ``tokenizer``: its serialized vocabulary, merges, normalizer and special tokens, its chat template,
  the ids it gives a probe text, and the ``tokenizers`` library that ran it;
* ``encoder``: the length caps, truncation, bare responses, BOS on prefixes;
* ``formatting``: the source files of the formatter's code (``pairs/encoding.py`` and the RM type's
  classes that define ``format_texts``, ``base_format`` or ``pair_encoder``) and what the formatter
  makes of two probe prompts, a string and a conversation.

A changed text, tokenizer, option or formatting code is another identity, so another file. A subclass
that changes its formatting only through some other method of its own is caught by the probe outputs
alone (``cache_tokenized: false`` turns the cache off). Entries check themselves (``cache_entries``);
an unusable one is named in one line and the set tokenized again. A tokenizer without a serialized form
(a slow, Python one) is not cached.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import weakref
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn

from rm_lightning.cache_entries import UnusableEntry, cache_dir, entry_path, read_entry, write_entry
from rm_lightning.pairs.records import EncodedPair, PreferencePair, Turn

FORMAT_VERSION = 1
TOKEN_CACHE_ENV = "RM_LIGHTNING_TOKEN_CACHE"
ENTRY_TENSORS = ("kept", "starts", "lengths", "ids")
PROBE_TEXT = "Probe: héllo, wörld!  2 + 2 = 4\n"
PROBE_RESPONSE = "It is four."
PROBE_PROMPTS = ("What is 2 + 2?", (Turn("system", "Be brief."), Turn("user", "What is 2 + 2?")))
# what an RM type's formatting reads: a class that defines one of these is part of the formatting code
FORMATTING_ATTRIBUTES = frozenset({"format_texts", "base_format", "pair_encoder"})


def token_cache_dir() -> Path:
    """``$RM_LIGHTNING_TOKEN_CACHE``, else ``tokenized_pairs`` in the rm-lightning cache dir."""
    return Path(os.environ.get(TOKEN_CACHE_ENV) or cache_dir() / "tokenized_pairs").expanduser()


def encode_pairs(encoder, pairs: Sequence[PreferencePair], name: str,
                 directory: Optional[Path]) -> list[Optional[EncodedPair]]:
    """``encoder.encode`` of each pair (None where the length caps drop it), read from ``directory`` when a
    run before tokenized the same set alike, else computed and stored there. ``directory`` None: no cache."""
    identity = set_identity(encoder, pairs) if directory is not None else None
    if identity is None:
        return [encoder.encode(pair) for pair in pairs]
    path = entry_path(directory, identity)
    if path.is_file():
        try:
            return decode(read_entry(path, identity, ENTRY_TENSORS, "tokenized-pairs cache"), pairs)
        except UnusableEntry as why:
            rank_zero_warn(f"tokenized-pairs cache {path}: {why}; tokenizing '{name}' again")
    encoded = [encoder.encode(pair) for pair in pairs]
    write_entry(directory, identity, encode(encoded),
                "tokenized-pairs cache folder {directory} cannot be written ({why}); sets are tokenized afresh")
    return encoded


# --- the identity ---------------------------------------------------------------------------------


_ENCODER_IDENTITIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def set_identity(encoder, pairs: Sequence[PreferencePair]) -> Optional[dict[str, str]]:
    """What ``encoder``'s ids of ``pairs`` depend on, or None when the tokenizer cannot be named."""
    encoder_identity = _ENCODER_IDENTITIES.get(encoder)
    if encoder_identity is None:
        tokenizer = tokenizer_digest(encoder.tokenizer)
        if tokenizer is None:
            return None
        options = (encoder.max_prompt_tokens, encoder.max_response_tokens, encoder.truncate, encoder.bare_response,
                   encoder.prefix_special)
        encoder_identity = {"format_version": str(FORMAT_VERSION), "tokenizer": tokenizer, "encoder": repr(options),
                            "formatting": formatting_digest(encoder.formatter)}
        _ENCODER_IDENTITIES[encoder] = encoder_identity  # the same for every set the encoder tokenizes
    return {**encoder_identity, "pairs": pairs_digest(pairs)}


def pairs_digest(pairs: Sequence[PreferencePair]) -> str:
    digest = hashlib.sha256(str(len(pairs)).encode())
    for pair in pairs:
        digest.update(repr((pair.prompt, pair.chosen, pair.rejected, pair.margin)).encode())
    return digest.hexdigest()


# tokenizer -> (its cheap state, digest): serializing a tokenizer takes ~25 ms, and every eval set may have an encoder
_TOKENIZER_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_digest(tokenizer) -> Optional[str]:
    """A hash of everything that decides ``tokenizer``'s ids, or None for a tokenizer with no serialized form.
    Kept per tokenizer while its vocabulary size, chat template and ids of a probe text stay the same."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import tokenizers

    probe = tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]
    state = repr((type(tokenizer).__name__, len(tokenizer), getattr(tokenizer, "chat_template", None), probe,
                  tokenizers.__version__))
    known = _TOKENIZER_DIGESTS.get(tokenizer)
    if known is not None and known[0] == state:
        return known[1]
    digest = hashlib.sha256(backend.to_str().encode() + state.encode()).hexdigest()
    _TOKENIZER_DIGESTS[tokenizer] = (state, digest)
    return digest


def formatting_digest(formatter) -> str:
    """The formatter's code (source files) and its output on the probe prompts."""
    digest = hashlib.sha256()
    for path in sorted(formatting_sources(formatter)):
        source = Path(path)
        if source.is_file():  # by content, so that clones in other folders share entries
            digest.update(source.name.encode() + source.read_bytes())
        else:  # code without a file of its own (a zip import, an interactive session): its name
            digest.update(path.encode())
    for prompt in PROBE_PROMPTS:
        try:
            digest.update(repr(formatter(prompt, PROBE_RESPONSE)).encode())
        except Exception as err:  # noqa: BLE001 - a template may refuse a system turn: that, too, is its behaviour
            digest.update(f"raises {type(err).__name__}".encode())
    return digest.hexdigest()


def formatting_sources(formatter) -> set[str]:
    """Source files of the code that formats: ``pairs/encoding.py``, and the formatter's own module, or for a
    bound method (an RM type's ``format_texts``) the files of the classes in its MRO that define one of
    ``FORMATTING_ATTRIBUTES``. So EX-RM and IM-RM, which format alike, share their entries."""
    from rm_lightning.pairs import encoding

    owner = getattr(formatter, "__self__", None)
    code = [cls for cls in type(owner).__mro__ if FORMATTING_ATTRIBUTES & set(vars(cls))] \
        if owner is not None else [formatter]
    files = {inspect.getsourcefile(encoding)}
    for item in code:
        try:
            files.add(inspect.getsourcefile(item))
        except TypeError:  # defined where there is no source file (built in, or interactively)
            files.add(f"<{getattr(item, '__qualname__', type(item).__name__)}>")
    return {str(path) for path in files if path}


# --- the stored form ------------------------------------------------------------------------------


def encode(encoded: Sequence[Optional[EncodedPair]]) -> dict[str, torch.Tensor]:
    """Encoded pairs as four tensors: which were kept, their response starts, row lengths and all ids."""
    kept = [pair for pair in encoded if pair is not None]
    ids = [token for pair in kept for row in (pair.chosen_ids, pair.rejected_ids) for token in row]
    return {"kept": torch.tensor([pair is not None for pair in encoded], dtype=torch.bool),
            "starts": torch.tensor([[p.chosen_start, p.rejected_start] for p in kept], dtype=torch.int64).reshape(-1, 2),
            "lengths": torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in kept],
                                    dtype=torch.int64).reshape(-1, 2),
            "ids": torch.tensor(ids, dtype=torch.int32)}


def decode(stored: dict[str, torch.Tensor], pairs: Sequence[PreferencePair]) -> list[Optional[EncodedPair]]:
    """The encoded pairs (None where dropped) of ``encode``'s tensors; ``UnusableEntry`` when they do not fit."""
    kept, starts, lengths, ids = (stored[name] for name in ENTRY_TENSORS)
    if kept.dtype != torch.bool or tuple(kept.shape) != (len(pairs),):
        raise UnusableEntry(f"holds {tuple(kept.shape)} pairs, expected {len(pairs)}")
    rows = int(kept.sum())
    if tuple(starts.shape) != (rows, 2) or tuple(lengths.shape) != (rows, 2) or ids.dim() != 1 \
            or int(lengths.sum()) != ids.numel() or bool((starts > lengths).any()) or bool((starts < 0).any()):
        raise UnusableEntry("its token ids do not fit its pairs")
    flat, bounds = ids.tolist(), lengths.reshape(-1).cumsum(0).tolist()
    row_ids = [flat[begin:end] for begin, end in zip([0] + bounds[:-1], bounds)]
    starts_list, decoded, row = starts.tolist(), [], 0
    for pair, is_kept in zip(pairs, kept.tolist()):
        if not is_kept:
            decoded.append(None)
            continue
        (chosen_start, rejected_start) = starts_list[row // 2]
        decoded.append(EncodedPair(row_ids[row], chosen_start, row_ids[row + 1], rejected_start, margin=pair.margin))
        row += 2
    return decoded
