"""Optimizer steps folded into backward train exactly like the usual step, resume, and refuse what they cannot do."""

import lightning as L
import pytest
import torch

from data_modules import PersonaDataModule
from rm_lightning import ExplicitRM, ImplicitRM
from rm_lightning.errors import RMLightningError
from rm_lightning.perf.optim_in_backward import allocate_adam_state


class Recorder(L.Callback):
    """Training losses, and whether gradients were still held after each step."""

    def __init__(self):
        self.losses, self.grads_left = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.grads_left.append(any(p.grad is not None for p in pl_module.parameters()))


def adam(params):
    return torch.optim.Adam(params, lr=3e-3, fused=True)


def halve_every_step(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def trainer(tmp_path, recorder, **kwargs) -> L.Trainer:
    settings = dict(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder],
                    default_root_dir=tmp_path)
    settings.update(kwargs)
    return L.Trainer(**settings)


def fit(module_class, in_backward: bool, tmp_path, activation_checkpointing=False, **trainer_kwargs):
    torch.manual_seed(0)
    extra = {"reference_cache_dir": str(tmp_path / "ref")} if module_class is ImplicitRM else {}
    module = module_class(backbone="tiny-llama-chat", optimizer=adam, lr_scheduler=halve_every_step,
                          optimizer_in_backward=in_backward, activation_checkpointing=activation_checkpointing, **extra)
    recorder = Recorder()
    trainer(tmp_path, recorder, **trainer_kwargs).fit(module, PersonaDataModule(num_train=12, num_test=4, batch_size=4))
    return module, recorder


@pytest.mark.parametrize("module_class", [ExplicitRM, ImplicitRM])
def test_same_losses_and_weights_as_the_usual_step(module_class, tmp_path):
    usual, usual_log = fit(module_class, False, tmp_path)
    folded, folded_log = fit(module_class, True, tmp_path, activation_checkpointing=True)
    assert len(folded_log.losses) == 6 and folded_log.losses[-1] < folded_log.losses[0]
    torch.testing.assert_close(torch.tensor(folded_log.losses), torch.tensor(usual_log.losses), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(usual.named_parameters(), folded.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert not any(folded_log.grads_left)  # gradients were freed in backward
    assert folded.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-3 * 0.5 ** 6)  # the schedule reached it


def test_resumes_from_a_checkpoint(tmp_path):
    straight, _ = fit(ExplicitRM, True, tmp_path / "straight", max_epochs=2)
    first, _ = fit(ExplicitRM, True, tmp_path / "first", max_epochs=1, enable_checkpointing=True)
    (checkpoint,) = (tmp_path / "first").rglob("*.ckpt")
    torch.manual_seed(0)
    resumed = ExplicitRM(backbone="tiny-llama-chat", optimizer=adam, lr_scheduler=halve_every_step,
                         optimizer_in_backward=True)
    trainer(tmp_path / "resumed", Recorder(), max_epochs=2).fit(
        resumed, PersonaDataModule(num_train=12, num_test=4, batch_size=4), ckpt_path=str(checkpoint))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_refuses_gradient_accumulation_and_clipping(tmp_path):
    for kwargs, named in [({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"),
                          ({"gradient_clip_val": 1.0}, "gradient_clip_val=1.0")]:
        with pytest.raises(RMLightningError, match=named):
            fit(ExplicitRM, True, tmp_path, **kwargs)


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False, amsgrad=True),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
], ids=["fused", "amsgrad", "adamw"])
def test_state_allocated_up_front_matches_adams_own(make):
    """Same state layout (keys, dtypes, devices) and the same updates as Adam's lazy initialization."""
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    lazy_params = [torch.nn.Parameter(t.clone()) for t in start]
    eager_params = [torch.nn.Parameter(t.clone()) for t in start]
    lazy, eager = make(lazy_params), make(eager_params)
    allocate_adam_state(eager)
    assert all(eager.state[p]["exp_avg"].abs().sum() == 0 for p in eager_params)
    for _ in range(3):
        grads = [torch.randn_like(t) for t in start]
        for params, optimizer in ((lazy_params, lazy), (eager_params, eager)):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
    for a, b in zip(lazy_params, eager_params):
        assert torch.equal(a, b)
    for a, b in zip(lazy.state_dict()["state"].values(), eager.state_dict()["state"].values()):
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key].dtype, a[key].device, a[key].shape) == (b[key].dtype, b[key].device, b[key].shape), key
            assert torch.equal(a[key], b[key]), key


def test_other_optimizers_keep_their_lazy_state():
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9)
    allocate_adam_state(sgd)
    assert not sgd.state
