"""Using a trained reward model (issue 17, item 1): ``predict`` writes predictions.jsonl, ``score`` from Python."""

import json
from pathlib import Path

import pytest
import torch

from conftest import PROJECT_ROOT, tiny_override
from rm_lightning import ExplicitRM, ImplicitRM, cli, load_reward_model
from rm_lightning.errors import DataError, SettingError

PAIRS = [("What is 2+2?", "4", "5"), ("Name a color.", "Blue.", "Seven."), ("Say hi.", "Hi!", "No."),
         ("Capital of France?", "Paris", "Rome"), ("Is ice cold?", "Yes, it is.", "No, it is hot."),
         ("Spell cat.", "c-a-t", "d-o-g"), ("3*3?", "9", "6"), ("Opposite of up?", "Down", "Left")]
RESPONSES = [("What is 2+2?", "4"), ("What is 2+2?", "five"), ("Name a color.", "Green"), ("Say hi.", "Hello there"),
             ("3*3?", "9")]  # an odd count: the last response is laid out with itself


# Python's ``score`` runs in fp32; ``precision: auto`` would pick bf16-mixed on a CPU with native bf16
FP32 = ["--trainer.precision", "32-true"]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def data_config(folder: Path, train: bool = True) -> Path:
    """A data block over small files in ``folder``: train pairs, one eval set of pairs, one of single responses."""
    pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    write_jsonl(folder / "train.jsonl", pairs)
    write_jsonl(folder / "test.jsonl", pairs[:6])
    write_jsonl(folder / "responses.jsonl", [{"prompt": p, "response": r} for p, r in RESPONSES])
    train_line = f"    train: {{path: {folder / 'train.jsonl'}}}\n" if train else ""
    path = folder / "data.yaml"
    path.write_text("data:\n  class_path: data_modules.RealWorldDataModule\n  init_args:\n" + train_line +
                    "    eval_sets:\n"
                    f"      mine: {{path: {folder / 'test.jsonl'}, tag: token_shift}}\n")
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A one-epoch tiny EX-RM run with checkpoints/last.ckpt."""
    tmp = tmp_path_factory.mktemp("trained")
    cli.main(["fit", "--config", str(PROJECT_ROOT / "configs/trainer/cpu.yaml"),
              "--config", str(PROJECT_ROOT / "configs/model/exrm.yaml"), "--config", str(data_config(tmp)),
              "--config", str(tiny_override(tmp)), "--trainer.max_epochs", "1", "--trainer.max_steps", "-1",
              "--seed_everything", "0", *FP32])
    run = tmp / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    return run


def predict_run(run: Path, *args: str) -> Path:
    """``predict`` with the run's own config and checkpoint; the run directory it wrote."""
    before = set(run.parent.iterdir())
    cli.main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints/last.ckpt"),
              *FP32, *args])
    (new_run,) = set(run.parent.iterdir()) - before
    return new_run


def predict(run: Path, *args: str) -> list[dict]:
    """The rows of the predictions file ``predict_run`` wrote."""
    new_run = predict_run(run, *args)
    return [json.loads(line) for line in (new_run / "predictions.jsonl").read_text().splitlines()]


def test_predict_writes_a_row_per_pair_with_the_rewards_of_a_direct_forward(trained_run):
    rows = predict(trained_run)
    assert len(rows) == 6
    assert [r["prompt"] for r in rows] == [p for p, _, _ in PAIRS[:6]]
    assert {(r["eval_set"], r["shift_tag"], r["kind"]) for r in rows} == {("mine", "token_shift", "pair")}
    assert rows[0]["source"].endswith("test.jsonl:1")
    module = load_reward_model(trained_run / "checkpoints" / "last.ckpt")
    chosen, rejected = module.score_pairs(*zip(*PAIRS[:6]))
    assert torch.allclose(torch.tensor([r["chosen_reward"] for r in rows]), chosen, atol=1e-5)
    assert torch.allclose(torch.tensor([r["rejected_reward"] for r in rows]), rejected, atol=1e-5)
    assert all(abs(r["margin"] - (r["chosen_reward"] - r["rejected_reward"])) < 1e-6 for r in rows)


def test_predict_from_a_checkpoint_writes_no_checkpoint_and_no_warning_about_the_run_it_came_from(trained_run,
                                                                                                 recwarn):
    new_run = predict_run(trained_run)
    assert not (new_run / "checkpoints").exists()
    assert not [str(w.message) for w in recwarn if "dirpath has changed" in str(w.message)]


def test_predict_scores_single_responses_one_reward_each(trained_run):
    responses = trained_run.parent.parent / "responses.jsonl"
    rows = predict(trained_run, "--data.init_args.eval_sets",
                   f"{{only: {{path: {responses}, kind: responses, tag: domain_shift}}}}")
    assert [(r["kind"], r["eval_set"], r["prompt"], r["response"]) for r in rows] == \
        [("response", "only", p, r) for p, r in RESPONSES]
    module = load_reward_model(trained_run / "checkpoints" / "last.ckpt")
    expected = module.score(*zip(*RESPONSES))
    assert torch.allclose(torch.tensor([r["reward"] for r in rows]), expected, atol=1e-5)


def test_score_equals_the_reward_of_the_same_pair_in_a_batch():
    module = ExplicitRM(backbone="tiny-llama-chat")
    chosen, rejected = module.score_pairs(*zip(*PAIRS), batch_size=8)  # all pairs in one batch
    prompt, good, bad = PAIRS[3]
    alone = module.score([prompt, prompt], [good, bad], batch_size=1)
    assert torch.allclose(alone, torch.stack([chosen[3], rejected[3]]), atol=1e-5)
    assert module.training and alone.grad_fn is None  # eval mode only while scoring, no graph kept


