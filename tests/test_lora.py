"""LoRA through peft for every RM type: only the adapters (and an EX-RM's head) train, an IM-RM's reference is
the base model with its adapters off (no copy held), and LoRA runs train, checkpoint and resume from the CLI."""

import warnings

import pytest
import torch

from conftest import PROJECT_ROOT, edge_case_pairs, tiny_override
from rm_lightning import ExplicitGenerativeRM, ExplicitRM, ImplicitRM, cli
from rm_lightning.errors import SettingError
from rm_lightning.models.backbones import load_backbone
from rm_lightning.models.lora import adapters_disabled, base_state_dict
from rm_lightning.pairs.records import EncodedPairs
from rm_lightning.settings import check_config

TYPES = {"exrm": ExplicitRM, "imrm": ImplicitRM, "exgrm": ExplicitGenerativeRM}
CONFIGS = {"exrm": "configs/exrm_persona.yaml", "imrm": "configs/imrm_persona.yaml",
           "exgrm": "configs/exgrm_persona.yaml"}
LORA = {"r": 4, "alpha": 8}


def trainable(module) -> set[str]:
    return {name for name, param in module.named_parameters() if param.requires_grad}


def perturb_adapters(module, seed: int = 0) -> None:
    """Move every adapter off its zero start, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("rm", TYPES)
def test_only_the_adapters_and_an_exrm_head_train(rm):
    module = TYPES[rm](backbone="tiny-llama", lora=LORA)
    names = trainable(module)
    head = {"head.weight"} if rm == "exrm" else set()
    adapters = names - head
    assert head <= names
    assert adapters and all(".lora_A." in name or ".lora_B." in name for name in adapters)
    # every linear layer of every decoder layer is adapted (all-linear), the output layer is not
    per_layer = {name.split(".layers.0.")[1].split(".lora_")[0] for name in adapters if ".layers.0." in name}
    assert per_layer == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert not module.model.get_output_embeddings().weight.requires_grad
    optimized = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert optimized == {id(p) for name, p in module.named_parameters() if name in names}


def test_the_module_tree_the_packed_layout_runs_is_unchanged():
    plain, adapted = ImplicitRM(backbone="tiny-llama"), ImplicitRM(backbone="tiny-llama", lora=LORA)
    assert type(adapted.decoder) is type(plain.decoder)
    assert base_state_dict(adapted.model).keys() == plain.model.state_dict().keys()


def test_imrm_rewards_are_exactly_zero_before_training_with_no_reference_copy():
    module = ImplicitRM(backbone="tiny-llama", lora={**LORA, "dropout": 0.1}, cache_reference=False, beta=1.0)
    batch = module.collator()(edge_case_pairs(len(module.tokenizer)))
    assert torch.equal(module.rewards(batch), torch.zeros(batch["input_ids"].shape[0]))
    assert module._reference_holder == [] and module.reference_model() is module.model


def test_imrm_reference_is_the_base_model_with_the_adapters_disabled():
    module = ImplicitRM(backbone="tiny-llama", lora=LORA, cache_reference=False, beta=1.0)
    base = ImplicitRM(backbone="tiny-llama", reference="none", beta=1.0)  # rewards = the base model's log-probs
    perturb_adapters(module)
    batch = module.collator()(edge_case_pairs(len(module.tokenizer)))
    with torch.no_grad():
        assert torch.equal(module.reference_logps(batch), base.rewards(batch))
        assert module.rewards(batch).abs().min() > 0  # the adapters are on again for the policy
    assert trainable(module) == {name for name in trainable(module) if ".lora_" in name} != set()


def test_cached_reference_is_the_base_models_and_shares_its_cache_key(tmp_path):
    module = ImplicitRM(backbone="tiny-llama", lora=LORA, beta=1.0, reference_cache_dir=str(tmp_path))
    plain = ImplicitRM(backbone="tiny-llama", beta=1.0, reference_cache_dir=str(tmp_path / "plain"))
    assert module._initial_fingerprint == plain._initial_fingerprint
    perturb_adapters(module)  # as if training had run: the reference pass must still see the base model
    pairs, plain_pairs = edge_case_pairs(len(module.tokenizer)), edge_case_pairs(len(module.tokenizer))
    module.attach_reference_logps(EncodedPairs("probe", pairs))
    plain.attach_reference_logps(EncodedPairs("probe", plain_pairs))
    assert [p.reference_logps for p in pairs] == [p.reference_logps for p in plain_pairs]


def test_adapters_disabled_restores_the_adapters_and_their_flags():
    module = ExplicitRM(backbone="tiny-llama", lora=LORA)
    perturb_adapters(module)
    batch = module.collator()(edge_case_pairs(len(module.tokenizer)))
    before, names = module.rewards(batch).detach(), trainable(module)
    with torch.no_grad(), adapters_disabled(module.model):
        off = module.rewards(batch)
    assert not torch.allclose(off, before)
    assert torch.equal(module.rewards(batch).detach(), before) and trainable(module) == names


def test_packed_and_padded_layouts_agree_under_lora():
    packed = ImplicitRM(backbone="tiny-llama", lora=LORA, reference="none", beta=1.0)
    padded = ImplicitRM(backbone="tiny-llama", lora=LORA, reference="none", beta=1.0, decoder_layout="padded")
    perturb_adapters(packed)
    padded.load_state_dict(packed.state_dict())
    batch = packed.collator()(edge_case_pairs(len(packed.tokenizer)))
    with torch.no_grad():
        torch.testing.assert_close(packed.rewards(batch), padded.rewards(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build, message", [
    (lambda: ImplicitRM(backbone="tiny-llama", lora=LORA, trainable="output_layer"),
     "model.lora: LoRA adapts the decoder, trainable: output_layer freezes it"),
    (lambda: ExplicitRM(backbone="tiny-llama", lora={"rank": 4}), "model.lora: unknown key"),
    (lambda: ExplicitRM(backbone="tiny-llama", lora={"r": 0}), "model.lora.r: expected a whole number >= 1"),
    (lambda: ExplicitRM(backbone="tiny-llama", lora={"dropout": 1.0}), r"model.lora.dropout: expected a number in \[0, 1\)"),
])
def test_lora_options_that_make_no_sense_are_refused_in_one_line(build, message):
    with pytest.raises(SettingError, match=message):
        build()


def test_config_check_refuses_a_bad_lora_block():
    with pytest.raises(SettingError, match="model.init_args.lora.alpha"):
        check_config({"model": {"init_args": {"lora": {"alpha": 0}}}})


def fit(rm: str, tmp_path, *args: str) -> dict:
    """Two LoRA steps of a shipped Persona config on the tiny model; returns the last checkpoint."""
    override = tiny_override(tmp_path, max_steps=2, reference_cache_dir=tmp_path / "ref" if rm == "imrm" else None)
    cli.main(["fit", "--config", str(PROJECT_ROOT / CONFIGS[rm]), "--config", str(override),
              "--data.init_args.num_train", "8", "--data.init_args.num_test", "4", "--trainer.limit_val_batches", "0",
              "--model.init_args.lora", '{"r": 4, "alpha": 8}', *args])
    return torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=False)


@pytest.mark.parametrize("rm, extra", [("exrm", ()), ("imrm", ()), ("exgrm", ()),
                                       ("imrm", ("--model.init_args.optimizer_in_backward", "true"))])
def test_cli_trains_the_adapters_and_leaves_the_backbone_as_it_was(rm, extra, tmp_path):
    state = fit(rm, tmp_path, *extra)["state_dict"]
    initial = load_backbone("tiny-llama-chat")[0].state_dict()
    base = {name.removeprefix("model."): value for name, value in state.items()
            if name.startswith("model.") and ".lora_" not in name}
    assert {name.replace(".base_layer.", ".") for name in base} == set(initial)
    assert all(torch.equal(value, initial[name.replace(".base_layer.", ".")]) for name, value in base.items())
    assert any(value.abs().max() > 0 for name, value in state.items() if ".lora_B." in name)


def test_a_lora_checkpoint_loads_and_resumes(tmp_path):
    checkpoint = fit("imrm", tmp_path)
    path = next(tmp_path.rglob("last.ckpt"))
    loaded = ImplicitRM.load_from_checkpoint(path, map_location="cpu")
    assert loaded.hparams.lora == LORA
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][name]), name
    override = tiny_override(tmp_path, max_steps=3, max_epochs=2, reference_cache_dir=tmp_path / "ref")
    cli.main(["fit", "--config", str(PROJECT_ROOT / CONFIGS["imrm"]), "--config", str(override),
              "--data.init_args.num_train", "8", "--data.init_args.num_test", "4", "--trainer.limit_val_batches", "0",
              "--model.init_args.lora", '{"r": 4, "alpha": 8}', "--ckpt_path", str(path)])
    resumed = torch.load(sorted(tmp_path.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)[-1],
                         map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 3


def adapter_loss_and_grads(module, batch, budget=None):
    module.zero_grad()
    module.resolved_token_budget = budget
    loss, _, _ = module.micro_batched_pair_loss(batch, backward=lambda part: part.backward())
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def test_activation_checkpointing_and_micro_batches_give_the_same_adapter_gradients():
    torch.manual_seed(0)
    plain = ImplicitRM(backbone="tiny-llama", lora=LORA, reference="none", beta=1.0)
    perturb_adapters(plain)
    checkpointed = ImplicitRM(backbone="tiny-llama", lora=LORA, reference="none", beta=1.0,
                              activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    batch = plain.collator()(edge_case_pairs(len(plain.tokenizer)))
    whole_loss, whole_grads = adapter_loss_and_grads(plain, batch)
    assert whole_grads and all(".lora_" in name for name in whole_grads)
    for module, budget in ((checkpointed, None), (plain, 60)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a pair over the budget runs alone, with a warning
            loss, grads = adapter_loss_and_grads(module, batch, budget)
            assert budget is None or len(module.micro_batch_plan(batch)) > 1
        torch.testing.assert_close(loss, whole_loss, rtol=1e-5, atol=0)
        assert grads.keys() == whole_grads.keys()
        for name, grad in whole_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)


def test_a_target_module_the_model_lacks_is_one_line_naming_its_linear_layers():
    from rm_lightning.models.lora import apply_lora

    model = ExplicitRM(backbone="tiny-llama-chat").model
    with pytest.raises(SettingError, match=r"lora.target_modules: .*nonexistent_proj.*its linear layers: .*q_proj"):
        apply_lora(model, {"target_modules": ["nonexistent_proj"]})
