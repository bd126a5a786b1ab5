"""Packed pairs: one decoder call over real tokens, shared prefixes once, same states and gradients as padded."""

import pytest
import torch

from conftest import edge_case_pairs, loss_and_grads, ragged_pairs, random_tokens
from rm_lightning import ExplicitRM, ImplicitRM
from rm_lightning.pairs import EncodedPair, PairCollator
from rm_lightning.perf.layouts import padded_hidden_states
from rm_lightning.perf.packed_pairs import (PackedPairs, packed_hidden_states, per_head_attention, plan_attention_groups,
                                           token_major_attention)


def test_layout_runs_a_shared_prefix_once_and_continues_its_positions():
    batch = PairCollator(0)([EncodedPair([5, 6, 7, 8], 2, [5, 6, 9], 2), EncodedPair([4, 3], 1, [7, 3, 2], 1)])
    packed = PackedPairs.from_batch(batch)
    # chosen rows, then the rejected rows without the prefix they share with theirs
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 4, 3, 9, 7, 3, 2]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]]
    assert packed.shared_tokens == 2
    pad = packed.num_tokens  # batch positions past a row's end read the zero row
    assert packed.gather_index.tolist() == [[0, 1, 2, 3], [4, 5, pad, pad], [0, 1, 6, pad], [7, 8, 9, pad]]


def test_packed_forward_matches_padded_at_real_positions():
    module = ExplicitRM(backbone="tiny-llama")
    module.model.eval()
    batch = module.collator()(edge_case_pairs(len(module.tokenizer)))
    with torch.no_grad():
        padded = padded_hidden_states(module.decoder, batch)
        packed = packed_hidden_states(module.decoder, batch)
        padded_again = padded_hidden_states(module.decoder, batch)  # the model still runs padded batches
    real = batch["attention_mask"].bool()
    assert packed.shape == padded.shape
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-4)
    assert torch.all(packed[~real] == 0)
    assert torch.equal(padded_again, padded)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_rewards_and_gradients_match_padded(checkpointing):
    module = ImplicitRM(backbone="tiny-llama", reference="none", beta=1.0, activation_checkpointing=checkpointing)
    batch = PairCollator(module.tokenizer.pad_token_id)(edge_case_pairs(len(module.tokenizer), seed=1))
    padded_loss, padded_grads = loss_and_grads(module, batch, padded_hidden_states)
    packed_loss, packed_grads = loss_and_grads(module, batch, packed_hidden_states)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-4)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_packed_bf16_autocast_stays_close_to_padded():
    module = ExplicitRM(backbone="tiny-llama")
    module.model.eval()
    batch = module.collator()(edge_case_pairs(len(module.tokenizer), seed=2))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        padded = padded_hidden_states(module.decoder, batch).float()
        packed = packed_hidden_states(module.decoder, batch).float()
    real = batch["attention_mask"].bool()
    assert (packed[real] - padded[real]).abs().max() < 0.1 * padded[real].abs().max()


def test_untrained_imrm_rewards_are_exactly_zero_with_packed_pairs():
    module = ImplicitRM(backbone="tiny-llama", cache_reference=False)
    assert module.hparams.decoder_layout == "packed"
    batch = module.collator()(edge_case_pairs(len(module.tokenizer), seed=3))
    with torch.no_grad():
        assert torch.equal(module.rewards(batch), torch.zeros(batch["input_ids"].shape[0]))


@pytest.mark.parametrize("option, value", [("decoder_layout", "ragged"), ("decoder_layout", "bucketed"),
                                           ("packed_attention", "fast")])
def test_unknown_layout_or_attention_is_refused(option, value):
    with pytest.raises(ValueError, match=option):
        ExplicitRM(backbone="tiny-llama", **{option: value})


