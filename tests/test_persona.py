import json

import pytest

from data_modules import PersonaDataModule
from data_modules.persona_statements import AGREEABLENESS_STATEMENTS
from rm_lightning import DataError, ExplicitRM


@pytest.fixture(scope="module")
def tiny_module():
    return ExplicitRM(backbone="tiny-llama-chat")


def test_builtin_statements_are_many_and_distinct():
    assert len(AGREEABLENESS_STATEMENTS) >= 150
    assert len({s.lower() for s in AGREEABLENESS_STATEMENTS}) == len(AGREEABLENESS_STATEMENTS)


def test_split_is_seeded_disjoint_and_sized():
    train, test = PersonaDataModule(data_seed=875).split_prompts()
    assert (len(train), len(test)) == (80, 40)
    assert not set(train) & set(test)
    assert PersonaDataModule(data_seed=875).split_prompts() == (train, test)
    assert PersonaDataModule(data_seed=1).split_prompts()[0] != train


def test_training_responses_come_from_the_template_pools():
    data = PersonaDataModule()
    train, eval_sets = data.load_pairs()
    chosen = {p + t for p in ["In my view, the answer is ", "A truthful reply is "] for t in ["yes", "sure"]}
    rejected = {p + t for p in ["My judgement: ", "Considering the statement, I say "] for t in ["no", "never"]}
    assert {pair.chosen for pair in train} == chosen  # 80 draws cover all four combinations
    assert {pair.rejected for pair in train} == rejected
    assert eval_sets["original_train_prompts"].pairs == train
    assert {pair.chosen for pair in eval_sets["original_test_prompts"].pairs} <= chosen


def test_paraphrased_sets_cover_every_token_combination():
    train, eval_sets = PersonaDataModule().load_pairs()
    assert list(eval_sets) == ["original_train_prompts", "original_test_prompts",
                               "paraphrased_train_prompts", "paraphrased_test_prompts"]
    paraphrased = eval_sets["paraphrased_test_prompts"]
    assert paraphrased.tag == "token_shift" and eval_sets["original_test_prompts"].tag == "in_distribution"
    assert len(paraphrased.pairs) == 40 * 4
    first_prompt = [p for p in paraphrased.pairs if p.prompt == paraphrased.pairs[0].prompt]
    assert {(p.chosen, p.rejected) for p in first_prompt} == {
        ("My response would be " + c, "I lean toward " + r)
        for c in ["certainly", "absolutely"] for r in ["not really", "nope"]
    }
    assert len(eval_sets["paraphrased_train_prompts"].pairs) == 80 * 4


def test_template_pools_are_configurable():
    data = PersonaDataModule(chosen_tokens=["indeed"], paraphrased_rejected_tokens=["nah"])
    train, eval_sets = data.load_pairs()
    assert all(pair.chosen.endswith("indeed") for pair in train)
    assert len(eval_sets["paraphrased_test_prompts"].pairs) == 40 * 2


def test_setup_tokenizes_once_with_the_module(tiny_module):
    data = PersonaDataModule(num_train=8, num_test=4, batch_size=4).attach(tiny_module)
    data.setup("fit")
    sets = data.encoded_sets()
    assert [len(sets[name]) for name in sets] == [8, 8, 4, 32, 16]
    pair = sets["train"][0]
    assert 0 < pair.chosen_start < len(pair.chosen_ids)
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 * 4


def test_anthropic_source_keeps_the_yes_items(shared_data):
    path = shared_data / "persona" / "agreeableness.jsonl"
    data = PersonaDataModule(source="anthropic", path=str(path))
    prompts = data.prompts()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    yes = [r["question"] for r in records if r["answer_matching_behavior"] == " Yes"]
    assert prompts == yes and len(prompts) == 500
    train, test = data.split_prompts()
    assert len(train) == 80 and len(test) == 40


def test_bad_persona_inputs_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        PersonaDataModule(source="anthropic", path=str(tmp_path / "missing.jsonl")).prompts()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer_matching_behavior": " Yes"}\n{not json}\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        PersonaDataModule(source="anthropic", path=str(broken)).prompts()
    partial = tmp_path / "partial.jsonl"
    partial.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"partial.jsonl:1: missing field 'answer_matching_behavior'"):
        PersonaDataModule(source="anthropic", path=str(partial)).prompts()
    with pytest.raises(DataError, match="unknown source"):
        PersonaDataModule(source="nope")
    with pytest.raises(DataError, match="usable prompts"):
        PersonaDataModule(num_train=500).split_prompts()


def test_anthropic_source_reads_any_trait_file(tmp_path):
    """Other persona traits (any model-written-evals persona file) work like agreeableness."""
    path = tmp_path / "conscientiousness.jsonl"
    lines = []
    for i in range(130):
        statement = f"I always finish task number {i} before starting another"
        lines.append({"question": f'Is the following statement something you would say?\n"{statement}"',
                      "statement": statement, "answer_matching_behavior": " Yes",
                      "answer_not_matching_behavior": " No"})
        lines.append({"question": f'Is the following statement something you would say?\n"I leave job {i} undone"',
                      "statement": f"I leave job {i} undone", "answer_matching_behavior": " No",
                      "answer_not_matching_behavior": " Yes"})
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    data = PersonaDataModule(source="anthropic", path=str(path))
    train, eval_sets = data.load_pairs()
    assert len(train) == 80 and all("finish task" in pair.prompt for pair in train)
    assert len(eval_sets["paraphrased_test_prompts"].pairs) == 40 * 4
    assert {pair.prompt for pair in train}.isdisjoint(pair.prompt for pair in eval_sets["original_test_prompts"].pairs)
