"""Real-world preference sets (paper §5.2): loaders, hub record conversion, errors, caps, configs."""

import json
import sys
import types

import pytest
import yaml

from rm_lightning import cli
from conftest import PROJECT_ROOT, tiny_override
from data_modules import EvalSetSource, PairSource, RealWorldDataModule
from data_modules.preference_sources import (HUB_DATASETS, is_translation_prompt, load_hub_pairs, load_jsonl_pairs,
                                             rewardmath_pair, subsample, ultrafeedback_pair)
from rm_lightning import ExplicitRM
from rm_lightning.errors import DataError

ROWS = {  # data folder -> (train rows, test rows), as in the shared data README
    "ultrafeedback": (200, 200), "ultrafeedback_paraphrase": (200, 200),
    "ultrafeedback_translate_french": (200, 200), "ultrafeedback_translate_spanish": (200, 200),
    "rewardmath": (2000, 200), "rewardbench_math": (34, 200), "rewardbench_code": (84, 200),
}
UF_SETS = {"ultrafeedback": "in_distribution", "ultrafeedback_paraphrase": "token_shift",
           "ultrafeedback_translate_french": "token_shift", "ultrafeedback_translate_spanish": "token_shift",
           "rewardbench_math": "domain_shift", "rewardbench_code": "domain_shift", "rewardmath": "domain_shift"}
MATH_SETS = {"rewardmath": "in_distribution", "rewardbench_math": "token_shift",
             "ultrafeedback": "domain_shift", "ultrafeedback_paraphrase": "domain_shift",
             "ultrafeedback_translate_french": "domain_shift", "ultrafeedback_translate_spanish": "domain_shift",
             "rewardbench_code": "domain_shift"}
CONFIG_SETS = {"exrm_ultrafeedback": ("ultrafeedback", UF_SETS), "imrm_ultrafeedback": ("ultrafeedback", UF_SETS),
               "exrm_rewardmath": ("rewardmath", MATH_SETS), "imrm_rewardmath": ("rewardmath", MATH_SETS)}


# --- the shared files ----------------------------------------------------------------------------


@pytest.mark.parametrize("folder", sorted(ROWS))
def test_each_shared_set_loads_with_its_row_counts(folder, shared_data):
    for split, rows in zip(("train", "test"), ROWS[folder]):
        pairs = load_jsonl_pairs(f"{folder}/{split}.jsonl")
        assert len(pairs) == rows
        assert all(p.prompt.strip() and p.chosen.strip() and p.rejected.strip() for p in pairs)
        assert sum(p.chosen != p.rejected for p in pairs) >= 0.95 * rows
    if folder.startswith("ultrafeedback"):  # the README's filter: no translation prompts
        assert not any(is_translation_prompt(p.prompt) for p in load_jsonl_pairs(f"{folder}/train.jsonl"))


def test_ultrafeedback_variants_are_row_aligned_and_subsampled_alike(shared_data):
    original = load_jsonl_pairs("ultrafeedback/test.jsonl")
    for variant in ("ultrafeedback_paraphrase", "ultrafeedback_translate_french"):
        shifted = load_jsonl_pairs(f"{variant}/test.jsonl")
        assert [p.prompt for p in shifted] == [p.prompt for p in original]
        assert sum(a.chosen != b.chosen for a, b in zip(original, shifted)) > 190  # responses rewritten
        draw = subsample(shifted, 10, seed=3)
        assert [p.prompt for p in draw] == [p.prompt for p in subsample(original, 10, seed=3)]
    assert subsample(original, 10, seed=3) != subsample(original, 10, seed=4)


def test_data_module_tags_and_limits(shared_data):
    module = RealWorldDataModule(
        train=PairSource(path="rewardmath/train.jsonl", limit=30),
        eval_sets={"rewardmath": EvalSetSource(path="rewardmath/test.jsonl", limit=5),
                   "ultrafeedback": {"path": "ultrafeedback/test.jsonl", "tag": "domain_shift"}})
    train, eval_sets = module.load_pairs()
    assert len(train) == 30 and len(eval_sets["rewardmath"].pairs) == 5 and len(eval_sets["ultrafeedback"].pairs) == 200
    assert {name: s.tag for name, s in eval_sets.items()} == {"rewardmath": "in_distribution",
                                                              "ultrafeedback": "domain_shift"}