def test_attention_groups_keep_similar_segments_together():
    sizes = [(60, 60), (10, 62), (58, 58), (9, 61), (190, 190), (188, 188)]
    groups = plan_attention_groups(sizes, call_cells=4096)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert sorted(map(sorted, groups)) == [[0, 2], [1, 3], [4, 5]]
    assert plan_attention_groups(sizes, call_cells=10 ** 9) == [sorted(range(6), key=lambda i: sizes[i])]


def test_with_a_key_multiple_a_group_holds_one_padded_key_length_however_cheap_joining_would_be():
    sizes = [(5, 10), (5, 17), (5, 30), (5, 31), (6, 32)]  # keys padded to 16, 32, 32, 32, 32
    groups = plan_attention_groups(sizes, call_cells=10 ** 9, key_multiple=16)
    assert sorted(map(sorted, groups)) == [[0], [1, 2, 3, 4]]


def flex_packed_hidden_states(decoder, batch):
    """Packed batches through FlexAttention (opt-in) instead of the grouped grids."""
    return packed_hidden_states(decoder, batch, attention="flex")


@pytest.mark.slow  # FlexAttention is compiled
def test_flex_attention_states_match_padded():
    module = ExplicitRM(backbone="tiny-llama", packed_attention="flex")
    module.model.eval()
    batch = module.collator()(edge_case_pairs(len(module.tokenizer)))
    assert PackedPairs.from_batch(batch, attention="flex").block_mask is not None
    assert PackedPairs.from_batch(batch).block_mask is None
    with torch.no_grad():
        padded = padded_hidden_states(module.decoder, batch)
        packed = module.hidden_states(batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on a CPU")
def test_flex_attention_gradients_match_padded_on_cuda():
    module = ImplicitRM(backbone="tiny-llama", reference="none", beta=1.0).to("cuda")
    batch = PairCollator(module.tokenizer.pad_token_id)(edge_case_pairs(len(module.tokenizer), seed=1))
    batch = {key: value.to("cuda") for key, value in batch.items()}
    padded_loss, padded_grads = loss_and_grads(module, batch, padded_hidden_states)
    packed_loss, packed_grads = loss_and_grads(module, batch, flex_packed_hidden_states)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-4)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_packed_attention_is_a_recorded_option_grouped_by_default():
    assert ExplicitRM(backbone="tiny-llama").hparams.packed_attention == "grouped"
    assert ExplicitRM(backbone="tiny-llama", packed_attention="flex").hparams.packed_attention == "flex"


def test_attention_plan_is_as_cheap_as_an_exhaustive_search():
    generator = torch.Generator().manual_seed(0)
    sizes = [(int(q), int(q) + int(extra)) for q, extra in zip(torch.randint(1, 80, (9,), generator=generator),
                                                               torch.randint(0, 40, (9,), generator=generator))]
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])

    def cost(groups):
        return sum(len(g) * max(sizes[i][0] for i in g) * max(sizes[i][1] for i in g) + 4096 for g in groups)

    def every_split(items):  # every way to cut the sorted order into contiguous runs
        if not items:
            yield []
            return
        for cut in range(1, len(items) + 1):
            for rest in every_split(items[cut:]):
                yield [items[:cut], *rest]

    best = min(cost(groups) for groups in every_split(order))
    assert cost(plan_attention_groups(sizes, call_cells=4096)) == best


def prompt_tree_pairs(vocab: int) -> list[EncodedPair]:
    """Pairs as an eval set holds them: one system prefix for all, two pairs on each prompt, a repeated chosen row."""
    tokens = random_tokens(vocab, torch.Generator().manual_seed(4))
    system, answers = tokens(6), [tokens(3), tokens(2), tokens(4)]
    pairs = []
    for question in (tokens(5), tokens(7)):
        prompt = system + question
        pairs += [EncodedPair(prompt + answers[0], len(prompt), prompt + answers[1], len(prompt)),
                  EncodedPair(prompt + answers[0], len(prompt), prompt + answers[2], len(prompt))]
    return pairs


