"""Hamiltonian-cycle data (paper §3.2): generator, verifier, data module, generation check, configs."""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_modules import PersonaDataModule
from data_modules.hamiltonian import (
    EDGE_SEP, EXTRA_TOKENS, SEP, HamiltonianCycleDataModule, cycle_edges, format_prompt, format_vertex_sequence,
    generate_instance, generate_instances, is_hamiltonian_cycle, parse_prompt, parse_vertex_sequence,
)
from rm_lightning import ImplicitRM, cli
from rm_lightning.callbacks import GenerationCheck
from rm_lightning.callbacks.generation_check import decode_response, encode_prefix, sample_responses
from rm_lightning.errors import DataError, RMLightningError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


# A 5-cycle 0-1-2-3-4-0 plus the chord 0-2.
SQUARE_PROMPT = format_prompt(5, [(0, 1), (1, 2), (2, 3), (3, 4), (0, 4), (0, 2)])


# --- generator ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_vertices, edge_prob", [(10, 0.2), (4, 0.5), (6, 0.0), (8, 0.9)])
def test_generator_invariants_over_many_seeds(num_vertices, edge_prob):
    for seed in range(200):
        instance = generate_instance(num_vertices, edge_prob, random.Random(seed))
        pair = instance.pair()
        assert sorted(instance.cycle) == list(range(num_vertices))
        assert sorted(instance.non_cycle) == list(range(num_vertices))
        assert set(cycle_edges(instance.cycle)) <= set(instance.edges)
        assert len(set(instance.edges)) == len(instance.edges), "no duplicate edges"
        assert all(u < v for u, v in instance.edges), "no self loops, smaller endpoint first"
        assert num_vertices <= len(instance.edges) < num_vertices * (num_vertices - 1) // 2
        if edge_prob == 0.0:
            assert len(instance.edges) == num_vertices
        assert is_hamiltonian_cycle(pair.prompt, pair.chosen)
        assert not is_hamiltonian_cycle(pair.prompt, pair.rejected)
        assert parse_prompt(pair.prompt) == (list(range(num_vertices)), instance.edges)
        assert parse_vertex_sequence(pair.chosen) == instance.cycle
        assert parse_vertex_sequence(pair.rejected) == instance.non_cycle


def test_generator_is_deterministic_per_seed_and_edges_are_shuffled():
    first = generate_instances(20, 10, 0.2, "517-train")
    assert first == generate_instances(20, 10, 0.2, "517-train")
    assert first != generate_instances(20, 10, 0.2, "518-train")
    assert any(instance.edges != sorted(instance.edges) for instance in first)


def test_paper_sized_graphs_have_the_expected_edge_count():
    instances = generate_instances(500, 10, 0.2, 0)
    mean_edges = sum(len(i.edges) for i in instances) / len(instances)
    assert abs(mean_edges - (10 + 0.2 * (45 - 10))) < 0.5


def test_prompt_format_matches_the_paper():
    assert format_prompt(3, [(0, 2), (1, 2)]) == (f"Vertices: {SEP}0{SEP}1{SEP}2\n"
                                                 f"Edges: {SEP}0{EDGE_SEP}2{SEP}1{EDGE_SEP}2")
    assert format_vertex_sequence([2, 0, 1]) == f"2{SEP}0{SEP}1"


@pytest.mark.parametrize("num_vertices, edge_prob", [(3, 0.2), (10, 1.0), (10, -0.1)])
def test_generator_rejects_settings_without_a_rejected_response(num_vertices, edge_prob):
    with pytest.raises(DataError, match="num_vertices|edge_prob"):
        generate_instance(num_vertices, edge_prob, random.Random(0))


# --- verifier ----------------------------------------------------------------------------------


