"""Text pair -> token ids: the one tokenization path every RM type shares.

An RM type only decides how (prompt, response) becomes a (prefix, suffix) pair of strings
(``RewardModule.format_texts``). The length caps and the tokenization live here, so every RM
type sees exactly the same pairs and token boundaries.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Callable, Literal, Sequence, get_args

from rm_lightning.errors import BackboneError, DataError, SettingError
from rm_lightning.pairs.records import EncodedPair, PreferencePair, Prompt, Turn

TextFormatter = Callable[[Prompt, str], "tuple[str, str]"]

# Distinct texts an encoder remembers (formatted pairs; token ids): the texts of several hundred pairs. A
# remembered tokenization shares its ids with the encoded pairs, so it adds about 8 bytes a token.
MEMO_SIZE = 2048


def prompt_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A prompt as chat messages: a string is one user turn, a conversation its turns."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [turn.as_message() for turn in prompt]


def conversation_lines(turns: Sequence[Turn]) -> str:
    """Turns as ``Role: content`` lines (``User: ...``, ``Assistant: ...``), the plain rendering without a template."""
    return "\n".join(f"{turn.role.capitalize()}: {turn.content}" for turn in turns)


def plain_format(prompt: Prompt, response: str) -> tuple[str, str]:
    """The ``plain`` base format: ``User: <prompt>\nAssistant:`` and `` <response>`` (BOS first, no EOS).

    A conversation is its turns as ``Role: content`` lines before the final ``Assistant:``, so a
    one-user-turn conversation renders exactly as its string prompt does.
    """
    if isinstance(prompt, str):
        return f"User: {prompt}\nAssistant:", f" {response}"
    return f"{conversation_lines(prompt)}\nAssistant:", f" {response}"


# --- base models (no chat template of their own) ----------------------------------------------------

# How a tokenizer without a chat template formats pairs: ``authors`` (the paper's code: turn markers, EOS
# after every turn) or ``plain`` (``plain_format``).
BaseFormat = Literal["authors", "plain"]
BASE_FORMATS: tuple[str, ...] = get_args(BaseFormat)
USER_MARKER, ASSISTANT_MARKER = "<|user|>", "<|assistant|>"

# The authors' chat template for tokenizers without one (princeton-pli/exrm-vs-imrm, utils/strings.py), in
# behaviour: every turn is its marker, its content and the EOS token, with no newline anywhere; a system turn
# takes the assistant marker, as theirs does; the generation prompt is the assistant marker alone. So the
# prompt is ``<|user|>{prompt}{eos}<|assistant|>`` and the response ``{response}{eos}``, and an EX-RM reads
# the EOS token last. Their prompts and responses are tokenized without special tokens: no BOS.
AUTHORS_BASE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + USER_MARKER + "' + message['content'] + eos_token }}"
    "{% elif message['role'] in ('system', 'assistant') %}{{ '" + ASSISTANT_MARKER + "' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '" + ASSISTANT_MARKER + "' }}{% endif %}"
    "{% endfor %}"
)
# The same with the BOS token first, for model families that were only ever trained with BOS at the start
# (Gemma: without it Gemma-3-270M's loss on plain English text is 6.0 nats/token instead of 2.4, and its
# greedy continuations repeat one word). The authors' models (Pythia, Llama-3.2) get the template above.
AUTHORS_BASE_TEMPLATE_WITH_BOS = "{{ bos_token }}" + AUTHORS_BASE_TEMPLATE
AUTHORS_BASE_TEMPLATES = (AUTHORS_BASE_TEMPLATE, AUTHORS_BASE_TEMPLATE_WITH_BOS)


def check_base_format(base_format: str, option: str = "model.base_format") -> str:
    if base_format not in BASE_FORMATS:
        raise SettingError(f"{option}: expected one of {', '.join(BASE_FORMATS)}, got {base_format!r}")
    return base_format


def has_own_chat_template(tokenizer) -> bool:
    """Whether the tokenizer came with a chat template (not an authors' one that ``give_base_format`` set)."""
    template = getattr(tokenizer, "chat_template", None)
    return bool(template) and template not in AUTHORS_BASE_TEMPLATES


def give_base_format(tokenizer, bos_first: bool = False) -> list[str]:
    """Give a tokenizer without a chat template the authors' one, as their ``update_tokenizer`` does when a
    model loads; returns the turn markers to add as special tokens (the caller resizes the embeddings).
    ``bos_first`` puts the BOS token before the first turn (``AUTHORS_BASE_TEMPLATE_WITH_BOS``).

    Done whatever ``base_format`` a run uses, so that a policy and its reference, loaded alike, always
    share one vocabulary; with ``base_format: plain`` the two markers are in the vocabulary, unused.
    """
    if getattr(tokenizer, "chat_template", None):
        return []
    if tokenizer.eos_token is None:
        raise BackboneError("a tokenizer without a chat template needs an EOS token to end each turn (the authors' "
                            "base-model format); this one has none")
    if bos_first and tokenizer.bos_token is None:
        raise BackboneError("this base model needs a BOS token first, but its tokenizer has none")
    tokenizer.chat_template = AUTHORS_BASE_TEMPLATE_WITH_BOS if bos_first else AUTHORS_BASE_TEMPLATE
    return [marker for marker in (USER_MARKER, ASSISTANT_MARKER) if marker not in tokenizer.get_vocab()]


def uses_plain_format(tokenizer, base_format: str = "authors") -> bool:
    """Whether pairs are formatted with ``plain_format`` (a base model, ``base_format: plain``), whose
    prompts begin with the tokenizer's BOS; every other format is a chat template's text, tokenized as it stands."""
    return check_base_format(base_format) == "plain" and not has_own_chat_template(tokenizer)


def chat_formatter(tokenizer, base_format: str = "authors") -> TextFormatter:
    """(prompt, response) -> (templated prompt with generation prompt, response suffix).

    The prompt is a string (one user turn) or a conversation of any turns (system, user,
    assistant, ...); the response is the assistant turn that follows it. With a chat template
    the response is whatever follows the prompt text in the templated conversation (the paper's
    definition, and what TRL's chat templating trains on), so it keeps the end-of-turn token and
    any separator the template puts after it, e.g. SmolLM2's newline after ``<|im_end|>``. That
    matters for EX-RM, which reads the last token: which token that is changed its paraphrased
    Persona accuracy by several points.

    A tokenizer without a chat template of its own (a base model) gets the authors' format
    (``AUTHORS_BASE_TEMPLATE``: ``<|user|>prompt<eos><|assistant|>`` then ``response<eos>``), or with
    ``base_format="plain"`` the plain ``User:``/``Assistant:`` format (``plain_format``).
    """
    if uses_plain_format(tokenizer, base_format):
        return plain_format
    template = tokenizer.chat_template or AUTHORS_BASE_TEMPLATE  # its own, or the authors' it was given

    def format_with_template(prompt: Prompt, response: str) -> tuple[str, str]:
        messages = prompt_messages(prompt)
        prefix = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                               chat_template=template)
        if response == "":
            return prefix, ""
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False,
                                             chat_template=template)
        if not full.startswith(prefix):  # templates that rewrite earlier turns; fall back to appending
            return prefix, response
        return prefix, full[len(prefix):]

    return format_with_template