def test_rows_of_a_batch_share_every_common_prefix_once():
    pairs = prompt_tree_pairs(vocab=100)
    packed = PackedPairs.from_batch(PairCollator(0)(pairs))
    # the prefix tree: the system prefix once, each question once, each prompt's distinct answers once
    assert packed.num_tokens == 6 + (5 + 7) + 2 * (3 + 2 + 4)


def test_rows_of_a_batch_share_only_within_a_pair_for_flex_attention():
    pairs = prompt_tree_pairs(vocab=100)
    packed = PackedPairs.from_batch(PairCollator(0)(pairs), attention="flex")
    assert packed.num_tokens == sum(len(p.chosen_ids) + len(p.rejected_ids) - p.chosen_start for p in pairs)


def test_prefix_tree_states_and_gradients_match_padded():
    module = ImplicitRM(backbone="tiny-llama", reference="none", beta=1.0)
    batch = PairCollator(module.tokenizer.pad_token_id)(prompt_tree_pairs(len(module.tokenizer)))
    padded_loss, padded_grads = loss_and_grads(module, batch, padded_hidden_states)
    packed_loss, packed_grads = loss_and_grads(module, batch, packed_hidden_states)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-4)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("window", [None, 3])
def test_cpu_and_gpu_attention_paths_agree_in_values_and_gradients(window):
    """The GPU's per-head grids (run here on CPU tensors) against the CPU's token-major gathers, with grouped-query
    heads (4 query heads on 2 key/value heads) and a sliding window, on the projections' token-major layout."""
    packed = PackedPairs.from_batch(PairCollator(0)(prompt_tree_pairs(vocab=100)), sliding_windows=(3,))
    generator = torch.Generator().manual_seed(0)

    def states(heads):  # [1, heads, N, 16] over token-major memory, as a projection's view lays it out
        return torch.randn(1, packed.num_tokens, heads, 16, generator=generator).transpose(1, 2).requires_grad_()

    query, key, value = states(4), states(2), states(2)
    outputs = {}
    for name, run in (("per head", lambda: per_head_attention(query, key, value, packed, 2, 0.25, 0.0, window)),
                      ("token major", lambda: token_major_attention(query, key, value, packed, 2, 0.25, 0.0, window))):
        out = run()
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        outputs[name] = [out.detach()] + [t.grad.clone() for t in (query, key, value)]
        for t in (query, key, value):
            t.grad = None
    for expected, got in zip(outputs["per head"], outputs["token major"]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_pairs_cpu_attention_is_the_same_to_the_bit_whatever_shares_its_batch():
    """On a CPU every segment's keys are padded to a length of its own (``CPU_KEY_MULTIPLE``), since the SDPA
    kernel there rounds a row by its padded length: a pair's attention alone and beside others is the same to the
    bit. The states are a function of a token and its position, as a layer's are; 4 query heads on 2 key/value
    heads."""
    generator = torch.Generator().manual_seed(0)
    tables = [(torch.randn(100, heads, 16, generator=generator), torch.randn(64, heads, 16, generator=generator))
              for heads in (4, 2, 2)]

    def attention_rows(pairs):
        batch = PairCollator(0)(pairs)
        packed = PackedPairs.from_batch(batch)
        ids, positions = packed.input_ids[0], packed.position_ids[0]
        # [1, heads, N, 16] over token-major memory, as a projection's view lays it out
        query, key, value = ((by_token[ids] + by_position[positions]).transpose(0, 1)[None]
                             for by_token, by_position in tables)
        out = token_major_attention(query, key, value, packed, 2, 0.25, 0.0)
        real = batch["attention_mask"].bool()
        return [row[mask] for row, mask in zip(packed.unpack(out.flatten(2)), real)]

    pairs = ragged_pairs(vocab=100)
    together = attention_rows(pairs)
    for index, pair in enumerate(pairs):
        chosen, rejected = attention_rows([pair])
        assert torch.equal(together[index], chosen) and torch.equal(together[len(pairs) + index], rejected), index
