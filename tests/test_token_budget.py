"""token_budget: a batch split into micro-batches of whole pairs gives the whole batch's loss, gradients and
update; ``auto`` picks the budget from memory and the measured cost per token."""

import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import edge_case_pairs, loss_and_grads, ragged_pairs
from test_distributed import one_rank_mesh  # noqa: F401  (a fixture)
from rm_lightning import ExplicitGenerativeRM, ExplicitRM, ImplicitRM
from rm_lightning.errors import RMLightningError
from rm_lightning.perf import token_budget as auto
from rm_lightning.pairs.records import EncodedPair
from rm_lightning.perf.micro_batches import (encoded_pair_tokens, packed_batch_tokens, pair_tokens, plan_micro_batches,
                                             select_pairs, spread_to_count)

MODULES = {"exrm": (ExplicitRM, {}), "imrm": (ImplicitRM, {"reference": "none", "beta": 1.0}),
           "exgrm": (ExplicitGenerativeRM, {})}


def pairs_of_all_lengths(vocab: int):
    return ragged_pairs(vocab, seed=4) + edge_case_pairs(vocab, seed=5)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm().clamp(min=1e-30))


def split_loss_and_grads(module, batch, budget):
    """The loss and gradients of the micro-batched step, as training runs it: every micro-batch but the last
    backward-ed by the module, the returned loss by the caller (Lightning)."""
    module.zero_grad()
    module.resolved_token_budget = budget
    loss, _, _ = module.micro_batched_pair_loss(batch, backward=lambda part: part.backward())
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("rm", ["exrm", "imrm", "exgrm"])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_split_batch_has_the_whole_batch_loss_and_gradients(rm, layout):
    cls, options = MODULES[rm]
    module = cls(backbone="tiny-llama", decoder_layout=layout, **options)
    batch = module.collator()(pairs_of_all_lengths(len(module.tokenizer)))
    longest = max(pair_tokens(batch, layout))
    whole_loss, whole_grads = loss_and_grads(module, batch, lambda decoder, b: module.hidden_states(b))
    for budget in (longest // 2, longest + 10, 3 * longest):  # the first is smaller than the longest pair
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the over-budget pair's warning: tested below
            loss, grads = split_loss_and_grads(module, batch, budget)
            assert len(module.micro_batch_plan(batch)) > 1
        assert abs(float(loss - whole_loss)) <= 1e-5 * abs(float(whole_loss)), budget
        assert grads.keys() == whole_grads.keys()
        for name, grad in whole_grads.items():
            assert relative_error(grads[name], grad) <= 1e-5, (budget, name)


def test_cached_reference_log_probs_follow_their_pairs_into_micro_batches():
    module = ImplicitRM(backbone="tiny-llama", beta=1.0)
    pairs = pairs_of_all_lengths(len(module.tokenizer))
    for index, pair in enumerate(pairs):  # any values: the reward subtracts them row by row
        pair.reference_logps = (-float(index), -2.0 * index)
    batch = module.collator()(pairs)
    whole_loss, whole_grads = loss_and_grads(module, batch, lambda decoder, b: module.hidden_states(b))
    loss, grads = split_loss_and_grads(module, batch, budget=40)
    assert abs(float(loss - whole_loss)) <= 1e-5 * abs(float(whole_loss))
    assert all(relative_error(grads[name], grad) <= 1e-5 for name, grad in whole_grads.items())


def test_rewards_come_back_in_the_batch_order():
    module = ExplicitRM(backbone="tiny-llama").eval()
    batch = module.collator()(pairs_of_all_lengths(len(module.tokenizer)))
    with torch.no_grad():
        _, chosen, rejected = module.run_pair_loss(batch)
        module.resolved_token_budget = 50
        _, split_chosen, split_rejected = module.micro_batched_pair_loss(batch)
    torch.testing.assert_close(split_chosen, chosen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split_rejected, rejected, rtol=1e-5, atol=1e-6)


# --- through Lightning: one optimizer step per batch, accumulation, bf16 ---------------------------------


def trained_weights(budget, accumulate: int = 1, precision: str = "32-true", steps: int = 1):
    torch.manual_seed(0)
    module = ExplicitRM(backbone="tiny-llama", token_budget=budget,
                        optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    module.eval_sets.names = ["heldout"]  # without a data module setup would name the set "eval", a ModuleDict method
    loader = DataLoader(pairs_of_all_lengths(len(module.tokenizer)), batch_size=6, collate_fn=module.collator())
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, accumulate_grad_batches=accumulate, precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)
    return {name: p.detach().clone() for name, p in module.named_parameters()}, trainer


@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_optimizer_step_per_batch_equals_the_unsplit_step(accumulate):
    whole, _ = trained_weights(None, accumulate)
    split, trainer = trained_weights(30, accumulate)
    assert trainer.global_step == 1
    for name, weight in whole.items():
        torch.testing.assert_close(split[name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_mixed_micro_batches_train():
    split, trainer = trained_weights(30, precision="bf16-mixed", steps=2)
    assert trainer.global_step == 2 and all(torch.isfinite(w).all() for w in split.values())


# --- the plan --------------------------------------------------------------------------------------------


def test_plan_keeps_every_micro_batch_within_the_budget_and_every_pair_once():
    tokens = [90, 10, 40, 35, 20, 5, 60]
    plan = plan_micro_batches(tokens, 100)
    assert sorted(i for members in plan for i in members) == list(range(len(tokens)))
    assert all(sum(tokens[i] for i in members) <= 100 for members in plan)
    assert len(plan) == 3  # 260 tokens need at least 3 micro-batches of 100
    assert plan_micro_batches(tokens, None) == [list(range(7))] == plan_micro_batches(tokens, 260)


def test_padded_micro_batches_cost_their_longest_pair_per_pair():
    plan = plan_micro_batches([40, 10, 10, 10], 60, padded=True)
    assert all(len(members) * max([40, 10, 10, 10][i] for i in members) <= 60 for members in plan)


def test_a_pair_over_the_budget_runs_alone_with_a_warning_naming_its_length():
    module = ExplicitRM(backbone="tiny-llama", token_budget=20).eval()
    batch = module.collator()(ragged_pairs(len(module.tokenizer)))
    tokens = pair_tokens(batch)
    with pytest.warns(UserWarning, match=f"a pair of {max(tokens)} tokens runs alone"):
        plan = module.micro_batch_plan(batch)
    assert [tokens.index(max(tokens))] in plan


def test_pairs_over_the_budget_are_warned_of_once_per_run_not_per_batch():
    module = ExplicitRM(backbone="tiny-llama", token_budget=20).eval()
    batch = module.collator()(ragged_pairs(len(module.tokenizer)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            module.micro_batch_plan(batch)
    assert len([w for w in caught if "runs alone" in str(w.message)]) == 1


def test_spread_to_count_splits_the_largest_then_pads_with_empty_micro_batches():
    assert spread_to_count([[0, 1, 2, 3], [4]], 3) == [[0, 1], [2, 3], [4]]
    assert spread_to_count([[0], [1]], 3) == [[0], [1], []]
    with pytest.raises(ValueError):
        spread_to_count([[0], [1]], 1)


def test_pair_tokens_count_a_shared_prefix_once():
    module = ExplicitRM(backbone="tiny-llama")
    pairs = edge_case_pairs(len(module.tokenizer))
    batch = module.collator()(pairs)
    assert pair_tokens(batch) == [encoded_pair_tokens(p) for p in pairs]
    assert pair_tokens(batch, "padded") == [2 * len(p) for p in pairs]
    assert pair_tokens(batch)[:4] == [5 + 4 + 6, 20 + 10 + 3, 1 + 30 + 2, 12 + 9 + 9]


@pytest.mark.parametrize("attention", ["grouped", "flex"])
def test_whole_batch_tokens_are_what_the_packed_layout_runs(attention):
    from rm_lightning.perf.packed_pairs import PackedPairs

    module = ExplicitRM(backbone="tiny-llama")
    batch = module.collator()(edge_case_pairs(len(module.tokenizer)) + ragged_pairs(len(module.tokenizer)))
    packed = PackedPairs.from_batch(batch, attention=attention)
    assert packed_batch_tokens(batch, across_pairs=attention != "flex") == packed.input_ids.numel()


def test_pairs_sharing_a_prompt_run_whole_when_their_prefix_tree_fits():
    """Persona's eval batches: one system prompt and question before every pair."""
    module = ExplicitRM(backbone="tiny-llama", token_budget=100).eval()
    prompt = list(range(3, 63))
    pairs = [EncodedPair(prompt + [100 + i, 7], 60, prompt + [200 + i, 8], 60) for i in range(4)]
    batch = module.collator()(pairs)
    assert sum(pair_tokens(batch)) == 4 * 64 > 100 >= packed_batch_tokens(batch) == 60 + 4 * 4
    assert module.micro_batch_plan(batch) == [[0, 1, 2, 3]]


def test_select_pairs_cuts_rows_to_the_longest_selected_one():
    module = ExplicitRM(backbone="tiny-llama")
    pairs = ragged_pairs(len(module.tokenizer))
    batch = module.collator()(pairs)
    sub = select_pairs(batch, [0, 2])
    assert sub["input_ids"].shape == (4, max(len(pairs[0]), len(pairs[2])))
    assert sub["last_index"].tolist() == [len(pairs[0].chosen_ids) - 1, len(pairs[2].chosen_ids) - 1,
                                          len(pairs[0].rejected_ids) - 1, len(pairs[2].rejected_ids) - 1]
    with pytest.raises(ValueError, match="keys"):
        select_pairs({**batch, "extra": batch["last_index"]}, [0])


@pytest.mark.parametrize("options, message", [
    ({"token_budget": 0}, "token_budget must be null, 'auto' or a positive"),
    ({"token_budget": 512, "optimizer_in_backward": True}, "optimizer_in_backward"),
    ({"token_budget": "auto", "memory_limit": "lots"}, "memory_limit must be"),
    # only auto reads it: with a fixed or no budget a memory_limit bounded nothing, silently
    ({"memory_limit": "16GB"}, "memory_limit is what token_budget: auto plans for"),
    ({"token_budget": 512, "memory_limit": "16GB"}, "memory_limit is what token_budget: auto plans for"),
])
def test_bad_budget_options_are_refused_in_one_line(options, message):
    with pytest.raises(RMLightningError, match=message) as refused:
        ExplicitRM(backbone="tiny-llama", **options)
    assert "\n" not in str(refused.value)


# --- token_budget: auto -----------------------------------------------------------------------------------

GIB = 2 ** 30


def test_memory_limit_sizes():
    assert auto.parse_memory_limit("16GB") == 16 * 10 ** 9
    assert auto.parse_memory_limit("12 GiB") == 12 * GIB
    assert auto.parse_memory_limit("1.5gib") == int(1.5 * GIB)
    assert auto.parse_memory_limit(4096) == 4096 and auto.parse_memory_limit(None) is None


def test_available_memory_is_read_from_meminfo():
    text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n"
    assert auto.meminfo_available_bytes(text) == 20000000 * 1024


def test_budget_is_the_room_after_state_and_margin_over_the_cost_per_token():
    choice = auto.choose_token_budget(free_bytes=21 * GIB, pending_bytes=1 * GIB, bytes_per_token=2 ** 20,
                                      checkpointed_bytes_per_token=2 ** 16, longest_pair=1000)
    room = 20 * GIB - int(auto.MARGIN_FRACTION * 20 * GIB)  # 10% is above the minimum margin
    assert choice.room_bytes == room and not choice.checkpointing
    assert choice.tokens == room // int(2 ** 20 * auto.BACKWARD_FACTOR)


def test_small_room_keeps_the_minimum_margin():
    choice = auto.choose_token_budget(free_bytes=3 * GIB, pending_bytes=0, bytes_per_token=2 ** 20,
                                      checkpointed_bytes_per_token=2 ** 16, longest_pair=None)
    assert choice.room_bytes == 3 * GIB - auto.MARGIN_MIN_BYTES


def test_checkpointing_only_when_the_longest_pair_would_not_fit_without_it():
    args = dict(free_bytes=3 * GIB, pending_bytes=0, bytes_per_token=2 ** 20, checkpointed_bytes_per_token=2 ** 16)
    fits = auto.choose_token_budget(**args, longest_pair=1000)
    assert not fits.checkpointing and fits.tokens >= 1000
    too_long = auto.choose_token_budget(**args, longest_pair=fits.tokens + 1)
    assert too_long.checkpointing
    assert too_long.tokens == too_long.room_bytes // int(2 ** 16 * auto.CHECKPOINTED_FACTOR) > fits.tokens
    assert auto.choose_token_budget(**args, longest_pair=10, checkpointing=True).checkpointing  # as configured


def test_budget_stops_where_larger_forwards_are_no_faster():
    args = dict(free_bytes=21 * GIB, pending_bytes=GIB, bytes_per_token=2 ** 20, checkpointed_bytes_per_token=2 ** 16)
    capped = auto.choose_token_budget(**args, longest_pair=1000, speed_tokens=2048)
    assert (capped.tokens, capped.capped) == (2048, True)


def test_speed_limit_never_cuts_below_the_longest_pair():
    args = dict(free_bytes=21 * GIB, pending_bytes=GIB, bytes_per_token=2 ** 20, checkpointed_bytes_per_token=2 ** 16)
    assert auto.choose_token_budget(**args, longest_pair=3000, speed_tokens=2048).tokens == 3000


def test_auto_on_a_cpu_keeps_to_the_cpu_speed_limit(monkeypatch):
    module = ExplicitRM(backbone="tiny-llama", token_budget="auto")
    monkeypatch.setattr(auto, "free_memory_bytes", lambda device, limit, processes=1: (64 * GIB, "test"))
    module._longest_pair_tokens = 100
    assert module.token_budget() == auto.CPU_SPEED_TOKENS


def test_no_room_is_refused_in_one_line():
    with pytest.raises(RMLightningError, match="no memory left for activations"):
        auto.choose_token_budget(free_bytes=GIB, pending_bytes=GIB, bytes_per_token=1.0,
                                 checkpointed_bytes_per_token=1.0, longest_pair=None)


def test_checkpointed_cost_is_every_layer_input_and_one_layer_recomputed():
    assert auto.checkpointed_cost(30_000.0, layers=30, hidden_size=576, value_bytes=4) == 30 * 576 * 4 + 2 * 1000


def test_measured_cost_per_token_counts_saved_activations_not_weights():
    module = ExplicitRM(backbone="tiny-llama")
    per_token = auto.measured_bytes_per_token(module)
    config = module.model.config
    # at least every layer's input, in fp32; far less than the weights
    assert config.num_hidden_layers * config.hidden_size * 4 <= per_token < sum(p.numel() for p in module.parameters())


@pytest.fixture
def costs_per_token(monkeypatch) -> list[float]:
    """The cost per token every ``token_budget: auto`` resolution divides by, in order."""
    costs = []
    choose = auto.choose_token_budget
    monkeypatch.setattr(auto, "choose_token_budget",
                        lambda free, pending, per_token, *args, **kwargs: costs.append(per_token)
                        or choose(free, pending, per_token, *args, **kwargs))
    return costs


def test_auto_measures_an_untrained_implicit_rm_inside_its_step_0_evaluation(costs_per_token):
    """There every reward is 0 without a forward; the probe must still measure a training forward."""
    from data_modules import PersonaDataModule

    module = ImplicitRM(backbone="tiny-llama-chat", token_budget="auto", memory_limit="64GiB")
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(module, datamodule=PersonaDataModule(num_train=4, num_test=4, eval_batch_size=8),
                         verbose=False)
    config = module.model.config
    assert len(costs_per_token) == 1 and costs_per_token[0] >= config.num_hidden_layers * config.hidden_size * 4


def test_a_16_bit_autocast_step_is_costed_at_the_autocast_factor(costs_per_token, monkeypatch):
    monkeypatch.setattr(auto, "measured_bytes_per_token", lambda module: 2.0 ** 20)
    for autocast in (False, True):
        module = ExplicitRM(backbone="tiny-llama", token_budget="auto", memory_limit="64GiB")
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            module.token_budget()
    assert costs_per_token == [2.0 ** 20, 2.0 ** 20 * auto.AUTOCAST_FACTOR]


def test_auto_resolves_once_and_switches_checkpointing_on_when_a_pair_would_not_fit(monkeypatch):
    module = ExplicitRM(backbone="tiny-llama", token_budget="auto", memory_limit="64GiB")
    monkeypatch.setattr(auto, "free_memory_bytes",
                        lambda device, limit, processes=1: (auto.MARGIN_MIN_BYTES + 2 ** 20, "test"))
    monkeypatch.setattr(auto, "pending_training_bytes", lambda module: 0)
    module._longest_pair_tokens = 10 ** 6
    budget = module.token_budget()
    assert module.checkpointing and module.model.is_gradient_checkpointing
    assert budget == module.token_budget() == module.resolved_token_budget


def test_probe_is_sized_on_the_longest_pair_within_bounds():
    assert auto.probe_response_tokens(1000) == ((500 - auto.PROBE_PROMPT_TOKENS) // 2, 500 - auto.PROBE_PROMPT_TOKENS)
    assert auto.probe_response_tokens(10 ** 6) == auto.probe_response_tokens(auto.PROBE_MAX_PAIR_TOKENS)
    assert auto.probe_response_tokens(None) == auto.probe_response_tokens(auto.PROBE_DEFAULT_PAIR_TOKENS)


def test_sharded_module_accumulates_micro_batches_like_the_unsharded_whole_batch(one_rank_mesh):
    """FSDP2 (one rank): several forwards and backwards per step reduce into the same gradients."""
    from rm_lightning.perf.sharding import shard_reward_module

    torch.manual_seed(0)
    plain = ExplicitRM(backbone="tiny-llama")
    torch.manual_seed(0)
    sharded = shard_reward_module(ExplicitRM(backbone="tiny-llama"), one_rank_mesh)
    batch = plain.collator()(pairs_of_all_lengths(len(plain.tokenizer)))
    whole_loss, whole_grads = loss_and_grads(plain, batch, lambda decoder, b: plain.hidden_states(b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, _ = split_loss_and_grads(sharded, batch, budget=60)
    assert abs(float(loss - whole_loss)) <= 1e-5 * abs(float(whole_loss))
    parameters = dict(sharded.model.named_parameters())
    for name, expected in whole_grads.items():
        grad = parameters[name].grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        assert relative_error(grad, expected) <= 1e-5, name


def test_pending_memory_is_gradients_adam_moments_and_the_fixed_transients():
    module = ImplicitRM(backbone="tiny-llama", reference="none", logprob_chunk_size=64)
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    logits_chunk = 64 * module.model.config.vocab_size * 4
    assert auto.pending_training_bytes(module) == auto.OPTIMIZER_COPIES * trainable + 3 * logits_chunk


def test_evaluation_in_micro_batches_gives_the_whole_batches_metrics(monkeypatch):
    from data_modules import PersonaDataModule
    from rm_lightning.models import reward_module

    # the whole batches as eval steps run them (an unbudgeted evaluation would otherwise score its rewards ahead)
    monkeypatch.setattr(reward_module, "why_not_ahead", lambda module, trainer: "compared batch by batch")
    metrics = {}
    for budget in (None, 300):  # persona pairs are 160-210 tokens here, eval batches of 8 several micro-batches
        torch.manual_seed(0)
        module = ExplicitRM(backbone="tiny-llama-chat", token_budget=budget)
        forwards = []
        run_pair_loss = module.run_pair_loss
        module.run_pair_loss = lambda batch: forwards.append(batch["input_ids"].shape[0] // 2) or run_pair_loss(batch)
        data = PersonaDataModule(num_train=4, num_test=4, batch_size=4, eval_batch_size=8)
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.validate(module, datamodule=data, verbose=False)
        assert max(forwards) == 8 if budget is None else max(forwards) < 8
        metrics[budget] = {name: {key: float(value) for key, value in values.items() if value.numel() == 1}
                           for name, values in module.eval_sets.last.items()}
    assert metrics[300].keys() == metrics[None].keys() and metrics[None]
    for name, values in metrics[None].items():
        for key, value in values.items():
            # rewards agree to float rounding (different packings); a normalized margin of near-equal rewards amplifies it
            assert metrics[300][name][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)


def test_free_pages_go_back_after_every_micro_batch_backward_but_the_last(monkeypatch):
    from rm_lightning.perf import micro_batches

    trims = []
    monkeypatch.setattr(micro_batches, "release_free_pages", lambda: trims.append(1))
    module = ExplicitRM(backbone="tiny-llama")
    batch = module.collator()(pairs_of_all_lengths(len(module.tokenizer)))
    budget = max(pair_tokens(batch)) + 10
    module.resolved_token_budget = budget
    plan = module.micro_batch_plan(batch)
    split_loss_and_grads(module, batch, budget)
    assert len(plan) > 1 and len(trims) == len(plan) - 1
