"""Training with cached reference log-probs gives the same losses as running the reference each step."""

import lightning as L
import torch

from data_modules import PersonaDataModule
from rm_lightning import ImplicitRM
from rm_lightning.models.reference_cache import float64_sum


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def train_losses(cache_reference: bool, cache_dir) -> tuple[list[float], bool]:
    torch.manual_seed(0)
    module = ImplicitRM(backbone="tiny-llama-chat", beta=0.5, cache_reference=cache_reference,
                        reference_cache_dir=str(cache_dir),
                        optimizer=lambda params: torch.optim.Adam(params, lr=3e-3))
    data = PersonaDataModule(num_train=12, num_test=4, batch_size=4, eval_batch_size=16)
    recorder = LossRecorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[recorder])
    trainer.fit(module, data)
    used_cache = all(p.reference_logps is not None for p in data.train_set.pairs)
    return recorder.losses, used_cache and not module._reference_holder


def test_cached_and_uncached_reference_train_identically(tmp_path):
    cached, held_no_reference = train_losses(True, tmp_path)
    uncached, _ = train_losses(False, tmp_path)
    assert held_no_reference  # the cache covered every batch: no reference model was loaded
    assert len(cached) == len(uncached) == 6
    assert cached[-1] < cached[0]  # it trained
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(uncached), rtol=1e-5, atol=1e-6)


def test_reference_cache_files_are_per_decoder_layout(tmp_path):
    def cache_files_after(layout: str) -> set:
        torch.manual_seed(0)  # the same tiny weights every time
        module = ImplicitRM(backbone="tiny-llama-chat", reference_cache_dir=str(tmp_path), decoder_layout=layout)
        data = PersonaDataModule(num_train=4, num_test=4)
        data.attach(module).setup("fit")
        module.attach_reference_logps(data.train_set)
        assert all(pair.reference_logps is not None for pair in data.train_set.pairs)
        return set(tmp_path.glob("*.pt"))

    packed = cache_files_after("packed")
    both = cache_files_after("padded")
    assert len(packed) == 1 and len(both) == 2
    assert cache_files_after("packed") == both  # a second packed run reads the first one's file


def test_the_chunked_float64_sum_is_the_float64_sum_of_every_value():
    values = torch.randn(1000, 37, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(float64_sum(values, chunk=4096), values.double().sum(), rtol=0, atol=1e-9)
    assert float64_sum(torch.empty(0)) == 0.0