@pytest.mark.parametrize("response, expected", [
    ("0<sep>1<sep>2<sep>3<sep>4", True),              # the cycle
    ("2<sep>3<sep>4<sep>0<sep>1", True),              # a rotation
    ("4<sep>3<sep>2<sep>1<sep>0", True),              # reversed
    (" 0<sep>1 <sep>2<sep>3<sep>4\n", True),          # whitespace around numbers is ignored
    ("0<sep>1<sep>2<sep>3", False),                   # missing vertex
    ("0<sep>1<sep>2<sep>3<sep>3", False),             # repeated vertex
    ("0<sep>1<sep>2<sep>3<sep>4<sep>0", False),       # first vertex repeated at the end
    ("0<sep>2<sep>1<sep>3<sep>4", False),             # 1-3 is not an edge
    ("0<sep>1<sep>2<sep>4<sep>3", False),             # 2-4 is not an edge
    ("1<sep>2<sep>3<sep>4<sep>0<sep>", False),        # trailing separator
    ("0<sep>2<sep>3<sep>4<sep>1", False),             # wrap-around 1-0 fine but 4-1 is not an edge
    ("0<sep>1<sep>2<sep>3<sep>5", False),             # unknown vertex
    ("0 1 2 3 4", False),                             # no separators
    ("0<sep>1<sep>two<sep>3<sep>4", False),           # garbage
    ("", False),
    ("<sep><edge_sep>\x00 ¹<sep>", False),
])
def test_verifier_on_hand_made_cases(response, expected):
    assert is_hamiltonian_cycle(SQUARE_PROMPT, response) is expected


def test_verifier_wrap_around_edge_is_required():
    path_only = format_prompt(5, [(0, 1), (1, 2), (2, 3), (3, 4), (0, 2)])  # no 4-0 edge
    assert not is_hamiltonian_cycle(path_only, "0<sep>1<sep>2<sep>3<sep>4")


@pytest.mark.parametrize("prompt", ["", "hello", "Vertices: <sep>0<sep>1", "Vertices: <sep>a\nEdges: <sep>0<edge_sep>1",
                                    "Vertices: <sep>0<sep>1\nEdges: <sep>0-1", None])
def test_verifier_returns_false_on_garbage_prompts(prompt):
    assert is_hamiltonian_cycle(prompt, "0<sep>1") is False


def test_parse_prompt_names_the_bad_part():
    with pytest.raises(DataError, match="prompt edges"):
        parse_prompt(f"Vertices: {SEP}0{SEP}1\nEdges: {SEP}0{EDGE_SEP}x")


# --- data module -------------------------------------------------------------------------------


def tiny_imrm(extra_tokens=EXTRA_TOKENS, **kwargs):
    return ImplicitRM(backbone="tiny-llama-chat", extra_tokens=list(extra_tokens), **kwargs)


def small_datamodule(**kwargs):
    settings = dict(num_vertices=6, num_train=12, num_test=6, data_seed=3, batch_size=4, eval_batch_size=6)
    return HamiltonianCycleDataModule(**{**settings, **kwargs})


def test_datamodule_end_to_end_with_a_tiny_model(tmp_path):
    module = tiny_imrm(reference_cache_dir=str(tmp_path))
    datamodule = small_datamodule(num_train_eval=5).attach(module)
    datamodule.setup("fit")
    assert [len(s) for s in datamodule.encoded_sets().values()] == [12, 5, 6]
    assert datamodule.eval_set_tags == {"train_graphs": "in_distribution", "test_graphs": "in_distribution"}
    prompts = datamodule.generation_prompts()
    assert len(prompts["train"]) == 12 and len(prompts["test"]) == 6
    assert set(prompts["train"]).isdisjoint(prompts["test"])
    sep_id = module.tokenizer.convert_tokens_to_ids(SEP)
    first = datamodule.train_set[0]
    assert first.chosen_ids[first.chosen_start:].count(sep_id) == 5  # one <sep> token between 6 vertices
    assert first.chosen_ids[:first.chosen_start] == encode_prefix(module, prompts["train"][0])
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8
    assert datamodule.verify(prompts["train"][0], datamodule.instances["train"][0].pair().chosen)


def test_datamodule_without_extra_tokens_fails_with_the_config_line():
    datamodule = small_datamodule().attach(ImplicitRM(backbone="tiny-llama-chat"))
    with pytest.raises(DataError, match=r'extra_tokens: \["<sep>", "<edge_sep>"\]'):
        datamodule.setup("fit")


