"""Tokenized sets kept on disk (issue 20: tokenize once per dataset): a second run with the same texts, tokenizer,
caps and formatting reads the ids back; any change among those tokenizes again; a bad entry is named and replaced."""

import warnings
from pathlib import Path

import pytest
import torch

from data_modules.base import EvalSet, PreferenceDataModule, ResponseSet
from rm_lightning import cache_entries
from rm_lightning.models.explicit import ExplicitRM
from rm_lightning.models.generative import ExplicitGenerativeRM
from rm_lightning.models.implicit import ImplicitRM
from rm_lightning.pairs import PairEncoder, PreferencePair, ResponseRecord, Turn, token_cache

PAIRS = [PreferencePair("What is 2+2?", "It is 4.", "It is 5.", margin=1.5),
         PreferencePair("Name a colour.", "Blue.", "A long answer " * 30),  # over the response cap below
         PreferencePair((Turn("system", "Be brief."), Turn("user", "Hi")), "Hello!", "Go away."),
         PreferencePair("What is 2+2?", "Four.", "It is 5.")]


class GivenPairs(PreferenceDataModule):
    """The pairs handed to it: training set, one eval set, and their chosen responses as a set of responses."""

    def __init__(self, pairs, **options):
        super().__init__(max_prompt_tokens=64, max_response_tokens=40, **options)
        self.pairs = pairs

    def load_pairs(self):
        responses = [ResponseRecord(p.prompt, p.chosen) for p in self.pairs if isinstance(p.prompt, str)]
        return list(self.pairs), {"held_out": EvalSet(list(self.pairs[::-1])), "responses": ResponseSet(responses)}


@pytest.fixture(scope="module")
def exrm():
    return ExplicitRM(backbone="tiny-llama-chat")


def tokenized(module, cache: Path | None, pairs=PAIRS, **options) -> dict:
    data = GivenPairs(pairs, cache_tokenized=cache is not None, **options).attach(module)
    if cache is None:
        data.setup("fit")
    else:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(token_cache.TOKEN_CACHE_ENV, str(cache))
            data.setup("fit")
    return {name: ([(p.chosen_ids, p.chosen_start, p.rejected_ids, p.rejected_start, p.margin) for p in s.pairs],
                   s.dropped, s.screened, s.texts) for name, s in data.encoded_sets().items()}


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.pt"))


def test_a_second_run_reads_back_exactly_what_tokenizing_gives(exrm, tmp_path):
    fresh = tokenized(exrm, None)
    assert fresh["train"][1] == 1  # the cap dropped a pair: which ones were kept is stored too
    tokenized(exrm, tmp_path)
    assert len(entries(tmp_path)) == 3  # the training set, the eval set and the set of responses
    assert tokenized(exrm, tmp_path) == fresh


def refuse_to_tokenize(monkeypatch) -> None:
    def refuse(self, pair):
        raise AssertionError("tokenized although the set was cached")
    monkeypatch.setattr(PairEncoder, "encode", refuse)


def test_a_second_run_does_not_tokenize(exrm, tmp_path, monkeypatch):
    tokenized(exrm, tmp_path)
    refuse_to_tokenize(monkeypatch)
    assert tokenized(exrm, tmp_path)["train"][0]


def test_rm_types_that_format_alike_share_their_entries(exrm, tmp_path, monkeypatch):
    tokenized(exrm, tmp_path)
    refuse_to_tokenize(monkeypatch)
    assert tokenized(ImplicitRM(backbone="tiny-llama-chat"), tmp_path)["train"][0]


class ShoutingRM(ExplicitRM):
    """Another formatting: the response in capitals."""

    def format_texts(self, prompt, response):
        return super().format_texts(prompt, response.upper())