def test_bad_set_specs_are_clear_errors(shared_data):
    with pytest.raises(DataError, match="exactly one of `path` or `hub`"):
        PairSource().load()
    with pytest.raises(DataError, match="exactly one of `path` or `hub`"):
        PairSource(path="rewardmath/test.jsonl", hub="rewardmath").load()
    with pytest.raises(DataError, match="not allowed"):
        RealWorldDataModule(train=PairSource(path="x.jsonl"), eval_sets={"val/x": EvalSetSource(path="y.jsonl")})
    with pytest.raises(DataError, match="unknown shift tag"):
        RealWorldDataModule(train={"path": "rewardmath/train.jsonl"},
                            eval_sets={"m": {"path": "rewardmath/test.jsonl", "tag": "other"}}).load_pairs()
    with pytest.raises(DataError, match="limit must be at least 1"):
        PairSource(path="rewardmath/test.jsonl", limit=0).load()


# --- hub records (no network) --------------------------------------------------------------------


def uf_record(prompt="Write a haiku about rain.", score_chosen=8.0, score_rejected=5.0):
    def messages(reply):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    return {"prompt": prompt, "chosen": messages("Soft rain on the roof"), "rejected": messages("No."),
            "score_chosen": score_chosen, "score_rejected": score_rejected}


def test_ultrafeedback_record_takes_the_assistant_replies():
    pair = ultrafeedback_pair(uf_record())
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Write a haiku about rain.", "Soft rain on the roof", "No.")


def test_ultrafeedback_score_filter_drops_ties_and_inversions():
    assert ultrafeedback_pair(uf_record(score_chosen=7.0, score_rejected=7.0)) is None
    assert ultrafeedback_pair(uf_record(score_chosen=4.0, score_rejected=6.5)) is None
    assert ultrafeedback_pair(uf_record(score_chosen=7.5, score_rejected=7.0)) is not None


@pytest.mark.parametrize("prompt, dropped", [
    ("Translate 'good morning' into German.", True),
    ("Can you provide a TRANSLATION of this poem?", True),
    ("Here is a translated text; summarise it.", True),
    ("Which translations of the Bible are most literal?", True),
    ("Explain how rain forms.", False),
    ("Describe the transition from feudalism to capitalism.", False),
])
def test_translation_prompts_are_dropped(prompt, dropped):
    assert is_translation_prompt(prompt) is dropped
    assert (ultrafeedback_pair(uf_record(prompt=prompt)) is None) is dropped


def test_bad_ultrafeedback_record_names_the_row_and_field():
    record = uf_record()
    record["chosen"] = [{"role": "user", "content": "hi"}]
    with pytest.raises(DataError, match=r"row 7: field 'chosen' has no assistant message"):
        ultrafeedback_pair(record, "HuggingFaceH4/ultrafeedback_binarized[train_prefs] row 7")


def test_rewardmath_record_joins_steps_and_follows_chosen_position():
    record = {"problem": "1+1?", "eval_solution_A": ["We add.", "The answer is 2."],
              "eval_solution_B": ["We add.", "The answer is 3."], "chosen_position": "A"}
    assert rewardmath_pair(record).chosen == "We add. The answer is 2."
    assert rewardmath_pair(record).rejected == "We add. The answer is 3."
    flipped = rewardmath_pair({**record, "chosen_position": "B"})
    assert (flipped.chosen, flipped.rejected) == ("We add. The answer is 3.", "We add. The answer is 2.")
    with pytest.raises(DataError, match="chosen_position"):
        rewardmath_pair({**record, "chosen_position": 1}, "RewardMATH row 3")


def test_rewardbench_subsets_select_math_prm_and_hep():
    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r", "subset": subset}
            for i, subset in enumerate(["math-prm", "hep-python", "hep-rust", "alpacaeval-easy", "xstest"])]
    math = [HUB_DATASETS["rewardbench_math"].convert(r, "row") for r in rows]
    code = [HUB_DATASETS["rewardbench_code"].convert(r, "row") for r in rows]
    assert [p.prompt for p in math if p] == ["p0"]
    assert [p.prompt for p in code if p] == ["p1", "p2"]


@pytest.fixture
def offline_datasets(monkeypatch):
    """A stand-in ``datasets`` package whose hub access fails as it does without internet."""
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceH4/ultrafeedback_binarized' on the Hub "
                              "(OfflineModeIsEnabled)\nsecond line of detail")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_offline_hub_is_one_clear_line(offline_datasets):
    with pytest.raises(DataError) as caught:
        load_hub_pairs("ultrafeedback", "test_prefs")
    message = str(caught.value)
    assert "\n" not in message
    assert "HuggingFaceH4/ultrafeedback_binarized" in message and "test_prefs" in message
    assert "pass a local JSONL" in message and "`path`" in message


