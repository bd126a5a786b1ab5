"""Export to Hugging Face formats and back, and existing models as reward models (issue 17, items 2 and 3)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

from conftest import PROJECT_ROOT, tiny_override
from rm_lightning import cli
from rm_lightning.errors import RMLightningError
from rm_lightning.export import main as export_main
from rm_lightning.models import reference_cache
from rm_lightning.models.backbones import byte_level_tokenizer, load_backbone, tiny_llama
from rm_lightning.models.explicit import ExplicitRM
from rm_lightning.models.export import (GENERATIVE_FILE, IMPLICIT_FILE, export_module, formatted_ids,
                                        load_exported, load_reward_module)
from rm_lightning.models.generative import VERIFICATION_TEMPLATE, ExplicitGenerativeRM
from rm_lightning.models.implicit import ImplicitRM
from rm_lightning.pairs.records import PreferencePair

PAIRS = [PreferencePair("What is 2 + 2?", "4", "It is five."),
         PreferencePair("Name a colour of the sky on a clear day, in one long sentence please.",
                        "The sky on a clear day is blue, because air scatters blue light the most.", "Green.")]


@torch.no_grad()
def our_rewards(module, pairs=PAIRS) -> torch.Tensor:
    """Chosen then rejected rewards of ``pairs``, one padded batch, as training computes them."""
    encoder = module.pair_encoder(max_prompt_tokens=None, max_response_tokens=None)
    return module.eval().rewards(module.collator()([encoder.encode(pair) for pair in pairs])).float()


@torch.no_grad()
def hf_rewards(folder: Path, pairs=PAIRS) -> torch.Tensor:
    """What a plain-transformers user gets: chat template, right-padded batch, the model's logits."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": pair.prompt},
                                            {"role": "assistant", "content": response}], tokenize=False)
             for responses in ([p.chosen for p in pairs], [p.rejected for p in pairs])
             for pair, response in zip(pairs, responses)]
    batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    return model(**batch).logits[:, 0].float()


