"""Text pair -> token ids: the one tokenization path every RM type shares.

An RM type only decides how (prompt, response) becomes a (prefix, suffix) pair of strings
(``RewardModule.format_texts``). The length caps and the tokenization live here, so every RM
type sees exactly the same pairs and token boundaries.
"""

from __future__ import annotations

from typing import Callable, Sequence

from rm_lightning.errors import DataError
from rm_lightning.pairs.records import EncodedPair, PreferencePair

TextFormatter = Callable[[str, str], "tuple[str, str]"]


def chat_formatter(tokenizer) -> TextFormatter:
    """(prompt, response) -> (templated prompt with generation prompt, response suffix).

    With a chat template the response is whatever follows the prompt text in the templated
    conversation (the paper's definition, and what TRL's chat templating trains on), so it keeps
    the end-of-turn token and any separator the template puts after it, e.g. SmolLM2's newline
    after ``<|im_end|>``. That matters for EX-RM, which reads the last token: which token that is
    changed its paraphrased Persona accuracy by several points. Without a chat template, a plain
    User:/Assistant: format.
    """
    if not getattr(tokenizer, "chat_template", None):
        return lambda prompt, response: (f"User: {prompt}\nAssistant:", f" {response}")

    def format_with_template(prompt: str, response: str) -> tuple[str, str]:
        user = [{"role": "user", "content": prompt}]
        prefix = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        if response == "":
            return prefix, ""
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prefix):  # templates that rewrite earlier turns; fall back to appending
            return prefix, response
        return prefix, full[len(prefix):]

    return format_with_template


class PairEncoder:
    """Apply length caps on the raw texts, format, and tokenize a pair.

    Caps are measured on the raw prompt and responses (before any template), so EX-RM, IM-RM
    and EX-GRM keep exactly the same pairs. Over-long pairs are dropped, or, with
    ``truncate=True``, cut: prompts keep their end, responses their start, never to empty.
    With ``bare_response=True`` the response is its own text with nothing after it (no
    end-of-turn token), as Theorem 2's single-token responses need.
    """

    def __init__(self, tokenizer, formatter: TextFormatter, max_prompt_tokens: int | None = 512,
                 max_response_tokens: int | None = 512, truncate: bool = False, bare_response: bool = False):
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.bare_response = bare_response
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self.truncate = truncate
        for name, limit in (("max_prompt_tokens", max_prompt_tokens), ("max_response_tokens", max_response_tokens)):
            if limit is not None and limit < 1:
                raise DataError(f"{name} must be a positive number of tokens or null, got {limit}")
        # Prefixes get BOS only when no chat template supplies its own special tokens.
        self._prefix_special = not getattr(tokenizer, "chat_template", None)

    def encode_all(self, pairs: Sequence[PreferencePair]) -> tuple[list[EncodedPair], int]:
        """Encode a set; returns (encoded pairs, number dropped by the length caps)."""
        encoded = [self.encode(pair) for pair in pairs]
        kept = [e for e in encoded if e is not None]
        return kept, len(encoded) - len(kept)

    def encode(self, pair: PreferencePair) -> EncodedPair | None:
        capped = self._apply_caps(pair)
        if capped is None:
            return None
        chosen_ids, chosen_start = self._tokenize(capped.prompt, capped.chosen)
        rejected_ids, rejected_start = self._tokenize(capped.prompt, capped.rejected)
        return EncodedPair(chosen_ids, chosen_start, rejected_ids, rejected_start)

    def encode_response(self, prompt: str, response: str) -> tuple[list[int], int] | None:
        """One response with no pair: (token ids, index of its first response token), or None when capped out."""
        capped = self._apply_caps(PreferencePair(prompt, response, response))
        return None if capped is None else self._tokenize(capped.prompt, capped.chosen)

    def _tokenize(self, prompt: str, response: str) -> tuple[list[int], int]:
        prefix, suffix = self.formatter(prompt, response)
        if self.bare_response:
            if not suffix.startswith(response):
                raise DataError("bare responses (nothing after the response) need an RM type that scores the "
                                "response as the assistant's turn (EX-RM, IM-RM); this one puts it in its prompt")
            suffix = response
        prefix_ids = self.tokenizer(prefix, add_special_tokens=self._prefix_special)["input_ids"]
        suffix_ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        return prefix_ids + suffix_ids, len(prefix_ids)

    def _apply_caps(self, pair: PreferencePair) -> PreferencePair | None:
        prompt = self._cap(pair.prompt, self.max_prompt_tokens, keep_end=True)
        chosen = self._cap(pair.chosen, self.max_response_tokens, keep_end=False)
        rejected = self._cap(pair.rejected, self.max_response_tokens, keep_end=False)
        if prompt is None or chosen is None or rejected is None:
            return None
        return PreferencePair(prompt, chosen, rejected, pair.source)

    def _cap(self, text: str, limit: int | None, keep_end: bool) -> str | None:
        """``text`` within ``limit`` tokens, or None when the pair must go.

        Truncation cuts on token boundaries; a cut inside a multi-byte character can re-encode
        longer, so the cut moves until the decoded text fits. A text that would be left blank
        is not kept: an empty response is no response.
        """
        if limit is None:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return text
        if not self.truncate:
            return None
        for keep in range(limit, 0, -1):
            piece = self.tokenizer.decode(ids[-keep:] if keep_end else ids[:keep])
            if len(self.tokenizer(piece, add_special_tokens=False)["input_ids"]) <= limit:
                return piece if piece.strip() else None
        return None
