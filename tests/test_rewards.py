"""Each RM type's rewards equal a direct recomputation from the model's own outputs."""

import copy

import pytest
import torch

from rm_lightning import ExplicitGenerativeRM, ExplicitRM, ImplicitRM, PreferencePair
from rm_lightning.pairs import EncodedPairs

PAIRS = [
    PreferencePair("Is the sky blue?", "Yes, on a clear day.", "No"),
    PreferencePair("Name a prime number larger than ten, please.", "Eleven", "Twelve is a prime number for sure."),
    PreferencePair("Hi", "Hello! How can I help you today?", "Go away."),
]


def encoded(module, pairs=PAIRS):
    return module.pair_encoder().encode_all(pairs)[0]


def batch_of(module, pairs):
    return module.collator()(encoded(module, pairs))


def perturb(module, seed=0):
    """Move the policy away from its initial weights, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def full_sequence(module, pair: PreferencePair, response: str):
    prefix, suffix = module.format_texts(pair.prompt, response)
    ids, start = module.pair_encoder()._tokenize(pair.prompt, response)
    return torch.tensor([ids]), start


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-llama-chat"])
def test_explicit_rm_is_head_on_last_hidden_state(backbone):
    module = ExplicitRM(backbone=backbone, head_init="normal").eval()
    rewards = module.rewards(batch_of(module, PAIRS))
    for index, pair in enumerate(PAIRS):
        for side, response in ((0, pair.chosen), (1, pair.rejected)):
            ids, _ = full_sequence(module, pair, response)
            hidden = module.model(ids, output_hidden_states=True).hidden_states[-1][0, -1]
            expected = (hidden @ module.head.weight[0]).item()
            assert rewards[side * len(PAIRS) + index].item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_explicit_rm_mean_response_pooling():
    module = ExplicitRM(backbone="tiny-llama-chat", pooling="mean_response", head_init="normal").eval()
    rewards = module.rewards(batch_of(module, PAIRS[:1]))
    ids, start = full_sequence(module, PAIRS[0], PAIRS[0].chosen)
    hidden = module.model(ids, output_hidden_states=True).hidden_states[-1][0, start:].mean(0)
    assert rewards[0].item() == pytest.approx((hidden @ module.head.weight[0]).item(), rel=1e-4, abs=1e-5)


def direct_logp(model, ids, start):
    logps = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    return logps[torch.arange(len(targets)), targets][start - 1:].sum().item()


@pytest.mark.parametrize("cache_reference", [False, True])
def test_implicit_rm_is_beta_times_log_ratio(cache_reference, tmp_path):
    module = ImplicitRM(backbone="tiny-llama-chat", beta=0.1, cache_reference=cache_reference,
                        reference_cache_dir=str(tmp_path)).eval()
    reference = copy.deepcopy(module.model)
    pairs = encoded(module)
    if cache_reference:
        module.attach_reference_logps(EncodedPairs("probe", pairs))
    perturb(module)
    rewards = module.rewards(module.collator()(pairs))
    for index, pair in enumerate(PAIRS):
        for side, response in ((0, pair.chosen), (1, pair.rejected)):
            ids, start = full_sequence(module, pair, response)
            expected = 0.1 * (direct_logp(module.model, ids, start) - direct_logp(reference, ids, start))
            assert rewards[side * len(PAIRS) + index].item() == pytest.approx(expected, rel=1e-3, abs=2e-5)  # fp32 sums


def test_implicit_rm_without_reference_is_beta_log_pi():
    module = ImplicitRM(backbone="tiny-llama", reference="none").eval()
    rewards = module.rewards(batch_of(module, PAIRS[:1]))
    ids, start = full_sequence(module, PAIRS[0], PAIRS[0].chosen)
    assert rewards[0].item() == pytest.approx(0.01 * direct_logp(module.model, ids, start), rel=1e-4)


def test_implicit_rm_rewards_are_exactly_zero_before_training(tmp_path):
    live = ImplicitRM(backbone="tiny-llama-chat", cache_reference=False)
    assert torch.equal(live.rewards(batch_of(live, PAIRS)), torch.zeros(2 * len(PAIRS)))
    cached = ImplicitRM(backbone="tiny-llama-chat", reference_cache_dir=str(tmp_path))
    dataset = EncodedPairs("probe", encoded(cached))
    cached.attach_reference_logps(dataset)
    assert torch.equal(cached.rewards(cached.collator()(dataset.pairs)), torch.zeros(2 * len(PAIRS)))


def test_implicit_rm_is_exactly_zero_while_the_policy_is_its_reference_whatever_the_cached_rounding(tmp_path):
    """Cached reference log-probs come from other batches (other shapes, other float rounding): an unmoved policy
    still scores exactly 0, and a moved one is scored against the cache."""
    module = ImplicitRM(backbone="tiny-llama-chat", reference_cache_dir=str(tmp_path)).eval()
    dataset = EncodedPairs("probe", encoded(module))
    module.attach_reference_logps(dataset)
    for pair in dataset.pairs:  # what a reference pass over differently shaped batches may round to
        pair.reference_logps = (pair.reference_logps[0] + 1e-4, pair.reference_logps[1] - 1e-4)
    batch = module.collator()(dataset.pairs)
    assert torch.equal(module.rewards(batch), torch.zeros(2 * len(PAIRS)))
    with torch.no_grad():
        module.model.get_input_embeddings().weight[0, 0] += 1.0  # the policy moves (token 0 is in no text)
    assert not module.policy_is_reference()
    assert torch.count_nonzero(module.rewards(batch)) == 2 * len(PAIRS)


def test_generative_rm_is_probability_of_yes():
    module = ExplicitGenerativeRM(backbone="tiny-llama-chat").eval()
    rewards = module.rewards(batch_of(module, PAIRS))
    yes_id = module.tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
    for index, pair in enumerate(PAIRS):
        ids, start = full_sequence(module, pair, pair.chosen)
        assert start == ids.shape[1]  # the response lives inside the verification question
        expected = torch.softmax(module.model(ids).logits[0, -1], dim=-1)[yes_id].item()
        assert rewards[index].item() == pytest.approx(expected, rel=1e-4)
    prefix, _ = module.format_texts("What is 2+2?", "4")
    assert "Question: What is 2+2?\nAnswer: 4\nVerification: Is the answer correct (Yes/No)?" in prefix


def test_generative_rm_cross_entropy_option():
    module = ExplicitGenerativeRM(backbone="tiny-llama-chat", loss="yes_no_ce").eval()
    batch = batch_of(module, PAIRS)
    loss, chosen, _ = module.pair_loss(batch)
    logps = module.answer_logprobs(module.hidden_states(batch), batch)
    expected = -(logps[:3, 0].mean() + logps[3:, 1].mean()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(chosen, logps[:3, 0].exp())


@pytest.mark.parametrize("module_class", [ExplicitRM, ImplicitRM, ExplicitGenerativeRM])
def test_rewards_ignore_batch_composition(module_class, tmp_path):
    kwargs = {ImplicitRM: {"reference_cache_dir": str(tmp_path)}, ExplicitRM: {"head_init": "normal"}}.get(module_class, {})
    module = module_class(backbone="tiny-llama-chat", **kwargs).eval()
    perturb(module, seed=1)
    together = module.rewards(batch_of(module, PAIRS))
    for index in range(len(PAIRS)):
        alone = module.rewards(batch_of(module, [PAIRS[index]]))
        assert torch.allclose(alone, together[[index, index + len(PAIRS)]], rtol=1e-4, atol=1e-6)


def test_explicit_rm_never_computes_vocabulary_logits(monkeypatch):
    module = ExplicitRM(backbone="tiny-llama-chat")
    head = module.model.get_output_embeddings()
    monkeypatch.setattr(head, "forward", lambda *_: pytest.fail("LM head was called"))
    module.rewards(batch_of(module, PAIRS))


def test_explicit_rm_head_init_options():
    """normal (default) is drawn with the backbone's initializer range; zeros gives all-zero rewards."""
    torch.manual_seed(0)
    normal = ExplicitRM(backbone="tiny-llama-chat")
    std = normal.model.config.initializer_range
    assert abs(normal.head.weight.std().item() - std) < 0.5 * std
    zero = ExplicitRM(backbone="tiny-llama-chat", head_init="zeros")
    assert torch.count_nonzero(zero.head.weight) == 0
    assert torch.equal(zero.rewards(batch_of(zero, PAIRS)), torch.zeros(2 * len(PAIRS)))


