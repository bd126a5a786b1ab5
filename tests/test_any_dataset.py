"""Any dataset (issue 17, item 4): local JSONL/JSON/Parquet/CSV files and any hub id as pair sources, a
column mapping, TRL's standard and conversational formats (multi-turn prompts through the chat template),
a per-pair margin carried to the batch, and errors that name the file and row. All offline."""

import csv
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import PROJECT_ROOT, tiny_override
from data_modules.conversational_example import example_records
from data_modules.preference_sources import EvalSetSource, PairSource, load_hub_pairs, record_pair
from rm_lightning import cli
from rm_lightning.errors import DataError
from rm_lightning.models.explicit import ExplicitRM
from rm_lightning.models.generative import ExplicitGenerativeRM
from rm_lightning.pairs import PairCollator, PairEncoder, PreferencePair, Turn, chat_formatter
from rm_lightning.pairs.screening import screen_pairs
from rm_lightning.perf.micro_batches import select_pairs

SYSTEM = {"role": "system", "content": "Be brief."}
HI = {"role": "user", "content": "Hi"}
HELLO = {"role": "assistant", "content": "Hello! How can I help?"}
ASK = {"role": "user", "content": "What is 2+2?"}
PROMPT = [SYSTEM, HI, HELLO, ASK]
GOOD, BAD = "It is 4.", "It is 5."
PROMPT_TURNS = tuple(Turn(m["role"], m["content"]) for m in PROMPT)


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def chat_module():
    return ExplicitRM(backbone="tiny-llama-chat")


# --- one tokenization path: a conversation through the chat template -----------------------------------


def test_multi_turn_pair_is_exactly_the_chat_templates_rendering_with_the_response_last(chat_module):
    tokenizer = chat_module.tokenizer
    pair = record_pair({"prompt": PROMPT, "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]}, "row 1")
    encoded = chat_module.pair_encoder(max_prompt_tokens=None, max_response_tokens=None).encode(pair)
    for ids, start, response in ((encoded.chosen_ids, encoded.chosen_start, GOOD),
                                 (encoded.rejected_ids, encoded.rejected_start, BAD)):
        full = tokenizer.apply_chat_template(PROMPT + [assistant(response)], tokenize=False)
        prompt = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
        assert ids == tokenizer(full, add_special_tokens=False)["input_ids"]
        assert start == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert tokenizer.decode(ids[start:]).startswith(response)


def test_a_one_user_turn_conversation_tokenizes_as_its_string_prompt(chat_module):
    encoder = chat_module.pair_encoder()
    as_text = encoder.encode(PreferencePair("What is 2+2?", GOOD, BAD))
    as_turns = encoder.encode(record_pair({"prompt": [ASK], "chosen": [assistant(GOOD)],
                                           "rejected": [assistant(BAD)]}, "row 1"))
    assert (as_turns.chosen_ids, as_turns.chosen_start) == (as_text.chosen_ids, as_text.chosen_start)


def test_plain_base_format_renders_turns_as_role_lines_before_the_assistant_cue():
    prefix, suffix = chat_formatter(types.SimpleNamespace(chat_template=None), "plain")(PROMPT_TURNS, GOOD)
    assert prefix == "System: Be brief.\nUser: Hi\nAssistant: Hello! How can I help?\nUser: What is 2+2?\nAssistant:"
    assert suffix == f" {GOOD}"


def test_exgrm_puts_a_multi_turn_prompt_into_its_question_as_role_lines():
    module = ExplicitGenerativeRM(backbone="tiny-llama")
    prefix, _ = module.format_texts(PROMPT_TURNS, GOOD)
    assert "Question: System: Be brief.\nUser: Hi\nAssistant: Hello! How can I help?\nUser: What is 2+2?\n" \
           f"Answer: {GOOD}\nVerification:" in prefix
    assert module.format_texts((Turn("user", "Q"),), "A") == module.format_texts("Q", "A")


def test_prompt_cap_counts_raw_turn_text_and_truncation_drops_whole_early_turns_never_leaving_an_assistant_first(
        chat_module):
    tokenizer = chat_module.tokenizer
    raw = sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in PROMPT)
    pair = PreferencePair(PROMPT_TURNS, GOOD, BAD)
    exact = PairEncoder(tokenizer, chat_module.format_texts, max_prompt_tokens=raw)
    assert exact.encode(pair) is not None
    assert PairEncoder(tokenizer, chat_module.format_texts, max_prompt_tokens=raw - 1).encode(pair) is None
    cut = PairEncoder(tokenizer, chat_module.format_texts, max_prompt_tokens=raw - 1, truncate=True)
    assert cut._apply_caps(pair).prompt == PROMPT_TURNS[1:]  # the system turn goes first
    last_two = raw - sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in PROMPT[:2])
    cut = PairEncoder(tokenizer, chat_module.format_texts, max_prompt_tokens=last_two, truncate=True)
    assert cut._apply_caps(pair).prompt == PROMPT_TURNS[3:]  # the assistant turn that would open it goes too
    tiny = PairEncoder(tokenizer, chat_module.format_texts, max_prompt_tokens=3, truncate=True)
    assert tiny._apply_caps(pair).prompt == (Turn("user", "+2?"),)  # the last turn alone: its end


