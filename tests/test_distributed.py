"""Multi-process training: FSDP2 (ModelParallelStrategy) and DDP on 2 CPU processes over gloo.

The multi-process runs go through ``cli.py`` as a user would, with ``configs/trainer/fsdp.yaml`` or
``ddp.yaml`` (Lightning launches the second process itself), and read per-step losses and eval
metrics from ``margin_history.csv``. For a 1-process run to be comparable, it must see the same
global batches in the same order. The sampler's shuffle depends on the number of batches, so
the 1-process reference uses the per-rank batch size (2 pairs) with 2 micro-batches per
optimizer step (``accumulate_grad_batches: 2``): its step k covers exactly the batches ranks 0
and 1 take at step k, and the mean of its micro-batch gradients equals FSDP's/DDP's average of
the ranks' gradients. The runs use fp32 so the comparison can be tight (1e-4).

The in-process tests shard on a 1-rank gloo group: the same FSDP2 hooks, cheaply, for every RM
type, tied embeddings, activation checkpointing and bf16 autocast.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import PROJECT_ROOT, tiny_override
from rm_lightning import ExplicitGenerativeRM, ExplicitRM, ImplicitRM, PreferencePair, cli
from rm_lightning.metrics.keys import EVAL_METRICS as EVAL_KEYS
from rm_lightning.pairs import LengthBucketSampler, is_repeated_batch
from rm_lightning.perf.sharding import is_sharded, shard_reward_module

TOLERANCE = 1e-4
STEPS_PER_EPOCH = 4  # 16 training pairs, 2 per rank and 2 ranks


# --- running cli.py ------------------------------------------------------------------------------


def write_experiment(folder: Path) -> Path:
    """IM-RM on 16 Persona pairs; eval sets of 16, 6, 64 and 24 pairs in batches of 8, so some
    ranks get repeated eval batches (1 and 3 batches for 2 ranks) that must not be counted."""
    path = folder / "experiment.yaml"
    path.write_text(f"""\
seed_everything: 0
trainer:
  precision: 32-true
  max_epochs: 2
  enable_progress_bar: false
  enable_model_summary: false
model:
  init_args:
    backbone: tiny-llama-chat
    reference_cache_dir: {folder / "reference_cache"}
    optimizer:
      class_path: torch.optim.Adam
      init_args:
        lr: 0.003
data:
  init_args:
    num_train: 16
    num_test: 6
    batch_size: 2
    eval_batch_size: 8
    eval_every_n_epochs: {{}}  # every set at every epoch, so each eval step can be compared
""")
    return path


def cli_arguments(run_dir: Path, configs: list[Path], *extra: str, experiment: str = "imrm_persona") -> list[str]:
    arguments = ["fit", "--config", str(PROJECT_ROOT / f"configs/{experiment}.yaml")]
    for config in configs:
        arguments += ["--config", str(config)]
    return arguments + ["--trainer.default_root_dir", str(run_dir), *extra]


def log_dir_of(run_dir: Path) -> Path:
    (log_dir,) = list(run_dir.glob("lightning_logs/version_*"))
    return log_dir


def run_in_process(run_dir: Path, configs: list[Path], *extra: str, experiment: str = "imrm_persona") -> Path:
    """``cli.py fit`` of a 1-process run, in this process; returns the run's log directory."""
    cli.main(cli_arguments(run_dir, configs, *extra, experiment=experiment))
    return log_dir_of(run_dir)


def run_cli(run_dir: Path, configs: list[Path], *extra: str, experiment: str = "imrm_persona") -> Path:
    """Run ``cli.py fit`` (which launches its own processes) and return the run's log directory."""
    command = [sys.executable, "cli.py", *cli_arguments(run_dir, configs, *extra, experiment=experiment)]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return log_dir_of(run_dir)


def read_history(log_dir: Path) -> tuple[list[dict], dict[int, dict[str, dict]]]:
    """(training rows in order, {step: {eval set: row}})."""
    with open(log_dir / "margin_history.csv") as handle:
        rows = list(csv.DictReader(handle))
    train = [r for r in rows if r["split"] == "train"]
    evals: dict[int, dict[str, dict]] = {}
    for row in rows:
        if row["split"] == "val":
            evals.setdefault(int(row["step"]), {})[row["set"]] = row
    return train, evals