def test_generation_check_needs_prompts_and_a_verifier_from_the_datamodule():
    trainer = SimpleNamespace(datamodule=PersonaDataModule())
    with pytest.raises(RMLightningError, match="generation_prompts"):
        GenerationCheck().on_fit_start(trainer, tiny_imrm())


def test_sampling_is_seeded_and_leaves_the_model_in_train_mode():
    module = tiny_imrm()
    prompts = small_datamodule().generation_prompts()["test"][:3]
    first = sample_responses(module, prompts, max_new_tokens=12, batch_size=2, seed=1)
    assert first == sample_responses(module, prompts, max_new_tokens=12, batch_size=2, seed=1)
    assert first != sample_responses(module, prompts, max_new_tokens=12, batch_size=2, seed=2)
    assert len(first) == 3 and module.model.training


def test_decoding_keeps_separators_and_stops_at_end_of_sequence():
    module = tiny_imrm()
    tokenizer = module.tokenizer
    ids = tokenizer(f"3{SEP}1{SEP}2", add_special_tokens=False)["input_ids"]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|end|>")
    generated = ids + [end_of_turn, tokenizer.eos_token_id] + tokenizer("junk", add_special_tokens=False)["input_ids"]
    drop = set(tokenizer.all_special_ids)
    assert decode_response(tokenizer, generated, {tokenizer.eos_token_id}, drop) == f"3{SEP}1{SEP}2"


# --- the CLI with the shipped configs ----------------------------------------------------------


def tiny_hamcycle_override(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_hamcycle.yaml"
    path.write_text(f"""
trainer:
  default_root_dir: {tmp_path}
  max_epochs: 1
  max_steps: 2
  logger: {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {tmp_path}}}}}
model:
  init_args:
    backbone: tiny-llama-chat
data:
  init_args:
    num_vertices: 6
    num_train: 8
    num_test: 4
    batch_size: 4
    eval_batch_size: 8
""")
    return path


@pytest.mark.parametrize("config", ["imrm_hamcycle.yaml", "exrm_hamcycle.yaml"])
def test_cli_fit_runs_each_hamcycle_config_on_a_tiny_model(config, tmp_path, monkeypatch):
    monkeypatch.setenv("RM_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.argv", ["cli.py"])
    cli.main(["fit", "--config", str(PROJECT_ROOT / "configs" / config), "--config", str(tiny_hamcycle_override(tmp_path))])
    run_dirs = list(tmp_path.glob("lightning_logs/version_*"))
    assert len(run_dirs) == 1
    metrics = (run_dirs[0] / "metrics.csv").read_text()
    assert "val/test_graphs/accuracy" in metrics
    report = run_dirs[0] / "generation_check.json"
    if config.startswith("imrm"):
        result = json.loads(report.read_text())["latest"]
        assert result["step"] == 2 and result["total"] == {"train": 8, "test": 4}
        assert 0.0 <= result["rates"]["test"] <= 1.0 and len(result["examples"]["train"]) == 5
        assert "gen/test_correct_rate" in metrics
    else:
        assert not report.exists()


def test_generation_check_after_every_validation_keeps_a_history(tmp_path, monkeypatch):
    monkeypatch.setenv("RM_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.argv", ["cli.py"])
    every_epoch = tmp_path / "every_validation.yaml"
    every_epoch.write_text("""
trainer:
  max_epochs: 2
  max_steps: -1
  callbacks:
    - class_path: rm_lightning.callbacks.GenerationCheck
      init_args: {max_prompts: 2, max_new_tokens: 8, every_validation: true}
""")
    cli.main(["fit", "--config", str(PROJECT_ROOT / "configs" / "imrm_hamcycle.yaml"),
                     "--config", str(tiny_hamcycle_override(tmp_path)), "--config", str(every_epoch)])
    report = json.loads(next(tmp_path.glob("lightning_logs/version_*/generation_check.json")).read_text())
    # step 0: the validation before training (MarginHistory.validate_at_start); none repeated at the end of fit
    assert [check["step"] for check in report["history"]] == [0, 2, 4]
    assert report["latest"]["total"] == {"train": 2, "test": 2}