def test_a_conversation_whose_turns_are_all_blank_is_screened_as_empty():
    pair = PreferencePair((Turn("system", " "), Turn("user", "")), GOOD, BAD)
    kept, counts = screen_pairs("set", [pair])
    assert kept == [] and counts["empty"] == 1


# --- both of TRL's formats, explicit and implicit prompts ----------------------------------------------


def test_implicit_prompt_conversations_split_at_their_shared_turns():
    pair = record_pair({"chosen": PROMPT + [assistant(GOOD)], "rejected": PROMPT + [assistant(BAD)]}, "row 1")
    assert pair == PreferencePair(PROMPT_TURNS, GOOD, BAD)
    single = record_pair({"chosen": [ASK, assistant(GOOD)], "rejected": [ASK, assistant(BAD)]}, "row 1")
    assert single == PreferencePair("What is 2+2?", GOOD, BAD)


def test_a_text_prompt_beside_whole_conversations_is_their_copy_as_in_ultrafeedback_binarized():
    record = {"prompt": "What is 2+2?", "chosen": [ASK, assistant(GOOD)], "rejected": [ASK, assistant(BAD)]}
    assert record_pair(record, "row 1") == PreferencePair("What is 2+2?", GOOD, BAD)
    explicit = {"prompt": "What is 2+2?", "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]}
    assert record_pair(explicit, "row 1") == PreferencePair("What is 2+2?", GOOD, BAD)


def test_a_message_prompt_that_whole_conversations_repeat_is_their_copy_not_said_twice():
    # a dataset that keeps the prompt's messages beside whole conversations (prompt = chosen[:-1]) trained on the
    # prompt twice over: system, user, system, user, then the response
    record = {"prompt": PROMPT, "chosen": PROMPT + [assistant(GOOD)], "rejected": PROMPT + [assistant(BAD)]}
    assert record_pair(record, "row 1") == PreferencePair(PROMPT_TURNS, GOOD, BAD)
    # a prompt that the conversations do not start with is context before them, as before
    earlier = {"prompt": [SYSTEM], "chosen": [HI, assistant(GOOD)], "rejected": [HI, assistant(BAD)]}
    assert record_pair(earlier, "row 1").prompt == (Turn("system", "Be brief."), Turn("user", "Hi"))


def test_standard_and_conversational_records_of_one_file_both_load(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                                  {"prompt": PROMPT, "chosen": [assistant(GOOD)],
                                                   "rejected": [assistant(BAD)]}])
    assert PairSource(path=str(path)).load() == [PreferencePair("p", "c", "r"), PreferencePair(PROMPT_TURNS, GOOD, BAD)]
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: field 'prompt' must be a string, got list"):
        PairSource(path=str(path), format="standard").load()


# --- any file, column mapping, margin ---------------------------------------------------------------


RECORDS = [{"question": PROMPT, "good": [assistant(GOOD)], "bad": [assistant(BAD)], "score": 2.5},
           {"question": [ASK], "good": [assistant("Four.")], "bad": [assistant("Five.")], "score": 0.5}]
MAPPED = {"prompt": "question", "chosen": "good", "rejected": "bad", "margin": "score"}
EXPECTED = [PreferencePair(PROMPT_TURNS, GOOD, BAD, margin=2.5),
            PreferencePair("What is 2+2?", "Four.", "Five.", margin=0.5)]


