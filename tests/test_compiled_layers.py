"""``compile_layers``: compiled decoder layers give eager's losses and gradients, and a fit compiles them."""

import lightning as L
import pytest
import torch

from conftest import edge_case_pairs, loss_and_grads
from rm_lightning import ExplicitRM, ImplicitRM
from rm_lightning.perf.compiled_layers import compile_decoder_layers, is_compiled
from rm_lightning.perf.packed_pairs import packed_hidden_states
from rm_lightning.perf.sharding import decoder_layers

pytestmark = pytest.mark.slow  # torch.compile: a C++ compiler run per graph


def test_compiled_layers_match_eager_on_batches_of_two_lengths():
    module = ImplicitRM(backbone="tiny-llama", reference="none", beta=1.0)
    vocab = len(module.tokenizer)
    batches = [module.collator()(edge_case_pairs(vocab, seed=seed)[:count]) for seed, count in ((3, 8), (4, 5))]
    assert batches[0]["input_ids"].shape != batches[1]["input_ids"].shape  # the second one recompiles
    eager = [loss_and_grads(module, batch, packed_hidden_states) for batch in batches]
    names = list(module.state_dict())

    compile_decoder_layers(module.model)
    compile_decoder_layers(module.model)  # idempotent
    assert all(is_compiled(layer) for layer in decoder_layers(module.model))
    assert list(module.state_dict()) == names  # compiled in place: checkpoints keep their keys
    for batch, (eager_loss, eager_grads) in zip(batches, eager):
        loss, grads = loss_and_grads(module, batch, packed_hidden_states)
        torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-4)
        assert grads.keys() == eager_grads.keys()
        for name, grad in eager_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_fit_with_compile_layers_trains_the_compiled_layers(tmp_path):
    """With the memory options too: checkpointing recomputes compiled layers, and the optimizer
    steps run from gradient hooks, which fire after the compiled backward."""
    from data_modules import PersonaDataModule

    L.seed_everything(0)
    module = ExplicitRM(backbone="tiny-llama-chat", compile_layers=True, activation_checkpointing=True,
                        optimizer_in_backward=True)
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    data = PersonaDataModule(source="builtin", num_train=8, num_test=4, batch_size=4, eval_batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, precision="bf16-mixed", default_root_dir=tmp_path,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=1)
    trainer.fit(module, datamodule=data)
    assert all(is_compiled(layer) for layer in decoder_layers(module.model))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    layer_weight = next(name for name in before if ".layers.0." in name)
    assert not torch.equal(before[layer_weight], module.model.get_parameter(layer_weight))