def test_implicit_rm_against_its_own_reference_scores_exactly_zero():
    rewards = ImplicitRM(backbone="tiny-llama-chat").score(*zip(*RESPONSES))
    assert rewards.shape == (len(RESPONSES),) and torch.equal(rewards, torch.zeros(len(RESPONSES)))


def test_load_reward_model_restores_the_rm_type_in_eval_mode(trained_run, tmp_path):
    module = load_reward_model(trained_run / "checkpoints" / "last.ckpt")
    assert isinstance(module, ExplicitRM) and not module.training
    # a checkpoint that does not record its type (older ones): the run directory's config.yaml says it
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    del checkpoint["rm_lightning_class_path"]
    (tmp_path / "checkpoints").mkdir()
    torch.save(checkpoint, tmp_path / "checkpoints" / "old.ckpt")
    (tmp_path / "config.yaml").write_text((trained_run / "config.yaml").read_text())
    assert isinstance(load_reward_model(tmp_path / "checkpoints" / "old.ckpt"), ExplicitRM)


def test_bad_inputs_are_one_line_errors(trained_run, tmp_path, capsys):
    with pytest.raises(SettingError, match="checkpoint not found"):
        load_reward_model(tmp_path / "missing.ckpt")
    with pytest.raises(DataError, match="differ in length"):
        ExplicitRM(backbone="tiny-llama-chat").score(["a", "b"], ["c"])
    with pytest.raises(DataError, match="prompts must be a list of strings, got one string"):
        ExplicitRM(backbone="tiny-llama-chat").score("hello", "world")
    with pytest.raises(SystemExit) as missing_ckpt:
        cli.main(["predict", "--config", str(trained_run / "config.yaml"), "--ckpt_path", str(tmp_path / "no.ckpt")])
    no_response = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(SystemExit) as missing_field:
        predict(trained_run, "--data.init_args.eval_sets", f"{{x: {{path: {no_response}, kind: responses}}}}")
    assert missing_ckpt.value.code == missing_field.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "no.ckpt" in errors[0] and "missing field 'response'" in errors[1]


def test_a_pair_s_index_is_its_record_s_position_in_the_file_dropped_records_counted(trained_run, tmp_path):
    records = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS[:4]]
    records[1]["rejected"] = records[1]["chosen"]  # identical: dropped
    records[2]["chosen"] = " "  # empty: dropped
    mixed = write_jsonl(tmp_path / "mixed.jsonl", records)
    rows = predict(trained_run, "--data.init_args.eval_sets", f"{{mixed: {{path: {mixed}}}}}")
    assert [(r["index"], r["prompt"]) for r in rows] == [(0, PAIRS[0][0]), (3, PAIRS[3][0])]


def test_a_conversation_prompt_is_written_as_its_messages(trained_run, tmp_path):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": turns, "chosen": "4", "rejected": "5"}])
    (row,) = predict(trained_run, "--data.init_args.eval_sets", f"{{chat: {{path: {chat}}}}}")
    assert row["prompt"] == turns


def test_a_checkpoint_evaluated_on_another_file_with_the_evaluate_config(trained_run, tmp_path):
    # the run's config, then the eval-only data block of configs/evaluate_rewardbench_math.yaml, then one's own file
    own = write_jsonl(tmp_path / "own.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS[6:]])
    rows = predict(trained_run, "--config", str(PROJECT_ROOT / "configs/evaluate_rewardbench_math.yaml"),
                   "--data.init_args.eval_sets", f"{{own: {{path: {own}}}}}")
    assert [(r["eval_set"], r["prompt"]) for r in rows] == [("own", p) for p, _, _ in PAIRS[6:]]


def test_imrm_predictions_from_the_cli_equal_its_rewards_from_python(tmp_path):
    # the CLI's reference log-probs come from the reference cache, Python's from the reference model: the same
    cli.main(["fit", "--config", str(PROJECT_ROOT / "configs/trainer/cpu.yaml"),
              "--config", str(PROJECT_ROOT / "configs/model/imrm.yaml"), "--config", str(data_config(tmp_path)),
              "--config", str(tiny_override(tmp_path, reference_cache_dir=tmp_path / "cache")),
              "--trainer.max_epochs", "1", "--trainer.max_steps", "-1", *FP32])
    run = tmp_path / "lightning_logs" / "version_0"
    rows = predict(run)
    chosen, rejected = load_reward_model(run / "checkpoints" / "last.ckpt").score_pairs(*zip(*PAIRS[:6]))
    assert torch.allclose(torch.tensor([r["chosen_reward"] for r in rows]), chosen, atol=1e-6)
    assert torch.allclose(torch.tensor([r["rejected_reward"] for r in rows]), rejected, atol=1e-6)
    assert chosen.abs().max() > 0  # trained: not the reference's zeros


def test_load_reward_model_of_a_run_folder_or_a_non_checkpoint_names_what_to_give(tmp_path):
    """An existing folder is not 'not found', and a file that is no checkpoint is no traceback."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_text("not a checkpoint\n")
    with pytest.raises(SettingError, match="is a folder, not a checkpoint .its checkpoint is .*last.ckpt"):
        load_reward_model(tmp_path / "run")
    with pytest.raises(SettingError, match="not a readable checkpoint"):
        load_reward_model(tmp_path / "run" / "checkpoints" / "last.ckpt")


def test_load_reward_model_of_an_rm_type_not_importable_here_is_one_line(tmp_path):
    """A user's subclass whose module is not on the path: one line naming it, not a ModuleNotFoundError traceback."""
    torch.save({"rm_lightning_class_path": "lab_rm_types.LengthPenalizedIMRM", "state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(SettingError, match="lab_rm_types.LengthPenalizedIMRM cannot be imported .*PYTHONPATH"):
        load_reward_model(tmp_path / "x.ckpt")