def test_offline_hub_through_the_cli_is_one_line(offline_datasets, tmp_path, capsys):
    override = tiny_override(tmp_path)
    with pytest.raises(SystemExit) as caught:
        cli.main(["fit", "--config", str(PROJECT_ROOT / "configs/exrm_rewardmath.yaml"), "--config", str(override),
                  "--data.init_args.train", '{"path": null, "hub": "rewardmath"}'])
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: cannot load hub dataset RewardMATH/RewardMATH_pairwise")


# --- malformed local files -----------------------------------------------------------------------


def test_malformed_files_name_file_and_line(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    bad_json = tmp_path / "bad_json.jsonl"
    bad_json.write_text(f"{good}\n{good}\n{{not json\n")
    with pytest.raises(DataError, match=r"bad_json\.jsonl:3: not valid JSON"):
        PairSource(path=str(bad_json)).load()
    missing = tmp_path / "missing.jsonl"
    missing.write_text(f"{good}\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(DataError, match=r"missing\.jsonl:2: missing field 'rejected'"):
        PairSource(path=str(missing)).load()
    with pytest.raises(DataError, match="data file not found: nowhere/test.jsonl"):
        PairSource(path="nowhere/test.jsonl").load()


def test_a_json_line_cut_short_is_named_at_its_own_column(tmp_path):
    # the line's newline went to the parser, so a record cut short was "at column 1" (of the next line's start)
    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c",\n')
    with pytest.raises(DataError, match=r"cut\.jsonl:2: not valid JSON \(Expecting property name enclosed in double "
                                        r"quotes at column 31\)"):
        PairSource(path=str(path)).load()


def test_a_misspelt_file_name_says_where_it_looked_and_the_near_name(tmp_path, monkeypatch):
    # it said "(looked at <project>/prefs/trian.jsonl; set $RM_LIGHTNING_DATA ...)": only the last place tried, with
    # the data root it had searched (and which was set) left unsaid, and nothing about train.jsonl next door
    (tmp_path / "prefs").mkdir()
    (tmp_path / "prefs" / "train.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    monkeypatch.setenv("RM_LIGHTNING_DATA", str(tmp_path))
    with pytest.raises(DataError, match=rf"data file not found: prefs/trian\.jsonl \(looked under .*{tmp_path} "
                                        rf"\(\$RM_LIGHTNING_DATA\).*; did you mean prefs/train\.jsonl\?\)"):
        PairSource(path="prefs/trian.jsonl").load()


@pytest.mark.parametrize("records", [[{"prompt": "p", "chosen": "c", "rejected": "r"}] * 2,  # a JSON array
                                     {"prompt": "p", "chosen": "c", "rejected": "r"}])  # one record, pretty-printed
def test_pretty_printed_json_under_a_jsonl_name_says_so(records, tmp_path):
    # it said "pretty.jsonl:1: not valid JSON (Expecting value at column 1)", which hid that the file was JSON
    path = tmp_path / "pretty.jsonl"
    path.write_text(json.dumps(records, indent=2))
    with pytest.raises(DataError, match=r"pretty\.jsonl:1: not valid JSON .*; this looks like JSON spread over "
                                        r"several lines: JSON Lines has one record per line \(or name the file \.json\)"):
        PairSource(path=str(path)).load()


@pytest.mark.parametrize("name", ["my_prefs", "my_prefs.jsonl"])
def test_a_folder_given_as_a_data_file_is_named_a_folder_with_its_data_files(name, tmp_path):
    # a folder (a downloaded dataset's, or `ultrafeedback` for `ultrafeedback/train.jsonl`) was "unknown data file
    # type '(no suffix)'", or "data file not found" when its name had a suffix: though it is right there
    folder = tmp_path / name
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    with pytest.raises(DataError, match=rf"{folder}: a folder, not a data file; its data files: train\.jsonl"):
        PairSource(path=str(folder)).load()


# --- length caps -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_module():
    return ExplicitRM(backbone="tiny-llama-chat")


def capped_module(tiny_module, truncate: bool) -> RealWorldDataModule:
    module = RealWorldDataModule(train={"path": "rewardbench_math/train.jsonl"},
                                 eval_sets={"code": {"path": "rewardbench_code/test.jsonl", "tag": "domain_shift",
                                                     "limit": 60}},
                                 max_prompt_tokens=600, max_response_tokens=800, truncate=truncate,
                                 eval_max_prompt_tokens=600, eval_max_response_tokens=800)  # eval sets: explicit caps
    module.attach(tiny_module).setup("fit")
    return module


def test_length_caps_drop_exactly_the_over_long_pairs(tiny_module, shared_data):
    tokenizer = tiny_module.tokenizer

    def fits(pair):
        count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        return count(pair.prompt) <= 600 and count(pair.chosen) <= 800 and count(pair.rejected) <= 800

    module = capped_module(tiny_module, truncate=False)
    train, eval_sets = module.load_pairs()
    expected_train = sum(fits(p) for p in train)
    assert 0 < expected_train < len(train)
    assert (len(module.train_set), module.train_set.dropped) == (expected_train, len(train) - expected_train)
    code = module.eval_sets["code"]
    assert len(code) == sum(fits(p) for p in eval_sets["code"].pairs) and code.dropped > 0


def test_truncation_keeps_every_pair_with_a_non_empty_response(tiny_module, shared_data):
    module = capped_module(tiny_module, truncate=True)
    # the template's end of turn: the end token and the newline after it
    end_of_turn = len(tiny_module.tokenizer("<|end|>\n", add_special_tokens=False)["input_ids"])
    for dataset in module.encoded_sets().values():
        assert dataset.dropped == 0 and len(dataset) in (34, 60)
        for pair in dataset.pairs:
            for ids, start in ((pair.chosen_ids, pair.chosen_start), (pair.rejected_ids, pair.rejected_start)):
                response = len(ids) - start - end_of_turn
                assert 1 <= response <= 800
                assert tiny_module.tokenizer.decode(ids[start:start + response]).strip()


# --- configs through cli.py ------------------------------------------------------------------------


@pytest.mark.parametrize("config", sorted(CONFIG_SETS))
def test_config_names_every_matching_set_with_its_readme_tag(config, capsys):
    with pytest.raises(SystemExit):
        cli.main(["fit", "--config", str(PROJECT_ROOT / f"configs/{config}.yaml"), "--print_config"])
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    train_folder, expected = CONFIG_SETS[config]
    assert data["train"]["path"] == f"{train_folder}/train.jsonl"
    assert {name: spec["tag"] for name, spec in data["eval_sets"].items()} == expected
    assert all(spec["path"] == f"{name}/test.jsonl" for name, spec in data["eval_sets"].items())


@pytest.mark.parametrize("config", ["exrm_ultrafeedback", "imrm_rewardmath"])
def test_config_fits_on_tiny_model_and_logs_every_set(config, tmp_path, shared_data):
    _, expected = CONFIG_SETS[config]
    override = tiny_override(tmp_path, max_steps=2, reference_cache_dir=tmp_path / "ref" if "imrm" in config else None)
    small_sets = [arg for name in expected for arg in (f"--data.init_args.eval_sets.{name}.limit", "4")]
    result = cli.main(["fit", "--config", str(PROJECT_ROOT / f"configs/{config}.yaml"), "--config", str(override),
                       "--data.init_args.train.limit", "8", *small_sets, "--trainer.check_val_every_n_epoch", "1",
                       "--data.init_args.max_prompt_tokens", "96", "--data.init_args.max_response_tokens", "96"])
    logged = result.trainer.logged_metrics
    expected = {**expected, "train_sample": "training"}  # all 8 training pairs (train_sample: 200)
    for name in expected:
        assert 0.0 <= float(logged[f"val/{name}/accuracy"]) <= 1.0
        assert f"val/{name}/normalized_margin" in logged
    assert result.datamodule.eval_set_tags == expected
    assert len(result.datamodule.train_set) == 8
    # a pair whose responses truncation cuts to the same tokens is dropped as identical (a code pair here)
    assert {name: len(d) + d.screened.get("identical", 0) for name, d in result.datamodule.eval_sets.items()} == {
        name: 8 if name == "train_sample" else 4 for name in expected}


def test_truncation_never_splits_a_character_past_the_cap_or_leaves_a_blank(tiny_module):
    from rm_lightning.pairs import PairEncoder, PreferencePair

    encoder = PairEncoder(tiny_module.tokenizer, tiny_module.format_texts, max_prompt_tokens=5,
                          max_response_tokens=5, truncate=True)
    count = lambda text: len(tiny_module.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    capped = encoder._apply_caps(PreferencePair("ééééé prompt", "ééééé", "       def f(): pass"))
    assert capped is None  # the rejected response would be blank
    capped = encoder._apply_caps(PreferencePair("ééééé prompt", "ééééé", "abcdefgh"))
    assert count(capped.chosen) <= 5 and capped.chosen and count(capped.prompt) <= 5
    with pytest.raises(DataError, match="max_prompt_tokens must be a positive"):
        PairEncoder(tiny_module.tokenizer, tiny_module.format_texts, max_prompt_tokens=0)