def step_losses(train_rows: list[dict], micro_batches: int = 1) -> list[float]:
    """Loss per optimizer step: the mean over its micro-batches (equal sizes)."""
    losses = [float(r["loss"]) for r in train_rows]
    assert len(losses) % micro_batches == 0
    return [sum(losses[i:i + micro_batches]) / micro_batches for i in range(0, len(losses), micro_batches)]


def assert_evals_match(actual: dict[str, dict], expected: dict[str, dict]) -> None:
    assert actual.keys() == expected.keys() and len(expected) == 4
    for name, row in expected.items():
        for key in EVAL_KEYS:
            assert float(actual[name][key]) == pytest.approx(float(row[key]), abs=TOLERANCE), (name, key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The 1-process reference, FSDP for 1 epoch then resumed for a 2nd, and DDP for 2 epochs."""
    root = tmp_path_factory.mktemp("distributed_runs")
    experiment = write_experiment(root)
    fsdp, ddp = PROJECT_ROOT / "configs/trainer/fsdp.yaml", PROJECT_ROOT / "configs/trainer/ddp.yaml"
    logs = {"reference": run_in_process(root / "reference", [experiment], "--trainer.accumulate_grad_batches", "2")}
    logs["fsdp_first_epoch"] = run_cli(root / "fsdp_first", [fsdp, experiment], "--trainer.max_epochs", "1")
    (checkpoint,) = list((logs["fsdp_first_epoch"] / "checkpoints").glob("*.ckpt"))
    logs["fsdp_resumed"] = run_cli(root / "fsdp_resumed", [fsdp, experiment], "--ckpt_path", str(checkpoint))
    # with its progress bar, which computes the epoch's synced metrics on rank 0 alone (it hung once)
    logs["ddp"] = run_cli(root / "ddp", [ddp, experiment], "--trainer.enable_progress_bar", "true")
    logs["checkpoint"], logs["reference_cache"] = checkpoint, root / "reference_cache"
    return logs


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_process(runs):
    reference_train, reference_evals = read_history(runs["reference"])
    train, evals = read_history(runs["fsdp_first_epoch"])
    expected = step_losses(reference_train, micro_batches=2)[:STEPS_PER_EPOCH]
    assert step_losses(train) == pytest.approx(expected, abs=TOLERANCE)
    assert expected[-1] < expected[0] - 0.05  # the comparison is of a model that actually learns
    assert_evals_match(evals[STEPS_PER_EPOCH], reference_evals[STEPS_PER_EPOCH])


@pytest.mark.slow
def test_resume_from_sharded_checkpoint_continues_like_an_uninterrupted_run(runs):
    checkpoint = runs["checkpoint"]
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard per process
    assert (checkpoint / "meta.pt").is_file()
    reference_train, reference_evals = read_history(runs["reference"])
    train, evals = read_history(runs["fsdp_resumed"])
    # the first epoch's rows travel in the checkpoint, the second's are the resumed fit's own
    assert [int(r["step"]) for r in train] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    expected = step_losses(reference_train, micro_batches=2)
    assert step_losses(train) == pytest.approx(expected, abs=TOLERANCE)
    assert_evals_match(evals[2 * STEPS_PER_EPOCH], reference_evals[2 * STEPS_PER_EPOCH])


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process(runs):
    reference_train, reference_evals = read_history(runs["reference"])
    train, evals = read_history(runs["ddp"])
    assert step_losses(train) == pytest.approx(step_losses(reference_train, micro_batches=2), abs=TOLERANCE)
    for step in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH):
        assert_evals_match(evals[step], reference_evals[step])


@pytest.mark.slow
def test_an_exrm_with_an_untied_lm_head_trains_under_ddp_as_shipped(tmp_path):
    """ddp.yaml leaves find_unused_parameters off, under which DDP stops at the second step if a trainable
    parameter got no gradient at the first: tiny-llama's LM head, which no EX-RM reward reads, is frozen."""
    override = tiny_override(tmp_path, max_epochs=1, max_steps=2)
    log_dir = run_cli(tmp_path, [PROJECT_ROOT / "configs/trainer/ddp.yaml", override], "--data.init_args.num_train",
                      "16", "--data.init_args.num_test", "4", experiment="exrm_persona")
    assert json.loads((log_dir / "results.json").read_text())["global_step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_the_generation_check_samples_on_two_processes_what_one_process_samples(tmp_path, monkeypatch, strategy):
    """With the weights left as they were (lr 1e-30), two ranks sampling every other batch of 3 prompts (8 train
    prompts: 2 batches and 1, so under FSDP rank 1 samples one again to stay in step) give the one process's
    responses, token for token. The first epoch has no validation, so under FSDP its check finds the root
    unit sharded, as the backward left it, and has to gather it."""
    monkeypatch.setenv("RM_LIGHTNING_CACHE", str(tmp_path / "cache"))
    override = tmp_path / "tiny_hamcycle.yaml"
    override.write_text("""\
trainer:
  max_epochs: 2
  check_val_every_n_epoch: 2
  enable_progress_bar: false
  callbacks:
    - class_path: rm_lightning.callbacks.GenerationCheck
      init_args: {every_n_epochs: 1, max_new_tokens: 48, batch_size: 3, num_examples: 8}
model:
  init_args:
    backbone: tiny-llama-chat
    optimizer: {class_path: torch.optim.Adam, init_args: {lr: 1.0e-30}}
data: {init_args: {num_vertices: 6, num_train: 8, num_test: 4, batch_size: 2, eval_batch_size: 8}}
""")
    runs = {"one": run_in_process(tmp_path / "one", [override], experiment="imrm_hamcycle"),
            strategy: run_cli(tmp_path / strategy, [PROJECT_ROOT / f"configs/trainer/{strategy}.yaml", override],
                              experiment="imrm_hamcycle")}
    checks = {name: json.loads((log_dir / "generation_check.json").read_text())["history"]
              for name, log_dir in runs.items()}
    assert [check["total"] for check in checks[strategy]] == [{"train": 8, "test": 4}] * 2
    assert [check["examples"] for check in checks[strategy]] == [check["examples"] for check in checks["one"]]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp"])  # FSDP with a budget: tests/test_token_budget_fsdp.py
def test_token_budget_on_two_processes_matches_one_process(runs, strategy):
    """Batches split into micro-batches (eval batches too) give the unsplit one-process run's losses and metrics."""
    root = runs["reference_cache"].parent
    log_dir = run_cli(root / f"{strategy}_budget", [PROJECT_ROOT / f"configs/trainer/{strategy}.yaml",
                                                   root / "experiment.yaml"],
                      "--trainer.max_epochs", "1", "--model.init_args.token_budget", "350")  # pairs of 160-210 tokens
    reference_train, reference_evals = read_history(runs["reference"])
    train, evals = read_history(log_dir)
    expected = step_losses(reference_train, micro_batches=2)[:STEPS_PER_EPOCH]
    assert step_losses(train) == pytest.approx(expected, abs=TOLERANCE)
    assert_evals_match(evals[STEPS_PER_EPOCH], reference_evals[STEPS_PER_EPOCH])


@pytest.mark.slow
def test_ranks_share_one_reference_cache_file_per_dataset(runs):
    """Both ranks compute the reference log-probs and publish them with an atomic rename: one
    file per distinct dataset (train and original_train_prompts are the same pairs), no leftovers."""
    files = sorted(runs["reference_cache"].iterdir())
    assert [f.suffix for f in files] == [".pt"] * 4
    for file in files:
        values = torch.load(file, weights_only=True)["values"]
        assert values.dtype == torch.float64 and values.shape[1] == 2 and torch.isfinite(values).all()


# --- in-process checks ---------------------------------------------------------------------------


def test_repeated_eval_batches_are_recognized_on_every_rank():
    lengths = [5, 3, 8, 1, 9, 2, 7, 4, 6, 3, 5]  # 11 pairs in batches of 2: 6 batches, the last short
    single = LengthBucketSampler(lengths, batch_size=2, shuffle=False)
    for ranks in (2, 4, 5, 13):  # 13: more than twice as many ranks as batches, each still gets one
        counted = []
        for rank in range(ranks):
            sampler = LengthBucketSampler(lengths, batch_size=2, shuffle=False, num_replicas=ranks, rank=rank)
            batches = sampler.batches()
            assert len(batches) == -(-6 // ranks)
            counted += [b for step, b in enumerate(batches) if not is_repeated_batch(sampler, step)]
        assert sorted(counted) == sorted(single.batches())  # every real batch exactly once
    assert not is_repeated_batch(single, 5) and not is_repeated_batch(None, 9)


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A 1-process gloo group and the strategy's 2-D mesh (data_parallel x tensor_parallel)."""
    from torch.distributed.device_mesh import init_device_mesh

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    finally:
        dist.destroy_process_group()


def pair_batch(module) -> dict[str, torch.Tensor]:
    pairs = [PreferencePair("Is the sky blue?", "Yes, it is.", "No."),
             PreferencePair("Say hi", "hi there", "go away, I am busy")]
    encoder = module.pair_encoder()
    return module.collator()([encoder.encode(p) for p in pairs])


def loss_and_grads(module, batch) -> tuple[float, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    loss = module.pair_loss(batch)[0]
    loss.backward()
    grads = {}
    for name, param in module.named_parameters():
        if param.grad is not None:
            grad = param.grad
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return loss.item(), grads


def build(kind: str, **kwargs):
    torch.manual_seed(0)
    if kind == "exrm":
        return ExplicitRM(backbone="tiny-llama-chat", head_init="normal", **kwargs)  # a zero head blocks backbone grads
    if kind == "exgrm":
        return ExplicitGenerativeRM(backbone="tiny-llama-chat", **kwargs)
    return ImplicitRM(backbone="tiny-llama-chat", beta=0.5, cache_reference=False, **kwargs)


@pytest.mark.parametrize("kind", ["exrm", "exgrm", "imrm"])
def test_sharded_module_gives_the_same_loss_and_gradients(one_rank_mesh, kind):
    plain = build(kind)
    sharded = build(kind, activation_checkpointing=True)
    if kind == "imrm":  # tie input and output embeddings (as SmolLM2 does): one FSDP unit must hold both
        for module in (plain, sharded):
            module.model.lm_head.weight = module.model.get_input_embeddings().weight
    batch = pair_batch(plain)
    expected_loss, expected_grads = loss_and_grads(plain, batch)
    shard_reward_module(sharded, one_rank_mesh)
    assert is_sharded(sharded) and shard_reward_module(sharded, one_rank_mesh) is sharded  # idempotent
    for _ in range(2):  # a second step finds the root resharded after backward
        loss, grads = loss_and_grads(sharded, batch)
        assert loss == pytest.approx(expected_loss, abs=1e-6)
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        assert sharded.pair_loss(batch)[0].item() == pytest.approx(expected_loss, abs=1e-6)


def test_sharded_module_runs_under_bf16_autocast(one_rank_mesh):
    module = shard_reward_module(build("exrm"), one_rank_mesh)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.pair_loss(pair_batch(module))[0]
    loss.backward()
    assert torch.isfinite(loss) and module.head.weight.grad is not None


def test_configure_model_leaves_a_module_alone_without_a_device_mesh():
    module = build("exrm")
    module.configure_model()
    assert not is_sharded(module)


def test_a_sharded_module_records_its_own_rm_type_in_checkpoints(one_rank_mesh):
    """fully_shard makes the module an ``FSDPExplicitGenerativeRM`` of torch's FSDP package: the checkpoint (and
    results.json) must still name ExplicitGenerativeRM, which load_reward_model can import back."""
    from rm_lightning.models.scoring import CLASS_PATH_KEY

    module = shard_reward_module(build("exgrm"), one_rank_mesh)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint[CLASS_PATH_KEY] == "rm_lightning.models.generative.ExplicitGenerativeRM"
