"""token_budget under FSDP2 (Lightning's ``ModelParallelStrategy``): micro-batches give the unsplit run's
losses, updates and metrics.

The in-process test runs the strategy on a 1-rank gloo group: cheap, and it already covers what once went
wrong (the root FSDP unit's gradients not zeroed between steps, see ``RewardModule._backward_micro_batch``).
The slow test runs ``cli.py`` with ``configs/trainer/fsdp.yaml`` on 2 CPU processes, as a user would, once
unsplit and once with a budget, and compares the per-step losses, the eval metrics and the final weights read
from the sharded checkpoints.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from conftest import PROJECT_ROOT
from test_distributed import STEPS_PER_EPOCH, read_history, run_cli, step_losses, write_experiment
from test_distributed import one_rank_mesh  # noqa: F401  (a fixture)
from test_token_budget import pairs_of_all_lengths, relative_error
from rm_lightning import ExplicitRM
from rm_lightning.metrics.keys import EVAL_METRICS
from rm_lightning.perf import token_budget as auto
from rm_lightning.perf.sharding import is_sharded, shard_reward_module

RELATIVE = 1e-5


def sharded_trained_weights(budget, steps: int = 2) -> dict[str, torch.Tensor]:
    """Full weights after ``steps`` SGD steps of a 1-rank FSDP2 run through Lightning (batches of 6 pairs)."""
    torch.manual_seed(0)
    module = ExplicitRM(backbone="tiny-llama", head_init="normal", token_budget=budget,
                        optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    module.eval_sets.names = ["heldout"]  # without a data module setup would name the set "eval", a ModuleDict method
    loader = DataLoader(pairs_of_all_lengths(len(module.tokenizer)) * steps, batch_size=6,
                        collate_fn=module.collator())
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision="32-true",
                        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the over-budget pair's warning, and the strategy's on one device
        trainer.fit(module, train_dataloaders=loader)
    assert is_sharded(module) and trainer.global_step == steps
    return {name: p.full_tensor().detach().clone() for name, p in module.named_parameters()}


def test_sharded_steps_in_micro_batches_update_like_the_unsplit_steps(one_rank_mesh):
    """Several steps, so that a step starts with the previous step's gradients to clear (the root unit's too)."""
    whole = sharded_trained_weights(None)
    split = sharded_trained_weights(60)
    assert split.keys() == whole.keys()
    for name, weight in whole.items():
        assert relative_error(split[name], weight) <= RELATIVE, name


def test_auto_measures_a_sharded_modules_activations_not_its_gathered_weights(one_rank_mesh):
    module = shard_reward_module(ExplicitRM(backbone="tiny-llama"), one_rank_mesh)
    per_token = auto.measured_bytes_per_token(module)
    config = module.model.config
    # as for an unsharded module (test_token_budget.py): at least every layer's input in fp32, far less than the weights
    assert config.num_hidden_layers * config.hidden_size * 4 <= per_token < sum(p.numel() for p in module.parameters())


def test_auto_gives_each_process_on_a_cpu_host_its_share_of_the_available_memory(monkeypatch):
    monkeypatch.setattr(auto, "meminfo_available_bytes", lambda: 8 * 2 ** 30)
    assert auto.free_memory_bytes(torch.device("cpu"), None)[0] == 8 * 2 ** 30
    free, source = auto.free_memory_bytes(torch.device("cpu"), None, host_processes=2)
    assert free == 4 * 2 ** 30 and "shared by 2 processes" in source


# --- two processes through cli.py ---------------------------------------------------------------------


def final_weights(log_dir) -> dict[str, torch.Tensor]:
    """The model weights of a run's sharded checkpoint (one directory, one file per process), whole."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    (checkpoint,) = list((log_dir / "checkpoints").glob("*.ckpt"))
    whole = log_dir / "whole_checkpoint.pt"
    dcp_to_torch_save(checkpoint, whole)
    return torch.load(whole, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> dict:
    """The IM-RM tiny-model run of ``test_distributed.py`` under FSDP on 2 processes for one epoch, unsplit and
    with a budget of 350 tokens (pairs of 160-210 tokens, 2 per process: some training batches split, on one
    process and not the other, and every eval batch of 8)."""
    root = tmp_path_factory.mktemp("fsdp_token_budget")
    experiment = write_experiment(root)
    configs = [PROJECT_ROOT / "configs/trainer/fsdp.yaml", experiment]
    return {budget: run_cli(root / f"budget_{budget}", configs, "--trainer.max_epochs", "1",
                            "--model.init_args.token_budget", budget)
            for budget in ("null", "350")}


@pytest.mark.slow
def test_fsdp_with_a_budget_gives_the_unsplit_losses_metrics_and_weights(fsdp_runs):
    whole_train, whole_evals = read_history(fsdp_runs["null"])
    train, evals = read_history(fsdp_runs["350"])
    expected = step_losses(whole_train)
    assert len(expected) == STEPS_PER_EPOCH and expected[-1] < expected[0] - 0.05  # a model that learns
    assert step_losses(train) == pytest.approx(expected, rel=RELATIVE)
    assert evals.keys() == whole_evals.keys()
    for step, sets in whole_evals.items():
        for name, row in sets.items():
            # at step 0 every reward is 0 up to rounding (with sharded weights the policy's log-probs are computed,
            # here in batches other than the reference pass's), so what ranks or normalizes them is rounding alone
            for key in (EVAL_METRICS if step else ("chosen_reward", "rejected_reward", "margin", "loss")):
                # as test_token_budget's eval comparison: a normalized margin of near-equal rewards amplifies rounding
                assert float(evals[step][name][key]) == pytest.approx(float(row[key]), rel=1e-4, abs=1e-6), \
                    (step, name, key)
    whole_weights, weights = final_weights(fsdp_runs["null"]), final_weights(fsdp_runs["350"])
    assert weights.keys() == whole_weights.keys() and whole_weights
    for name, weight in whole_weights.items():
        assert relative_error(weights[name], weight) <= RELATIVE, name