@pytest.mark.parametrize("checkpointing", [True, False])
def test_autocast_weight_cache_is_off_only_under_activation_checkpointing(checkpointing, monkeypatch):
    """The cache only changes memory: loss and gradients are bit-identical with it and without."""
    module = ExplicitGenerativeRM(backbone="tiny-llama-chat", activation_checkpointing=checkpointing)
    batch = batch_of(module, PAIRS)
    seen = []
    pair_loss = module.pair_loss

    def recording_pair_loss(batch):
        seen.append(torch.is_autocast_cache_enabled())
        return pair_loss(batch)

    monkeypatch.setattr(module, "pair_loss", recording_pair_loss)
    results = []
    for run in (module.run_pair_loss, module.pair_loss):
        module.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run(batch)[0]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None]))
    assert seen == [not checkpointing, True] and torch.is_autocast_cache_enabled()
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and len(grads_a) == len(grads_b) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def chunked_logps_and_grads(chunk_size: int, calls: list):
    """Response log-probs of a fixed random batch through a small LM head, and the gradients of their sum."""
    from rm_lightning.models.logprobs import response_token_logps

    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 8, generator=generator))
    head.register_forward_hook(lambda *_: calls.append(1))
    hidden = torch.randn(2, 12, 8, generator=generator, requires_grad=True)
    input_ids = torch.randint(0, 50, (2, 12), generator=generator)
    response_mask = torch.zeros(2, 12, dtype=torch.bool)
    response_mask[:, 5:] = True
    logps, _ = response_token_logps(head, hidden, input_ids, response_mask, chunk_size=chunk_size)
    logps.sum().backward()
    return logps.detach(), hidden.grad, head.weight.grad


