"""Every trainable parameter gets a gradient, so DDP runs without ``find_unused_parameters``.

tiny-llama has an untied LM head, which an EX-RM's reward never reads: the EX-RM freezes it
(``models/trainable.freeze_unused_output_embeddings``), and optimizer states saved while it was
still trainable are mapped onto the smaller parameter list on resume.
"""

from __future__ import annotations

import pytest
import torch

from rm_lightning import ExplicitGenerativeRM, ExplicitRM, ImplicitRM
from rm_lightning.pairs import PreferencePair

PAIRS = [PreferencePair("Is the sky blue?", "Yes, it is.", "No."),
         PreferencePair("Say hi", "hi there", "go away, I am busy")]


def build(kind: str):
    torch.manual_seed(0)
    if kind == "exrm":
        return ExplicitRM(backbone="tiny-llama-chat")
    if kind == "exrm_mean":
        return ExplicitRM(backbone="tiny-llama-chat", pooling="mean_response")
    if kind == "exgrm":
        return ExplicitGenerativeRM(backbone="tiny-llama-chat")
    return ImplicitRM(backbone="tiny-llama-chat", beta=0.5, cache_reference=False)


def pair_batch(module) -> dict[str, torch.Tensor]:
    encoder = module.pair_encoder()
    return module.collator()([encoder.encode(pair) for pair in PAIRS])


def trainable(module) -> list[torch.nn.Parameter]:
    return [param for param in module.parameters() if param.requires_grad]


def adam_after_one_step(module) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(trainable(module), lr=1e-3)
    module.pair_loss(pair_batch(module))[0].backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("kind", ["exrm", "exrm_mean", "exgrm", "imrm"])
def test_one_loss_reaches_every_trainable_parameter(kind):
    module = build(kind)
    module.pair_loss(pair_batch(module))[0].backward()
    assert [name for name, param in module.named_parameters() if param.requires_grad and param.grad is None] == []


def test_an_optimizer_state_that_still_holds_the_untied_lm_head_resumes_with_every_moment_in_place():
    before = build("exrm")
    before.model.get_output_embeddings().requires_grad_(True)  # as versions that trained it built the EX-RM
    saved = adam_after_one_step(before)
    checkpoint = {"optimizer_states": [saved.state_dict()]}
    moments = [saved.state[param]["exp_avg"] for param in trainable(before) if param in saved.state]

    after = build("exrm")
    after.on_load_checkpoint(checkpoint)
    resumed = torch.optim.Adam(trainable(after), lr=1e-3)
    resumed.load_state_dict(checkpoint["optimizer_states"][0])
    assert len(moments) == len(trainable(after))
    for param, moment in zip(trainable(after), moments):
        torch.testing.assert_close(resumed.state[param]["exp_avg"], moment, rtol=0, atol=0)


def test_an_optimizer_state_saved_with_the_frozen_lm_head_is_left_as_it_is():
    saved = adam_after_one_step(build("exrm"))
    checkpoint = {"optimizer_states": [saved.state_dict()]}
    build("exrm").on_load_checkpoint(checkpoint)
    assert checkpoint["optimizer_states"][0]["param_groups"] == saved.state_dict()["param_groups"]


def test_an_optimizer_in_backward_state_that_still_holds_the_untied_lm_head_resumes():
    before = ExplicitRM(backbone="tiny-llama-chat", optimizer_in_backward=True)
    before.model.get_output_embeddings().requires_grad_(True)
    saved = before.configure_optimizers()
    before.pair_loss(pair_batch(before))[0].backward()  # each parameter's optimizer steps in its backward hook
    checkpoint = {"optimizer_states": [saved.state_dict()]}
    moments = [next(iter(inner.state.values()))["exp_avg"] for inner in saved.per_parameter
               if inner.param_groups[0]["params"][0] is not before.model.get_output_embeddings().weight]

    after = ExplicitRM(backbone="tiny-llama-chat", optimizer_in_backward=True)
    after.on_load_checkpoint(checkpoint)
    resumed = after.configure_optimizers()
    resumed.load_state_dict(checkpoint["optimizer_states"][0])
    assert len(resumed.per_parameter) == len(moments)
    for inner, moment in zip(resumed.per_parameter, moments):
        torch.testing.assert_close(next(iter(inner.state.values()))["exp_avg"], moment, rtol=0, atol=0)
