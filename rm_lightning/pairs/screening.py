"""Pairs that cannot teach a preference, found before tokenization and named by where they came from.

* ``identical``: chosen == rejected (the loss is log 2 whatever the model; the pair says nothing); also,
  counted by the data module after tokenization, two responses that ``truncate: true`` cut to the same tokens;
* ``empty``: an empty or whitespace-only prompt, chosen or rejected response;
* ``duplicate``: a pair seen before in the same set (counted, kept: repeated pairs are legitimate data,
  but a count that is not 0 is worth knowing).

``invalid_pairs: drop`` (default) drops identical and empty pairs and counts them in the data
summary; ``fail`` stops at the first with its ``file:line``.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

from rm_lightning.errors import DataError
from rm_lightning.pairs.records import PreferencePair, prompt_text

InvalidPairs = Literal["drop", "fail"]
INVALID_PAIR_POLICIES = ("drop", "fail")
DROP_RULES = ("identical", "empty")


def _is_blank(pair: PreferencePair, field: str) -> bool:
    """Whether a field is empty or whitespace-only (a conversation prompt: all its turns' contents are)."""
    return not prompt_text(getattr(pair, field)).strip()


def problem_of(pair: PreferencePair) -> str | None:
    """The rule ``pair`` breaks (``DROP_RULES``), or None."""
    for field in ("prompt", "chosen", "rejected"):
        if _is_blank(pair, field):
            return "empty"
    return "identical" if pair.chosen == pair.rejected else None


def describe(rule: str, pair: PreferencePair) -> str:
    if rule == "identical":
        return "chosen and rejected responses are identical"
    fields = [f for f in ("prompt", "chosen", "rejected") if _is_blank(pair, f)]
    return f"empty or whitespace-only {' and '.join(fields)}"


def screen_pairs(set_name: str, pairs: list[PreferencePair], policy: InvalidPairs = "drop"
                 ) -> tuple[list[int], Counter]:
    """(the positions of the pairs kept, counts per rule: ``identical``, ``empty`` dropped; ``duplicate`` seen
    and kept). Positions, not pairs, so that predictions can name each pair's place in its source."""
    if policy not in INVALID_PAIR_POLICIES:
        raise DataError(f"invalid_pairs: expected one of {', '.join(INVALID_PAIR_POLICIES)}, got {policy!r}")
    kept, counts, seen = [], Counter(), set()
    for number, pair in enumerate(pairs, start=1):
        rule = problem_of(pair)
        if rule is not None:
            if policy == "fail":
                where = pair.source or f"set '{set_name}', pair {number}"
                raise DataError(f"{where}: {describe(rule, pair)} (data.invalid_pairs: drop skips such pairs "
                                f"and counts them)")
            counts[rule] += 1
            continue
        key = (pair.prompt, pair.chosen, pair.rejected)
        if key in seen:
            counts["duplicate"] += 1
        seen.add(key)
        kept.append(number - 1)
    return kept, counts