def test_log_probs_and_gradients_do_not_depend_on_how_the_lm_head_is_chunked():
    whole = chunked_logps_and_grads(1000, [])
    for got, want in zip(chunked_logps_and_grads(3, []), whole):
        torch.testing.assert_close(got, want)


def test_the_last_lm_head_chunk_is_kept_from_forward_not_recomputed():
    one_chunk, three_chunks = [], []
    chunked_logps_and_grads(1000, one_chunk)  # 14 response tokens: one chunk, run once
    chunked_logps_and_grads(5, three_chunks)  # chunks of 5, 5, 4: the first two run again in backward
    assert (len(one_chunk), len(three_chunks)) == (1, 5)


def test_states_that_rows_share_go_through_the_lm_head_once_and_score_every_row():
    """Rows with the same tokens up to a position hold the same state there (the paraphrased Persona sets repeat
    each response in two pairs): the LM head scores it once, and every row still gets its log-probs."""
    from rm_lightning.models.logprobs import response_token_logps, sum_per_row

    generator = torch.Generator().manual_seed(0)
    embedding, head = torch.nn.Embedding(20, 8), torch.nn.Linear(8, 20, bias=False)
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 2, 3, 4, 5, 0],  # one pair's chosen row, and another's
                              [1, 2, 3, 4, 6, 7], [1, 2, 9, 9, 9, 0]])  # their rejected rows
    attention_mask = (torch.arange(6) < torch.tensor([5, 5, 6, 5])[:, None]).long()
    response_mask = (torch.arange(6) >= 3) & attention_mask.bool()
    hidden = embedding(input_ids).cumsum(dim=1)  # a state that depends on its prefix alone, like a decoder's
    head_rows = []
    head.register_forward_hook(lambda module, args, output: head_rows.append(args[0].shape[0]))
    logps, rows = response_token_logps(head, hidden, input_ids, response_mask, attention_mask=attention_mask)
    direct = torch.log_softmax(head(hidden[:, :-1]).float(), dim=-1).gather(2, input_ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(sum_per_row(logps, rows, 4), (direct * response_mask[:, 1:]).sum(dim=1))
    # scored: positions 2-3 of rows 0, 1 and 2 (one prefix), 4 of row 2, 2-3 of row 3
    assert head_rows[0] == 5


@pytest.mark.parametrize("rows", [0, 1, 64, 150])
def test_log_partition_in_blocks_of_rows_equals_one_logsumexp_and_its_gradient(rows):
    from rm_lightning.models.logprobs import log_partition

    logits = torch.randn(rows, 1000, generator=torch.Generator().manual_seed(0)) * 5
    blocked, whole = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    weights = torch.arange(rows, dtype=torch.float32)
    (log_partition(blocked) * weights).sum().backward()
    (torch.logsumexp(whole, dim=-1) * weights).sum().backward()
    assert torch.equal(log_partition(blocked.detach()), torch.logsumexp(whole.detach(), dim=-1))
    assert torch.equal(blocked.grad, whole.grad)
