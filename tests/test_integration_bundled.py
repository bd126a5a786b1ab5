"""Integration tests on the real bundled SmolLM2-135M-Instruct (offline)."""

import math

import pytest
import torch

from conftest import PROJECT_ROOT
from rm_lightning import cli
from rm_lightning.models.backbones import BUNDLED_MODEL, load_backbone

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bundled_model_loads_offline_and_knows_english():
    model, tokenizer = load_backbone(BUNDLED_MODEL)
    assert not hasattr(model.config, "quantization_config")
    text = "The capital of France is Paris. It is a beautiful city with many museums and old buildings."
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        nats_per_token = model(ids, labels=ids).loss.item()
    assert nats_per_token < 3.0, nats_per_token
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None


def test_short_persona_run_separates_chosen_from_rejected(tmp_path):
    override = tmp_path / "short.yaml"
    override.write_text(
        f"trainer:\n  default_root_dir: {tmp_path}\n  max_steps: 3\n  max_epochs: 1\n"
        "model:\n  init_args:\n"
        f"    reference_cache_dir: {tmp_path / 'ref'}\n"
        "data:\n  init_args:\n    num_train: 24\n    num_test: 8\n    batch_size: 8\n"
        # one paraphrase per side: those sets are evaluated but not asserted on here
        "    paraphrased_chosen_tokens: [certainly]\n    paraphrased_rejected_tokens: [nope]\n"
    )
    run = cli.main(["fit", "--config", str(PROJECT_ROOT / "configs/imrm_persona.yaml"), "--config", str(override)])
    final = run.model.eval_sets.last["original_test_prompts"]
    assert final["accuracy"].item() >= 0.9
    assert final["chosen_reward"].item() > final["rejected_reward"].item()
    assert math.isfinite(final["normalized_margin"].item())