def write_records(path: Path, records: list[dict]) -> Path:
    """``records`` in the file type of ``path``'s suffix (CSV: conversations as JSON text cells)."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, records)
    if path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_file_type_gives_the_same_pairs_through_a_column_mapping(suffix, tmp_path):
    path = write_records(tmp_path / f"pairs{suffix}", RECORDS)
    assert PairSource(path=str(path), columns=MAPPED).load() == EXPECTED


@pytest.mark.parametrize("suffix, where", [(".jsonl", ":2"), (".json", " row 2"), (".parquet", " row 2"),
                                           (".csv", ":2")])
def test_a_missing_column_is_named_with_the_file_and_row(suffix, where, tmp_path):
    records = [dict(RECORDS[0]), {key: value for key, value in RECORDS[1].items() if key != "bad"}]
    if suffix == ".parquet":
        records[1]["bad"] = None  # a Parquet column is in every row: a missing value is null
    if suffix == ".csv":  # a CSV column is in every row too (an empty cell is empty text): leave it out of the file
        records = [{key: value for key, value in record.items() if key != "bad"} for record in records]
    path = write_records(tmp_path / f"pairs{suffix}", records)
    problem = "field 'bad' \\(the rejected column\\) is empty" if suffix == ".parquet" else "missing field 'bad'"
    with pytest.raises(DataError, match=f"pairs\\{suffix}{where}: {problem}"):
        PairSource(path=str(path), columns=MAPPED).load()


def test_a_column_name_with_spaces_around_it_is_shown_so(tmp_path):
    # a hand-written header "prompt, chosen, rejected" said "missing field 'chosen' (has:  chosen,  rejected,
    # prompt)": the spaces that made ' chosen' another name were all but invisible
    path = tmp_path / "pairs.csv"
    path.write_text("prompt, chosen, rejected\nQ,A,B\n")
    with pytest.raises(DataError, match=r"pairs\.csv:2: missing field 'chosen' \(has: ' chosen', ' rejected', prompt; "
                                        r"' chosen' has spaces around it\)"):
        PairSource(path=str(path)).load()


def test_a_csv_cell_longer_than_the_csv_modules_default_limit_loads(tmp_path):
    # a 200 000-character document (the length caps drop or cut it later) was "not valid CSV (field larger than
    # field limit (131072))", with no line, where the same record in JSON Lines loaded
    long = {"prompt": "word " * 40_000, "chosen": "c", "rejected": "r"}
    path = write_records(tmp_path / "pairs.csv", [long])
    assert PairSource(path=str(path)).load() == [PreferencePair(long["prompt"], "c", "r")]


@pytest.mark.parametrize("separator", [";", "\t"])
def test_a_csv_separated_by_semicolons_or_tabs_says_so(separator, tmp_path):
    # a European-locale spreadsheet's export said "missing field 'prompt' (has: prompt;chosen;rejected)"
    path = tmp_path / "pairs.csv"
    path.write_text(separator.join(["prompt", "chosen", "rejected"]) + "\n" + separator.join("QAB") + "\n")
    with pytest.raises(DataError, match=rf"pairs\.csv:1: the header is one column, .*: fields separated by "
                                        rf"{re.escape(repr(separator))} rather than ','\? A .csv file here is "
                                        rf"comma-separated"):
        PairSource(path=str(path)).load()


def test_a_csv_cell_that_starts_with_a_bracket_but_is_no_json_list_stays_text(tmp_path):
    path = write_records(tmp_path / "pairs.csv", [{"prompt": "[INST] hi", "chosen": "c", "rejected": "r"}])
    assert PairSource(path=str(path)).load() == [PreferencePair("[INST] hi", "c", "r")]
    with pytest.raises(DataError, match=r"pairs\.csv:2: field 'prompt' is not a valid JSON list of messages"):
        PairSource(path=str(path), format="conversational").load()


@pytest.mark.parametrize("format", ["auto", "standard"])
def test_a_csv_answer_that_is_a_json_list_of_values_stays_text(format, tmp_path):
    path = write_records(tmp_path / "pairs.csv", [{"prompt": "Sort: 3, 1, 2", "chosen": "[1, 2, 3]",
                                                   "rejected": "[3, 2, 1]"}])
    assert PairSource(path=str(path), format=format).load() == [PreferencePair("Sort: 3, 1, 2", "[1, 2, 3]",
                                                                               "[3, 2, 1]")]


def test_a_json_lines_file_named_json_is_read_as_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    assert PairSource(path=str(path)).load() == [PreferencePair("p", "c", "r")]


def test_a_json_object_holding_the_records_under_a_key_names_the_key(tmp_path):
    # {"data": [...]} was read as one record: "row 1: missing field 'prompt' (has: data)"
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": 2, "data": [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 3}))
    with pytest.raises(DataError, match=r"wrapped\.json: one JSON object whose 'data' holds 3 records; the file's top "
                                        r"level must be the list of records \(or one record per line\)"):
        PairSource(path=str(path)).load()
    one = tmp_path / "one.json"  # one pretty-printed conversational record is no wrapper: its lists are messages
    one.write_text(json.dumps({"prompt": PROMPT, "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]}, indent=2))
    assert PairSource(path=str(one)).load() == [PreferencePair(PROMPT_TURNS, GOOD, BAD)]


def test_margin_column_reaches_the_batch_per_pair_and_micro_batches_split_it(chat_module, tmp_path):
    path = write_jsonl(tmp_path / "margins.jsonl", [{"prompt": f"p{i}", "chosen": "c", "rejected": "r", "margin": m}
                                                    for i, m in enumerate([0.5, 2.0, 1.0])])
    pairs = PairSource(path=str(path)).load()
    encoded, _ = chat_module.pair_encoder().encode_all(pairs)
    batch = PairCollator(chat_module.tokenizer.pad_token_id)(encoded)
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [0.5, 2.0, 1.0]
    assert select_pairs(batch, [2, 0])["margin"].tolist() == [1.0, 0.5]
    without = PairCollator(chat_module.tokenizer.pad_token_id)(encoded[:2] + chat_module.pair_encoder().encode_all(
        [PreferencePair("p", "c", "r")])[0])
    assert "margin" not in without  # only when every pair of the batch has one


@pytest.mark.parametrize("record, message", [
    ({"prompt": [HI], "chosen": [HI], "rejected": [assistant(BAD)]}, "field 'chosen' has no assistant turn"),
    ({"chosen": [HI], "rejected": [HI, assistant(BAD)]}, "field 'chosen' has no assistant turn"),
    ({"chosen": [HI, assistant(GOOD), ASK], "rejected": [HI, assistant(BAD)]},
     "field 'chosen' does not end with an assistant turn"),
    ({"chosen": [HI, assistant(GOOD)], "rejected": [ASK, assistant(BAD)]},
     "fields 'chosen' and 'rejected' continue different conversations \\(they differ at message 0\\)"),
    ({"chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]}, "no prompt"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]},
     "field 'prompt', message 0: role must be one of system, user, assistant"),
    ({"prompt": [{"role": "user", "content": None}], "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]},
     "field 'prompt', message 0: 'content' must be a string, got NoneType"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "high"}, "field 'margin' must be a number"),
])
def test_bad_records_fail_with_the_file_line_and_field(record, message, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, record])
    with pytest.raises(DataError, match=f"bad\\.jsonl:2: {message}"):
        PairSource(path=str(path)).load()


@pytest.mark.parametrize("source, message", [
    (PairSource(path="x.txt"), "unknown data file type '.txt'"),
    (PairSource(path="x.jsonl", format="chat"), "format must be one of auto, standard, conversational"),
    (PairSource(path="x.jsonl", columns={"question": "q"}), "columns: unknown field 'question'"),
    (PairSource(hub="rewardmath", columns={"prompt": "q"}), "hub 'rewardmath' has its own conversion"),
    # a hub option on a local file was ignored without a word: `split: test` still read the whole file
    (PairSource(path="x.jsonl", split="test"), "`split` and `subset` choose part of a hub dataset; a local file "
                                               "is read whole"),
    (PairSource(path="x.jsonl", subset="v2"), "`split` and `subset` choose part of a hub dataset"),
    # from Python (the CLI checks the Literal): a misspelt kind was read as pairs, "missing field 'chosen'"
    (EvalSetSource(path="x.jsonl", kind="respones"), "kind must be pairs or responses, got 'respones'"),
])
def test_bad_source_options_are_named(source, message, tmp_path):
    if source.path:
        source.path = str(tmp_path / source.path)
        Path(source.path).write_text("{}\n")
    with pytest.raises(DataError, match=message):
        source.load()


def test_any_hub_dataset_id_reads_like_a_file_with_its_subset_split_and_columns(monkeypatch):
    calls = []

    def load_dataset(dataset_id, name=None, split=None):
        calls.append((dataset_id, name, split))
        return RECORDS

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    pairs = load_hub_pairs("someone/prefs", split="test", subset="v2", columns=MAPPED)
    assert pairs == EXPECTED and calls == [("someone/prefs", "v2", "test")]
    assert pairs[0].source == "someone/prefs[test] row 1"
    assert PairSource(hub="someone/prefs", columns=MAPPED).load() == EXPECTED and calls[-1][2] == "train"


# --- the shipped example, end to end -------------------------------------------------------------------


def test_the_shipped_conversational_example_is_what_its_script_writes_and_loads_as_multi_turn_pairs():
    folder = PROJECT_ROOT / "examples" / "persona_conversations"
    for split, records in example_records().items():
        assert (folder / f"{split}.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in records)
        pairs = PairSource(path=str(folder / f"{split}.jsonl"), format="conversational").load()
        assert len(pairs) == len(records) and all(isinstance(p.prompt, tuple) and len(p.prompt) >= 3 for p in pairs)


@pytest.mark.parametrize("rm_type", ["ExplicitRM", "ImplicitRM", "ExplicitGenerativeRM"])
def test_fit_runs_on_a_conversational_jsonl_file(rm_type, tmp_path):
    records = [{"prompt": [SYSTEM, HI, HELLO, {"role": "user", "content": f"What is {i}+{i}?"}],
                "chosen": [assistant(f"It is {2 * i}.")], "rejected": [assistant(f"It is {2 * i + 1}.")],
                "margin": 1.0} for i in range(8)]
    records += [{"chosen": [HI, assistant("Hello!")], "rejected": [HI, assistant("Go away.")], "margin": 0.5}]
    train, test = write_jsonl(tmp_path / "train.jsonl", records), write_jsonl(tmp_path / "test.jsonl", records[:4])
    data = tmp_path / "data.yaml"
    data.write_text(f"model:\n  class_path: rm_lightning.{rm_type}\n"
                    f"data:\n  init_args:\n    train: {{path: {train}}}\n"
                    f"    eval_sets:\n      persona_conversations: {{path: {test}}}\n")
    override = tiny_override(tmp_path, max_steps=2, reference_cache_dir=tmp_path / "ref" if rm_type == "ImplicitRM"
                             else None)
    cli.main(["fit", "--config", str(PROJECT_ROOT / "configs/exrm_conversational_example.yaml"),
              "--config", str(data), "--config", str(override)])
    run = sorted((tmp_path / "lightning_logs").glob("version_*"))[-1]
    rows = list(csv.DictReader(open(run / "margin_history.csv")))
    assert {"train", "persona_conversations"} <= {row["set"] for row in rows}


@pytest.mark.parametrize("suffix, where", [(".jsonl", ":1"), (".json", " row 1")])
def test_a_lone_surrogate_escape_is_one_line_naming_the_record(suffix, where, tmp_path):
    path = tmp_path / f"pairs{suffix}"
    path.write_text('[{"prompt": "p", "chosen": "bad \\ud800 x", "rejected": "b"}]' if suffix == ".json" else
                    '{"prompt": "p", "chosen": "bad \\ud800 x", "rejected": "b"}\n')
    with pytest.raises(DataError, match=f"pairs\\{suffix}{where}: holds a lone UTF-16 surrogate"):
        PairSource(path=str(path)).load()


def test_a_response_set_maps_its_columns(tmp_path):
    from data_modules.preference_sources import EvalSetSource

    path = write_jsonl(tmp_path / "answers.jsonl", [{"question": "q?", "answer": "a."}])
    source = EvalSetSource(path=str(path), kind="responses", columns={"prompt": "question", "response": "answer"})
    assert [(r.prompt, r.response) for r in source.load_responses()] == [("q?", "a.")]
