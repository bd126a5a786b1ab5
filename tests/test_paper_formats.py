"""The paper's formats and splits, as the authors' code (princeton-pli/exrm-vs-imrm) makes them: the base-model
chat format, the Persona split and template draws, and the real-world configs' eval sets, caps and training sample."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PROJECT_ROOT
from data_modules import PersonaDataModule, RealWorldDataModule
from data_modules.persona_statements import AGREEABLENESS_STATEMENTS
from rm_lightning.errors import SettingError
from rm_lightning.models.backbones import load_backbone
from rm_lightning.models.explicit import ExplicitRM
from rm_lightning.pairs import PreferencePair, Turn, chat_formatter

# --- base models: the authors' turn markers and EOS --------------------------------------------------

# tiny-llama's byte-level vocabulary: the sorted byte alphabet ("!" = 0, so a printable ASCII character c is
# ord(c) - 33), then <pad> 256, <bos> 257, <eos> 258, <|end|> 259, "Yes" 260, "No" 261; the authors' two markers
# are added after them: <|user|> 262, <|assistant|> 263.
USER, ASSISTANT, EOS, YES, NO = 262, 263, 258, 260, 261
H, I, QUESTION = ord("H") - 33, ord("i") - 33, ord("?") - 33


def test_base_model_pair_has_the_authors_token_ids():
    module = ExplicitRM(backbone="tiny-llama")
    encoded = module.pair_encoder().encode(PreferencePair("Hi?", "Yes", "No"))
    prompt = [USER, H, I, QUESTION, EOS, ASSISTANT]  # <|user|>Hi?<eos><|assistant|>: no BOS, no newline
    assert encoded.chosen_ids == prompt + [YES, EOS]  # the response ends with EOS, which an EX-RM reads last
    assert encoded.rejected_ids == prompt + [NO, EOS]
    assert encoded.chosen_start == encoded.rejected_start == len(prompt)
    assert module.tokenizer.convert_ids_to_tokens(prompt[:1] + prompt[-1:]) == ["<|user|>", "<|assistant|>"]


def test_plain_base_format_keeps_the_user_assistant_lines():
    module = ExplicitRM(backbone="tiny-llama", base_format="plain")
    encoded = module.pair_encoder().encode(PreferencePair("Hi?", "Yes", "No"))
    prompt = [ord(c) - 33 for c in "User:"] + [220] + [H, I, QUESTION, 198] + [ord(c) - 33 for c in "Assistant:"]
    assert encoded.chosen_ids == prompt + [220, YES]  # " Yes" (220 is the byte-level space), no EOS
    assert encoded.chosen_start == len(prompt)


def test_base_format_of_a_conversation_is_the_authors_template():
    _, tokenizer = load_backbone("tiny-llama")
    conversation = (Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "Hello"), Turn("user", "2+2?"))
    prefix, suffix = chat_formatter(tokenizer)(conversation, "4")
    # their template gives a system turn the assistant marker
    assert prefix == "<|assistant|>Be brief.<eos><|user|>Hi<eos><|assistant|>Hello<eos><|user|>2+2?<eos><|assistant|>"
    assert suffix == "4<eos>"
    assert chat_formatter(tokenizer, "plain")(conversation, "4") == (
        "System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: 2+2?\nAssistant:", " 4")


def test_a_chat_template_of_its_own_is_untouched_by_the_base_format():
    model, tokenizer = load_backbone("tiny-llama-chat")
    assert "<|user|>" not in tokenizer.get_vocab() or len(tokenizer) == model.get_input_embeddings().num_embeddings
    assert len(tokenizer) == 262  # no marker added
    for base_format in ("authors", "plain"):
        assert chat_formatter(tokenizer, base_format)("Hi?", "Yes") == ("<|user|>\nHi?<|end|>\n<|assistant|>\n",
                                                                        "Yes<|end|>\n")


def test_policy_and_reference_of_a_base_model_share_the_markers():
    policy, tokenizer = load_backbone("tiny-llama")
    reference, other = load_backbone("tiny-llama")
    assert tokenizer.get_vocab() == other.get_vocab() and len(tokenizer) == 264
    assert policy.get_input_embeddings().num_embeddings == len(tokenizer)
    for a, b in zip(policy.state_dict().values(), reference.state_dict().values()):
        assert a.equal(b)


def test_unknown_base_format_is_refused():
    with pytest.raises(SettingError, match="base_format"):
        ExplicitRM(backbone="tiny-llama", base_format="chatml")


# --- Persona: the authors' split and template draws ----------------------------------------------------


def authors_persona_data(questions: list[str], seed: int, num_train: int = 80, num_test: int = 40):
    """The authors' ``PersonaControlledDataModule.setup``, written out: one generator seeded with the data seed,
    ``randperm`` over the "Yes" items in file order, then per train and then per test item four ``randint`` draws
    (chosen prefix, chosen token, rejected prefix, rejected token)."""
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(questions), generator=generator)
    train = [questions[i] for i in perm[:num_train]]
    test = [questions[i] for i in perm[num_train:num_train + num_test]]
    pools = [["In my view, the answer is ", "A truthful reply is "], ["yes", "sure"],
             ["My judgement: ", "Considering the statement, I say "], ["no", "never"]]
    triples = []
    for question in train + test:
        picks = [pool[torch.randint(low=0, high=len(pool), size=(1,), generator=generator)] for pool in pools]
        triples.append((question, picks[0] + picks[1], picks[2] + picks[3]))
    return train, test, triples


def test_persona_split_of_the_anthropic_file_is_the_authors(shared_data):
    path = shared_data / "persona" / "agreeableness.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    questions = [r["question"] for r in rows if r["answer_matching_behavior"].strip().lower() == "yes"]
    assert len(questions) == 500
    train, test, triples = authors_persona_data(questions, 875)
    data = PersonaDataModule(source="anthropic", path=str(path), data_seed=875)
    assert data.split_prompts() == (train, test)
    pairs, eval_sets = data.load_pairs()
    drawn = pairs + eval_sets["original_test_prompts"].pairs
    assert [(p.prompt, p.chosen, p.rejected) for p in drawn] == triples


def test_persona_builtin_statements_use_the_same_procedure():
    data = PersonaDataModule(data_seed=875)
    train, test, _ = authors_persona_data(data.prompts(), 875)
    assert data.split_prompts() == (train, test)
    assert len(data.prompts()) == len(AGREEABLENESS_STATEMENTS)


# --- real-world configs ------------------------------------------------------------------------------


def data_config(name: str) -> dict:
    return yaml.safe_load((PROJECT_ROOT / "configs" / "data" / name).read_text())["data"]["init_args"]


def test_rewardmath_config_has_the_papers_eval_sets_and_tags():
    init = data_config("rewardmath.yaml")
    tags = {name: source["tag"] for name, source in init["eval_sets"].items()}
    assert tags == {"rewardmath": "in_distribution", "rewardbench_math": "token_shift",
                    "ultrafeedback": "domain_shift", "ultrafeedback_paraphrase": "domain_shift",
                    "ultrafeedback_translate_french": "domain_shift", "ultrafeedback_translate_spanish": "domain_shift",
                    "rewardbench_code": "domain_shift"}
    assert init["train_sample"] == 200


@pytest.mark.parametrize("config", ["rewardmath.yaml", "ultrafeedback.yaml"])
def test_real_world_configs_evaluate_a_training_sample(config, shared_data):
    init = data_config(config)
    data = RealWorldDataModule(**init)
    train, eval_sets = data.load_pairs()
    sample = eval_sets["train_sample"]
    assert sample.tag == "training" and len(sample.pairs) == min(200, len(train))
    assert set(sample.pairs) <= set(train)


def write_pairs(path: Path, pairs: list[tuple[str, str, str]]) -> str:
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs))
    return str(path)


def test_length_caps_filter_the_training_set_only(tmp_path):
    long, short = "x" * 40, "ok"
    rows = [("q1", long, short), ("q2", short, "no"), ("q3", "fine", long)]
    path = write_pairs(tmp_path / "pairs.jsonl", rows)
    data = RealWorldDataModule(train={"path": path}, eval_sets={"test": {"path": path}}, train_sample=200,
                               max_prompt_tokens=16, max_response_tokens=16)
    data.attach(ExplicitRM(backbone="tiny-llama")).setup("fit")
    assert len(data.train_set) == 1 and len(data.eval_sets["train_sample"]) == 1  # the training caps
    assert len(data.eval_sets["test"]) == 3  # every row


def test_explicit_eval_caps_truncate_and_keep_rows_aligned(tmp_path):
    rows = [(f"q{i}", "a" * (10 * i + 1), "b") for i in range(5)]
    original = write_pairs(tmp_path / "original.jsonl", rows)
    rewritten = write_pairs(tmp_path / "rewritten.jsonl", [(p, c.upper() * 3, r) for p, c, r in rows])
    data = RealWorldDataModule(train={"path": original},
                               eval_sets={"original": {"path": original, "limit": 3},
                                          "rewritten": {"path": rewritten, "limit": 3, "max_response_tokens": 8}},
                               eval_max_response_tokens=20, truncate=True, data_seed=3)
    data.attach(ExplicitRM(backbone="tiny-llama")).setup("fit")
    original_set, rewritten_set = data.eval_sets["original"], data.eval_sets["rewritten"]
    assert [p.prompt for p in original_set.texts] == [p.prompt for p in rewritten_set.texts]
    assert len(original_set) == len(rewritten_set) == 3
    def longest_chosen(encoded):  # response tokens, the authors' closing EOS excluded
        return max(len(p.chosen_ids) - p.chosen_start - 1 for p in encoded.pairs)

    assert longest_chosen(rewritten_set) == 8  # its own cap, cut
    assert longest_chosen(original_set) <= 20  # the data module's eval cap


def test_shared_rewritten_sets_stay_row_aligned_with_their_originals(shared_data):
    data = RealWorldDataModule(**data_config("ultrafeedback.yaml"))
    data.attach(ExplicitRM(backbone="tiny-llama")).setup("validate")
    prompts = {name: [p.prompt for p in s.texts] for name, s in data.eval_sets.items()
               if name.startswith("ultrafeedback")}
    assert len(prompts) == 4 and all(len(p) == 20 for p in prompts.values())
    assert all(p == prompts["ultrafeedback"] for p in prompts.values())


@pytest.mark.parametrize("base_format", ["authors", "plain"])
def test_base_model_exrm_exports_with_the_format_it_was_trained_with(base_format, tmp_path):
    from transformers import AutoTokenizer

    from rm_lightning.models.export import export_module

    module = ExplicitRM(backbone="tiny-llama", base_format=base_format)
    export_module(module, tmp_path / "out")  # refuses when the exported template's token ids or rewards differ
    exported = AutoTokenizer.from_pretrained(tmp_path / "out").chat_template
    assert ("Assistant:" in exported) == (base_format == "plain")
