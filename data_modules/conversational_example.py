"""A small conversational preference dataset, written by this project: multi-turn Persona chats.

Each record is a short chat in TRL's conversational format: an optional system turn, an opening
exchange, sometimes an earlier survey question already answered, then the user asks whether a
Persona statement (``persona_statements.py``) describes the assistant. The chosen response agrees,
the rejected one declines, as in the Persona experiment (paper §5.1), but the prompt has several
turns. Half the records give an explicit ``prompt`` and a one-turn ``chosen``/``rejected``; the
other half give whole conversations in ``chosen``/``rejected`` only (TRL's implicit prompt), so
the example exercises both forms. Train and test use disjoint statements.

Written with::

    python -m data_modules.conversational_example            # examples/persona_conversations/
    python -m data_modules.conversational_example OUT_FOLDER
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from data_modules.persona_statements import AGREEABLENESS_STATEMENTS
from rm_lightning.files import write_text_atomically

EXAMPLE_FOLDER = Path(__file__).resolve().parents[1] / "examples" / "persona_conversations"
TRAIN_PAIRS, TEST_PAIRS = 40, 16
SEED = 0

SYSTEM_PROMPTS = (
    None,
    "You are a friendly assistant. Answer questions about your own personality honestly.",
    "You are taking part in a personality survey. Answer each question about yourself in one sentence.",
)
OPENINGS = (
    ("Can I ask you a few questions about yourself?", "Of course, go ahead."),
    ("I'm putting together a short personality survey. Ready?", "Sure, I'm ready."),
    ("Hi! Mind if we talk about what kind of person you are?", "Happy to, ask away."),
)
EARLIER_QUESTION = ('First one: "{statement}". Would you say that?', "Yes, that sounds like me.")
QUESTIONS = (
    'Is the following statement something you would say? "{statement}"',
    'Would you agree with this: "{statement}"?',
    'Next: "{statement}". Does that describe you?',
)
CHOSEN = ("Yes, that describes me well.", "Sure, I would say that.", "Absolutely, that is how I feel.")
REJECTED = ("No, that is not like me.", "Never, I would not say that.", "Not really, that does not describe me.")


def conversation_record(statement: str, earlier: str, rng: random.Random, implicit: bool) -> dict:
    """One multi-turn pair about ``statement`` (``earlier``: a statement already answered in the chat)."""
    turns = []
    system = rng.choice(SYSTEM_PROMPTS)
    if system:
        turns.append({"role": "system", "content": system})
    opening, reply = rng.choice(OPENINGS)
    turns += [{"role": "user", "content": opening}, {"role": "assistant", "content": reply}]
    if rng.random() < 0.5:
        question, answer = EARLIER_QUESTION
        turns += [{"role": "user", "content": question.format(statement=earlier)},
                  {"role": "assistant", "content": answer}]
    turns.append({"role": "user", "content": rng.choice(QUESTIONS).format(statement=statement)})
    chosen = [{"role": "assistant", "content": rng.choice(CHOSEN)}]
    rejected = [{"role": "assistant", "content": rng.choice(REJECTED)}]
    if implicit:
        return {"chosen": turns + chosen, "rejected": turns + rejected}
    return {"prompt": turns, "chosen": chosen, "rejected": rejected}


def example_records() -> dict[str, list[dict]]:
    """{"train": 40 records, "test": 16}, from disjoint statements, always the same."""
    rng = random.Random(SEED)
    statements = list(AGREEABLENESS_STATEMENTS)
    rng.shuffle(statements)
    splits = {"train": statements[:TRAIN_PAIRS], "test": statements[TRAIN_PAIRS:TRAIN_PAIRS + TEST_PAIRS]}
    return {split: [conversation_record(statement, picked[index - 1], rng, implicit=index % 2 == 1)
                    for index, statement in enumerate(picked)]
            for split, picked in splits.items()}


def write_example(folder: Path = EXAMPLE_FOLDER) -> list[Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, records in example_records().items():
        path = folder / f"{split}.jsonl"
        write_text_atomically(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_example(Path(sys.argv[1]) if len(sys.argv) > 1 else EXAMPLE_FOLDER):
        print(written)