class PairEncoder:
    """Apply length caps on the raw texts, format, and tokenize a pair.

    Caps are measured on the raw prompt and responses (before any template), so EX-RM, IM-RM
    and EX-GRM keep exactly the same pairs; a conversation's prompt counts the tokens of its
    turns' contents. Over-long pairs are dropped, or, with ``truncate=True``, cut: prompts keep
    their end (a conversation loses whole turns from its start first, then never begins with an
    assistant turn; only a last turn over the cap alone is cut), responses their start, never to
    empty.
    With ``bare_response=True`` the response is its own text with nothing after it (no
    end-of-turn token), as Theorem 2's single-token responses need. ``base_format`` is the
    formatter's (``chat_formatter``): only the plain format's prompts get the tokenizer's BOS; a
    chat template's text (the authors' base-model one included) is tokenized as it stands.
    """

    def __init__(self, tokenizer, formatter: TextFormatter, max_prompt_tokens: int | None = 512,
                 max_response_tokens: int | None = 512, truncate: bool = False, bare_response: bool = False,
                 base_format: str = "authors"):
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.bare_response = bare_response
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self.truncate = truncate
        for name, limit in (("max_prompt_tokens", max_prompt_tokens), ("max_response_tokens", max_response_tokens)):
            if limit is not None and limit < 1:
                raise DataError(f"{name} must be a positive number of tokens or null, got {limit}")
        # Prefixes get BOS only in the plain format; a chat template supplies its own special tokens.
        self.prefix_special = uses_plain_format(tokenizer, base_format)
        # The texts of a data set repeat: a pair's two responses share its prompt, a paraphrased set holds
        # several pairs per prompt, an eval set may repeat the training pairs, and short responses ("yes")
        # recur. Each distinct text is formatted and tokenized once (a template render and a tokenizer call
        # cost far more than a lookup), which is most of the start-up time spent tokenizing. Both are pure
        # functions of their arguments as long as the tokenizer is not changed while the encoder is used.
        self._format = lru_cache(maxsize=MEMO_SIZE)(formatter)
        self._ids = lru_cache(maxsize=MEMO_SIZE)(
            lambda text, special: tuple(tokenizer(text, add_special_tokens=special)["input_ids"]))

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
        return EncodedPair(chosen_ids, chosen_start, rejected_ids, rejected_start, margin=capped.margin)

    def encode_response(self, prompt: Prompt, response: str) -> tuple[list[int], int] | None:
        """One response with no pair: (token ids, index of its first response token), or None when capped out."""
        capped = self._apply_caps(PreferencePair(prompt, response, response))
        return None if capped is None else self._tokenize(capped.prompt, capped.chosen)

    def _tokenize(self, prompt: Prompt, response: str) -> tuple[list[int], int]:
        prefix, suffix = self._format(prompt, response)
        if self.bare_response:
            if not suffix.startswith(response):
                raise DataError("bare responses (nothing after the response) need an RM type that scores the "
                                "response as the assistant's turn (EX-RM, IM-RM); this one puts it in its prompt")
            suffix = response
        prefix_ids = self._ids(prefix, self.prefix_special)
        suffix_ids = self._ids(suffix, False) if suffix else ()
        return list(prefix_ids + suffix_ids), len(prefix_ids)

    def _apply_caps(self, pair: PreferencePair) -> PreferencePair | None:
        prompt = self._cap_prompt(pair.prompt)
        chosen = self._cap(pair.chosen, self.max_response_tokens, keep_end=False)
        rejected = self._cap(pair.rejected, self.max_response_tokens, keep_end=False)
        if prompt is None or chosen is None or rejected is None:
            return None
        return replace(pair, prompt=prompt, chosen=chosen, rejected=rejected)

    def _cap_prompt(self, prompt: Prompt) -> Prompt | None:
        """A prompt within ``max_prompt_tokens`` (counted on its raw text), or None when the pair must go."""
        limit = self.max_prompt_tokens
        if isinstance(prompt, str):
            return self._cap(prompt, limit, keep_end=True)
        if limit is None:
            return prompt
        turns = list(prompt)
        counts = [len(self._ids(turn.content, False)) for turn in turns]
        if sum(counts) <= limit:
            return prompt
        if not self.truncate:
            return None
        while len(turns) > 1 and (sum(counts) > limit or turns[0].role == "assistant"):
            turns.pop(0)
            counts.pop(0)
        if sum(counts) > limit:  # the last turn alone is over the cap: keep its end
            content = self._cap(turns[-1].content, limit, keep_end=True)
            if content is None:
                return None
            turns = [Turn(turns[-1].role, content)]
        return tuple(turns)

    def _cap(self, text: str, limit: int | None, keep_end: bool) -> str | None:
        """``text`` within ``limit`` tokens, or None when the pair must go.

        Truncation cuts on token boundaries; a cut inside a multi-byte character can re-encode
        longer, so the cut moves until the decoded text fits. A text that would be left blank
        is not kept: an empty response is no response.
        """
        if limit is None:
            return text
        ids = self._ids(text, False)
        if len(ids) <= limit:
            return text
        if not self.truncate:
            return None
        ids = list(ids)
        for keep in range(limit, 0, -1):
            piece = self.tokenizer.decode(ids[-keep:] if keep_end else ids[:keep])
            if len(self.tokenizer(piece, add_special_tokens=False)["input_ids"]) <= limit:
                return piece if piece.strip() else None
        return None