def perturbed(module, seed: int = 1):
    """Move every weight a little, as training would, so exported rewards are not the initial ones."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return module


def save_tiny(folder: Path, chat: bool = True, tokenizer=None) -> Path:
    model, default_tokenizer = tiny_llama(chat=chat)
    tokenizer = tokenizer or default_tokenizer
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- EX-RM -> AutoModelForSequenceClassification --------------------------------------------------


@pytest.mark.parametrize("backbone", ["tiny-llama-chat", "tiny-llama"])
def test_exported_exrm_gives_our_rewards_in_plain_transformers(backbone, tmp_path):
    module = perturbed(ExplicitRM(backbone=backbone))
    export_module(module, tmp_path / "out")
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.architectures == ["LlamaForSequenceClassification"] and config.num_labels == 1
    assert torch.allclose(hf_rewards(tmp_path / "out"), our_rewards(module), atol=1e-5, rtol=0)


def test_exrm_export_gets_its_own_pad_token_when_pad_is_eos_and_ends_the_text(tmp_path):
    """Hugging Face pools the last token that is not the pad token; with pad == EOS == the last token it would
    read the one before. The export gives the classifier a pad token that never occurs."""
    template = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    tokenizer = byte_level_tokenizer(template)
    tokenizer.pad_token = tokenizer.eos_token
    module = perturbed(ExplicitRM(backbone=str(save_tiny(tmp_path / "eos_pad", tokenizer=tokenizer))))
    ids = formatted_ids(module, PAIRS[0])
    assert module.tokenizer.pad_token_id == module.tokenizer.eos_token_id == ids[0][-1]  # the hard case holds
    export_module(module, tmp_path / "out")
    pad = json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"]
    assert pad != module.tokenizer.eos_token_id and pad == AutoTokenizer.from_pretrained(tmp_path / "out").pad_token_id
    assert torch.allclose(hf_rewards(tmp_path / "out"), our_rewards(module), atol=1e-5, rtol=0)


def test_exrm_with_mean_response_pooling_cannot_be_exported_and_writes_nothing(tmp_path):
    with pytest.raises(RMLightningError, match="pooling 'mean_response' cannot be exported"):
        export_module(ExplicitRM(backbone="tiny-llama-chat", pooling="mean_response"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_explicit_rm_takes_decoder_and_head_from_a_sequence_classification_folder(tmp_path):
    """Any AutoModelForSequenceClassification is an EX-RM backbone (a reward model as RewardBench loads it)."""
    tokenizer = byte_level_tokenizer(tiny_llama(chat=True)[1].chat_template)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(3)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    module = ExplicitRM(backbone=str(tmp_path / "rm"), head_init="zeros")
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert torch.equal(module.head.weight, classifier.score.weight)
    assert torch.allclose(hf_rewards(tmp_path / "rm"), our_rewards(module), atol=1e-5, rtol=0)


def test_exported_exrm_loads_back_as_the_same_explicit_rm(tmp_path):
    module = perturbed(ExplicitRM(backbone="tiny-llama"))
    export_module(module, tmp_path / "out")
    assert torch.allclose(our_rewards(load_exported(tmp_path / "out")), our_rewards(module), atol=1e-6, rtol=0)


# --- a trained checkpoint through the command ------------------------------------------------------


SMALL = ["--data.init_args.num_train", "8", "--data.init_args.num_test", "4", "--trainer.enable_progress_bar", "false",
         "--trainer.limit_val_batches", "1"]


def test_trained_checkpoint_exports_by_command_and_validates_as_a_backbone(tmp_path, capsys):
    config = str(PROJECT_ROOT / "configs/exrm_persona.yaml")
    (tmp_path / "fit").mkdir()
    (tmp_path / "val").mkdir()
    cli.main(["fit", "--config", config, "--config", str(tiny_override(tmp_path / "fit", max_steps=2)), *SMALL])
    run = next((tmp_path / "fit" / "lightning_logs").glob("version_*"))
    assert export_main([str(run), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    trained = load_reward_module(run / "checkpoints" / "last.ckpt")
    assert torch.allclose(hf_rewards(tmp_path / "out"), our_rewards(trained), atol=1e-5, rtol=0)
    # the exported folder is a backbone the CLI evaluates without training, with the fit's final metrics
    fitted = json.loads((run / "results.json").read_text())["eval_sets"]
    evaluated = cli.main(["validate", "--config", config, "--config", str(tiny_override(tmp_path / "val")),
                          "--model.init_args.backbone", str(tmp_path / "out"), *SMALL]).trainer.callback_metrics
    for name, metrics in fitted.items():
        assert evaluated[f"val/{name}/chosen_reward"].item() == pytest.approx(metrics["chosen_reward"], abs=1e-5)


# --- IM-RM: causal LM + implicit_reward.json; reference_backbone ----------------------------------


def test_exported_imrm_loads_back_with_its_reference_and_the_same_rewards(tmp_path):
    module = perturbed(ImplicitRM(backbone="tiny-llama-chat", beta=0.05))
    before = our_rewards(module)
    assert before.abs().min() > 0
    export_module(module, tmp_path / "out")
    info = json.loads((tmp_path / "out" / IMPLICIT_FILE).read_text())
    assert info["reference_backbone"] == "tiny-llama-chat" and info["beta"] == 0.05
    loaded = load_exported(tmp_path / "out")
    assert isinstance(loaded, ImplicitRM) and loaded.hparams.reference_backbone == "tiny-llama-chat"
    assert torch.allclose(our_rewards(loaded), before, atol=1e-6, rtol=0)


def test_load_exported_options_override_what_the_folder_records(tmp_path):
    module = perturbed(ImplicitRM(backbone="tiny-llama-chat", beta=0.05))
    export_module(module, tmp_path / "out")
    loaded = load_exported(tmp_path / "out", beta=0.1)
    assert torch.allclose(our_rewards(loaded), 2 * our_rewards(module), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rm_type", [ImplicitRM, ExplicitRM])
def test_lora_run_exports_the_adapted_model(rm_type, tmp_path):
    module = rm_type(backbone="tiny-llama-chat", lora={"r": 4})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the adapters learn (B starts at zero); the base weights stay
        for name, parameter in module.named_parameters():
            if "lora_" in name or name.startswith("head."):
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    before = our_rewards(module)  # an IM-RM's: against its reference, the base model with the adapters off
    assert before.abs().min() > 0
    export_module(module, tmp_path / "out")
    assert torch.allclose(our_rewards(load_exported(tmp_path / "out")), before, atol=1e-5, rtol=0)


def test_reference_backbone_keys_the_reference_cache_on_the_references_weights(tmp_path):
    policy = str(save_tiny(tmp_path / "policy"))
    perturbed(ImplicitRM(backbone="tiny-llama-chat")).model.save_pretrained(policy)
    module = ImplicitRM(backbone=policy, reference_backbone="tiny-llama-chat")
    reference = load_backbone("tiny-llama-chat")[0]
    assert module._initial_fingerprint == reference_cache.weights_fingerprint(reference)
    assert module._initial_fingerprint != reference_cache.weights_fingerprint(module.model)
    assert our_rewards(module).abs().min() > 0


def test_default_reference_is_the_policys_initial_weights_and_itself_as_reference_gives_zero(tmp_path):
    folder = str(save_tiny(tmp_path / "policy"))
    perturbed(ImplicitRM(backbone="tiny-llama-chat")).model.save_pretrained(folder)
    for module in (ImplicitRM(backbone=folder), ImplicitRM(backbone=folder, reference_backbone=folder)):
        assert torch.equal(our_rewards(module), torch.zeros(2 * len(PAIRS)))


def test_reference_backbone_with_another_tokenizer_is_one_line(tmp_path):
    tokenizer = byte_level_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    other = save_tiny(tmp_path / "other", tokenizer=tokenizer)
    with pytest.raises(RMLightningError, match="another tokenizer"):
        ImplicitRM(backbone="tiny-llama", reference_backbone=str(other))


# --- EX-GRM: causal LM + generative_reward.json; any instruct model --------------------------------


def test_exported_exgrm_loads_back_with_the_same_rewards(tmp_path):
    module = perturbed(ExplicitGenerativeRM(backbone="tiny-llama-chat"))
    export_module(module, tmp_path / "out")
    info = json.loads((tmp_path / "out" / GENERATIVE_FILE).read_text())
    assert info["prompt_template"] == VERIFICATION_TEMPLATE and info["yes_token"] == "Yes"
    loaded = load_exported(tmp_path / "out")
    assert isinstance(loaded, ExplicitGenerativeRM)
    assert torch.allclose(our_rewards(loaded), our_rewards(module), atol=1e-6, rtol=0)


def test_a_plain_causal_lm_folder_is_an_exgrm_backbone(tmp_path):
    folder = save_tiny(tmp_path / "instruct")
    assert torch.equal(our_rewards(ExplicitGenerativeRM(backbone=str(folder))),
                       our_rewards(ExplicitGenerativeRM(backbone="tiny-llama-chat")))


# --- the command's bad input and the hub ---------------------------------------------------------


def error_lines(capsys) -> list[str]:
    """The ``error:`` lines on stderr (progress bars aside), after checking that no traceback was printed."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error")]


