"""Start-up: a run pays only for what it uses before its first step.

Tokenizing a data set formats and tokenizes each distinct text once (a pair's two responses share a
prompt, a paraphrased set holds several pairs per prompt, short responses recur), with the ids a
text gets on its own. Importing the package costs no Lightning, and the CLI imports no optional
library that Lightning itself does not.
"""

import subprocess
import sys
from collections import Counter

import pytest

from conftest import PROJECT_ROOT
from rm_lightning.models.backbones import TINY_CHAT_TEMPLATE, byte_level_tokenizer
from rm_lightning.pairs import PairEncoder, PreferencePair, chat_formatter

# libraries only some runs use (LoRA, hub data sets, TRL peers, loggers other than TensorBoard's)
OPTIONAL_LIBRARIES = ("peft", "datasets", "trl", "pandas", "sklearn", "scipy", "tensorboard", "wandb", "mlflow")


class CountingTokenizer:
    """A tokenizer that counts how often each text is tokenized; everything else is the tokenizer's."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, Counter()

    def __call__(self, text, **options):
        self.calls[text] += 1
        return self.tokenizer(text, **options)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def paraphrased_pairs() -> list[PreferencePair]:
    """Persona's shape: every prompt with each chosen and each rejected response, responses recurring."""
    prompts = [f"Is the following statement something you would say? Statement {i}." for i in range(3)]
    chosen, rejected = ["My response would be certainly", "absolutely"], ["I lean toward nope", "not really"]
    return [PreferencePair(p, c, r) for p in prompts for c in chosen for r in rejected]


@pytest.mark.parametrize("template", [TINY_CHAT_TEMPLATE, None])
def test_each_distinct_text_is_tokenized_once(template):
    tokenizer = CountingTokenizer(byte_level_tokenizer(template))
    encoder = PairEncoder(tokenizer, chat_formatter(tokenizer), max_prompt_tokens=512, max_response_tokens=512)
    pairs = paraphrased_pairs()
    encoded, dropped = encoder.encode_all(pairs + pairs)  # an eval set may repeat the training pairs
    assert (len(encoded), dropped) == (2 * len(pairs), 0)
    assert max(tokenizer.calls.values()) == 1


@pytest.mark.parametrize("template", [TINY_CHAT_TEMPLATE, None])
def test_a_remembered_text_gets_the_ids_it_gets_alone(template):
    tokenizer = byte_level_tokenizer(template)
    pairs = paraphrased_pairs()
    shared = PairEncoder(tokenizer, chat_formatter(tokenizer), max_prompt_tokens=40, max_response_tokens=3,
                         truncate=True)
    alone = [PairEncoder(tokenizer, chat_formatter(tokenizer), max_prompt_tokens=40, max_response_tokens=3,
                         truncate=True).encode(pair) for pair in pairs]
    assert shared.encode_all(pairs) == ([e for e in alone if e is not None], alone.count(None))


def modules_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after ``statement``, run from the project root."""
    code = f"import sys; {statement}; print(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.split())


def loaded(modules: set[str], libraries) -> set[str]:
    return {library for library in libraries if library in modules}


@pytest.mark.slow
def test_importing_the_package_costs_no_torch_or_lightning():
    assert loaded(modules_after("import rm_lightning"), ("torch", "lightning", "transformers")) == set()


@pytest.mark.slow
def test_the_cli_imports_no_optional_library_beyond_lightnings_own():
    lightning_alone = loaded(modules_after("import lightning.pytorch.cli"), OPTIONAL_LIBRARIES)
    assert loaded(modules_after("import rm_lightning.cli"), OPTIONAL_LIBRARIES) <= lightning_alone


@pytest.mark.slow
def test_fit_help_offers_every_rm_type_before_any_config_names_one():
    """``--model`` lists the subclasses imported when the parser is built; ``--model.help ExplicitRM`` needs it too."""
    shown = subprocess.run([sys.executable, "-m", "rm_lightning", "fit", "--model.help", "ExplicitGenerativeRM"],
                           cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert "--model.loss" in shown.stdout, shown.stderr