CHANGES = {
    "a response's text": lambda: (ExplicitRM(backbone="tiny-llama-chat"),
                                  [PAIRS[0], PAIRS[1], PAIRS[2], PreferencePair("What is 2+2?", "Four!", "It is 5.")],
                                  {}),
    "a length cap": lambda: (ExplicitRM(backbone="tiny-llama-chat"), PAIRS, {"truncate": True}),
    "the RM type's formatting": lambda: (ExplicitGenerativeRM(backbone="tiny-llama-chat"), PAIRS, {}),
    "a subclass's formatting": lambda: (ShoutingRM(backbone="tiny-llama-chat"), PAIRS, {}),
    "the tokenizer": lambda: (ExplicitRM(backbone="tiny-llama"), PAIRS, {}),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_of_what_decides_the_ids_tokenizes_again(change, tmp_path):
    tokenized(ExplicitRM(backbone="tiny-llama-chat"), tmp_path)
    module, pairs, options = CHANGES[change]()
    assert tokenized(module, tmp_path, pairs, **options) == tokenized(module, None, pairs, **options)


def test_a_changed_chat_template_tokenizes_again(tmp_path):
    module = ExplicitRM(backbone="tiny-llama-chat")
    tokenized(module, tmp_path)
    module.tokenizer.chat_template = module.tokenizer.chat_template.replace("<|end|>", "<|stop|>")
    assert tokenized(module, tmp_path) == tokenized(module, None)


def flip_an_id(path: Path) -> None:
    stored = torch.load(path, weights_only=True)
    stored["ids"][5] += 1
    torch.save(stored, path)


def ids_that_do_not_fit(path: Path) -> None:
    """A whole entry, checksum and all, whose ids are three short of its rows' lengths."""
    stored = torch.load(path, weights_only=True)
    tensors = {name: stored[name] for name in token_cache.ENTRY_TENSORS}
    torch.save(cache_entries.entry(stored["identity"], **{**tensors, "ids": tensors["ids"][:-3]}), path)


CORRUPTIONS = {
    "one id changed": (flip_an_id, "contents do not match their checksum"),
    "ids that do not fit its pairs": (ids_that_do_not_fit, "its token ids do not fit its pairs"),
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[:100]), "unreadable"),
    "a reference cache entry": (lambda path: torch.save({"identity": {}, "checksum": "", "values": torch.zeros(2)},
                                                        path), "not a tokenized-pairs cache entry"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_bad_entry_is_named_in_one_line_and_tokenized_again(corruption, exrm, tmp_path):
    fresh = tokenized(exrm, tmp_path)
    path = entries(tmp_path)[0]
    corrupt, reason = CORRUPTIONS[corruption]
    corrupt(path)
    with pytest.warns(UserWarning) as warned:
        again = tokenized(exrm, tmp_path)
    messages = [str(w.message) for w in warned if "tokenized-pairs cache" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0] and f"tokenized-pairs cache {path}: {reason}" in messages[0]
    assert again == fresh
    with warnings.catch_warnings():  # rewritten whole: read silently next time
        warnings.simplefilter("error")
        assert tokenized(exrm, tmp_path) == fresh


def test_an_unwritable_cache_folder_means_tokenizing_every_run_with_one_warning(exrm, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match=f"tokenized-pairs cache folder {blocker} cannot be written") as warned:
        assert tokenized(exrm, blocker) == tokenized(exrm, None)
    assert len([w for w in warned if "cannot be written" in str(w.message)]) == 1


def test_a_cache_folder_on_a_full_disk_is_one_warning_and_leaves_no_half_file(exrm, tmp_path, monkeypatch):
    # torch.save reports a full disk as a RuntimeError ("PytorchStreamWriter failed writing file"), not an OSError:
    # it went past the cache's "cannot be written" warning and ended the run with a traceback
    def disk_full(entry, staging):
        Path(staging).write_bytes(b"PK\x03\x04 half an entry")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    monkeypatch.setattr(cache_entries.torch, "save", disk_full)
    with pytest.warns(UserWarning, match=f"tokenized-pairs cache folder {tmp_path} cannot be written "
                                         f"\\(PytorchStreamWriter failed writing file data/0: file write failed\\)"):
        assert tokenized(exrm, tmp_path) == tokenized(exrm, None)
    assert list(tmp_path.iterdir()) == []


def test_cache_tokenized_false_writes_nothing(exrm, tmp_path, monkeypatch):
    monkeypatch.setenv(token_cache.TOKEN_CACHE_ENV, str(tmp_path))
    GivenPairs(PAIRS, cache_tokenized=False).attach(exrm).setup("fit")
    assert entries(tmp_path) == []