def test_push_to_hub_unreachable_is_one_line_after_the_folder_is_written(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co' ([Errno -2] Name or service not known)")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    module = ExplicitRM(backbone="tiny-llama")
    ckpt = tmp_path / "rm.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {**module.hparams,
                                                                         "_class_path": "rm_lightning.ExplicitRM"}}, ckpt)
    assert export_main([str(ckpt), str(tmp_path / "out"), "--push_to_hub", "someone/tiny-rm"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: --push_to_hub someone/tiny-rm") and "is written" in lines[0]
    assert (tmp_path / "out" / "config.json").is_file()


def unknown_type_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "linear.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": "tiny-llama", "_class_path": "torch.nn.Linear"}},
               path)
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such checkpoint file or run directory"),
    ("run_dir_without_checkpoint", "no checkpoints/last.ckpt"),
    ("not_a_checkpoint", "not a readable checkpoint"),
    ("unknown_type", "unknown reward-model type 'torch.nn.Linear'"),
])
def test_bad_source_is_one_line_and_writes_nothing(case, expected, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    source = {"missing": tmp_path / "nothing.ckpt", "run_dir_without_checkpoint": tmp_path / "run",
              "not_a_checkpoint": tmp_path / "notes.ckpt", "unknown_type": unknown_type_checkpoint(tmp_path)}[case]
    assert export_main([str(source), str(tmp_path / "out")]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and expected in lines[0]
    assert not (tmp_path / "out").exists()


def test_existing_output_folder_needs_overwrite(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine\n")
    assert export_main([str(unknown_type_checkpoint(tmp_path)), str(tmp_path / "out")]) == 2
    assert "--overwrite" in error_lines(capsys)[0]
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine\n"


@pytest.mark.slow
@pytest.mark.integration
def test_bundled_model_exports_with_its_own_pad_and_scores_zero_as_imrm_against_itself(tmp_path):
    """SmolLM2's tokenizer pads with EOS (<|im_end|>, which ends every turn): the exported classifier still gives
    our rewards; the bundled model as an IM-RM against itself as the reference scores exactly 0."""
    module = ExplicitRM(backbone="smollm2-135m-instruct")
    export_module(module, tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out").pad_token_id not in {
        token for pair in PAIRS for ids in formatted_ids(module, pair) for token in ids}
    assert torch.allclose(hf_rewards(tmp_path / "out"), our_rewards(module), atol=1e-5, rtol=0)
    del module
    itself = ImplicitRM(backbone="smollm2-135m-instruct", reference_backbone="smollm2-135m-instruct")
    assert torch.equal(our_rewards(itself), torch.zeros(2 * len(PAIRS)))


def test_reference_pass_with_a_reference_backbone_caches_the_references_log_probs(tmp_path):
    """The one-pass reference cache computes the reference backbone's log-probs, not the policy's."""
    from rm_lightning.pairs.records import EncodedPairs

    policy = str(save_tiny(tmp_path / "policy"))
    perturbed(ImplicitRM(backbone="tiny-llama-chat")).model.save_pretrained(policy)
    module = ImplicitRM(backbone=policy, reference_backbone="tiny-llama-chat",
                        reference_cache_dir=str(tmp_path / "ref"))
    uncached = our_rewards(module)
    assert uncached.abs().min() > 0  # the policy is not its reference
    encoder = module.pair_encoder(max_prompt_tokens=None, max_response_tokens=None)
    dataset = EncodedPairs("pairs", [encoder.encode(pair) for pair in PAIRS])
    module.attach_reference_logps(dataset)
    batch = module.collator()(dataset.pairs)
    assert "reference_logps" in batch and list((tmp_path / "ref").glob("*.pt"))
    with torch.no_grad():
        assert torch.allclose(module.rewards(batch).float(), uncached, atol=1e-6, rtol=0)


@pytest.mark.parametrize("out", [".", "checkpoints", ".."])
def test_overwrite_never_replaces_the_run_being_exported(out, tmp_path, capsys):
    """``export <run> <run> --overwrite`` would replace the run directory, checkpoint included, by the export."""
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    module = ExplicitRM(backbone="tiny-llama")
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {**module.hparams,
                                                                         "_class_path": "rm_lightning.ExplicitRM"}},
               run / "checkpoints" / "last.ckpt")
    assert export_main([str(run), str(run / out), "--overwrite"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "holds the checkpoint being exported" in lines[0]
    assert (run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("rm_type, option", [(ImplicitRM, "backbone"), (ImplicitRM, "reference_backbone"),
                                             (ExplicitGenerativeRM, "backbone")])
def test_an_exported_exrm_is_no_backbone_of_a_type_reading_lm_logits(rm_type, option, tmp_path):
    """Its folder has no LM head: an IM-RM or EX-GRM on it would score with a random one, silently."""
    export_module(ExplicitRM(backbone="tiny-llama-chat"), tmp_path / "exrm")
    options = {"backbone": "tiny-llama-chat", option: str(tmp_path / "exrm")}
    with pytest.raises(RMLightningError, match=f"model.{option} .* is a sequence-classification model"):
        rm_type(**options)


def test_an_exported_imrm_validated_without_its_reference_says_every_reward_is_0(tmp_path):
    """Its own weights become the reference: accuracy 0.5 everywhere, which must not read as a result."""
    export_module(perturbed(ImplicitRM(backbone="tiny-llama-chat")), tmp_path / "out")
    config = str(PROJECT_ROOT / "configs/imrm_persona.yaml")
    with pytest.warns(UserWarning, match="no reference_backbone is given: it is its own reference, so every reward"):
        cli.main(["validate", "--config", config, "--config", str(tiny_override(tmp_path)),
                  "--model.init_args.backbone", str(tmp_path / "out"), *SMALL])


def test_the_help_says_a_runs_root_exports_its_newest_run(capsys):
    """``export runs/exrm_persona out`` works (README); ``--help`` said only a .ckpt file or a run directory."""
    with pytest.raises(SystemExit):
        export_main(["--help"])
    assert "newest run" in " ".join(capsys.readouterr().out.split())
