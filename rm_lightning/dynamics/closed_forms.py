"""The paper's §4 closed forms: how one gradient step through the output layer moves other rewards.

One plain step of size eta on the loss of a training batch (the module's own: Bradley-Terry, or
with its loss options), with w_i = dL/dr_i for every training row i (chosen and rejected), moves
the output layer by -eta * sum_i w_i * grad r_i, and so the reward of any other response (x', y') by

* EX-RM, head u (r = <u, h>):  -eta * sum_i w_i <h(x', y'), h_i>. Only hidden-representation
  similarity enters; exact, since r is linear in u.
* IM-RM, unembedding U (logits = U h; r = beta * sum of response log-probs, minus a reference
  that does not move): -eta * beta^2 * sum_i w_i sum_k sum_l rho_kl <h'_k, h_il>, where h'_k
  predicts the k-th token y'_k of y', h_il the l-th token v_l of row i, and
  rho_kl = <e_{y'_k} - p'_k, e_{v_l} - p_il> = 1[y'_k = v_l] - p'_k(v_l) - p_il(y'_k) + <p'_k, p_il>.
  The terms with y'_k = v_l are the matching-token part, the rest the non-matching part; the
  latter can be negative for a token of the same meaning as a trained one.

With every parameter trainable these are the output layer's share of the first-order change.
For a backbone that ties the unembedding to the input embeddings, the IM-RM terms are those of
the unembedding's use as output layer alone.
"""

from __future__ import annotations

import torch

Batch = dict[str, torch.Tensor]


def reward_weights(module, batch: Batch, hidden: torch.Tensor) -> torch.Tensor:
    """w = dL/dr [2B] of the module's own loss (its ``loss_options()`` and the batch's margins, as
    ``pair_loss``) at its current rewards on ``batch``: label smoothing, centering or IPO change w, and
    the closed forms must split the step that was analysed, not a Bradley-Terry one."""
    from rm_lightning.models.loss import preference_loss

    with torch.no_grad():
        rewards = module.compute_rewards(hidden, batch).float()
    rewards.requires_grad_(True)
    with torch.enable_grad():
        loss = preference_loss(*rewards.chunk(2), batch.get("margin"), module.loss_options())
        (weights,) = torch.autograd.grad(loss, rewards)
    return weights


def without_autocast(tensor: torch.Tensor):
    """Autocast off on ``tensor``'s device for the products of the closed forms: they end in chosen-minus-rejected
    differences of near-equal terms, which a bf16 matmul under a mixed-precision run's context cannot resolve."""
    return torch.autocast(tensor.device.type, enabled=False)


def margins_of(row_changes: torch.Tensor) -> torch.Tensor:
    """[2P] per-row changes (chosen rows, then rejected) -> [P] margin changes."""
    chosen, rejected = row_changes.chunk(2)
    return chosen - rejected


@torch.no_grad()
def exrm_hidden_similarity(module, train: Batch, train_hidden: torch.Tensor, probe: Batch,
                           probe_hidden: torch.Tensor, eta: float) -> torch.Tensor:
    """The EX-RM head's margin change per probe pair: -eta * sum_i w_i <h'+ - h'-, h_i>."""
    weights = reward_weights(module, train, train_hidden)
    h_train = module.features(train_hidden, train).float()
    h_probe = module.features(probe_hidden, probe).float()
    with without_autocast(h_probe):
        return margins_of(-eta * (h_probe @ h_train.T) @ weights)


def response_token_states(module, batch: Batch,
                          hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, hidden state that predicts the token, token id, the policy's next-token distribution) of
    every response token of ``batch``."""
    rows, positions = batch["response_mask"][:, 1:].nonzero(as_tuple=True)
    states = hidden[rows, positions].float()
    targets = batch["input_ids"][rows, positions + 1]
    head = module.output_layer() if module.hparams.trainable == "output_layer" else module.model.get_output_embeddings()
    probs = torch.softmax(head(states.to(head.weight.dtype)).float(), dim=-1)
    return rows, states, targets, probs


@torch.no_grad()
def imrm_token_terms(module, train: Batch, train_hidden: torch.Tensor, probe: Batch, probe_hidden: torch.Tensor,
                     eta: float) -> dict[str, torch.Tensor]:
    """The IM-RM unembedding's margin change per probe pair, split into matching and non-matching tokens."""
    weights = reward_weights(module, train, train_hidden)
    train_rows, h_train, v_train, p_train = response_token_states(module, train, train_hidden)
    probe_rows, h_probe, y_probe, p_probe = response_token_states(module, probe, probe_hidden)
    matching = y_probe[:, None] == v_train[None, :]
    with without_autocast(h_probe):
        rho = (matching.float() - p_probe[:, v_train] - p_train[:, y_probe].T + p_probe @ p_train.T)
        terms = rho * (h_probe @ h_train.T) * weights[train_rows][None, :] * (-eta * module.beta ** 2)
    rows = probe["input_ids"].shape[0]

    def per_probe_margin(part: torch.Tensor) -> torch.Tensor:
        per_row = torch.zeros(rows, dtype=part.dtype).index_add_(0, probe_rows.cpu(), part.sum(dim=1).cpu())
        return margins_of(per_row)

    return {"matching": per_probe_margin(terms * matching), "non_matching": per_probe_margin(terms * ~matching)}


def output_layer_terms(module, train: Batch, train_hidden: torch.Tensor, probe: Batch, probe_hidden: torch.Tensor,
                       eta: float) -> dict[str, torch.Tensor]:
    """The closed-form output-layer margin terms of ``module``'s RM type, from the final hidden states of
    the training and probe batches; {} for types without one, and where the output layer does not train
    (an IM-RM with LoRA: its unembedding is frozen, so a plain step does not move it)."""
    from rm_lightning.models.explicit import ExplicitRM
    from rm_lightning.models.implicit import ImplicitRM

    if not isinstance(module, (ExplicitRM, ImplicitRM)) or not module.output_layer().weight.requires_grad:
        return {}
    if isinstance(module, ExplicitRM):
        return {"hidden_similarity": exrm_hidden_similarity(module, train, train_hidden, probe, probe_hidden, eta)}
    if isinstance(module, ImplicitRM):
        return imrm_token_terms(module, train, train_hidden, probe, probe_hidden, eta)
    return {}
