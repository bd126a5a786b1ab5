"""EX-GRM: reward = p("Yes") after a Question/Answer/Verification prompt (paper, App. A)."""

from __future__ import annotations

from typing import Literal

import torch

from lightning.pytorch.utilities import rank_zero_warn

from rm_lightning.errors import BackboneError, SettingError
from rm_lightning.models.backbones import check_language_model_backbone
from rm_lightning.models.loss import preference_loss
from rm_lightning.models.reward_module import RewardModule
from rm_lightning.models.trainable import prepare_trainable, untie_output_embeddings
from rm_lightning.pairs import Prompt, conversation_lines

VERIFICATION_TEMPLATE = "Question: {prompt}\nAnswer: {response}\nVerification: Is the answer correct (Yes/No)?"


class ExplicitGenerativeRM(RewardModule):
    """Explicit generative RM: the LM head is applied at the last position only.

    Args:
        loss: ``bt`` (or ``sigmoid``, TRL's name): the shared Bradley-Terry loss on p("Yes")
            (default, comparable with the other types; with the margin, centering and label
            smoothing options); ``yes_no_ce``: the authors' cross-entropy, "Yes" for the chosen
            and "No" for the rejected response (none of those options apply to it).
        yes_token: the answer word whose probability is the reward; it must be a single token.
        no_token: the other answer word (the cross-entropy's target for rejected responses); a single token.
    """

    def __init__(self, loss: Literal["bt", "sigmoid", "yes_no_ce"] = "bt", yes_token: str = "Yes",
                 no_token: str = "No", **kwargs):
        if loss not in ("bt", "sigmoid", "yes_no_ce"):
            raise SettingError(f"model.loss: expected one of bt, sigmoid, yes_no_ce for an EX-GRM, got {loss!r}")
        used = [name for name in ("label_smoothing", "center_rewards_coefficient") if kwargs.get(name)]
        if loss == "yes_no_ce" and used:
            raise SettingError(f"model.{used[0]}: applies to the bt loss only, not to loss: yes_no_ce")
        super().__init__(**kwargs)
        check_language_model_backbone(self.hparams.backbone, "model.backbone", "EX-GRM")
        self.loss_type = loss
        self.answer_ids = [self._single_token_id(yes_token), self._single_token_id(no_token)]
        if self.hparams.trainable == "output_layer":
            untie_output_embeddings(self.model)
        prepare_trainable(self)

    def output_layer(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def _single_token_id(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise BackboneError(f"EX-GRM answer word {word!r} is {len(ids)} tokens for this tokenizer; need exactly 1")
        return ids[0]

    def format_texts(self, prompt: Prompt, response: str) -> tuple[str, str]:
        """The verification question as one user turn, with nothing after the generation prompt.

        A conversation's prompt goes into the Question as its turns' ``Role: content`` lines
        (``System: ...``, ``User: ...``, ``Assistant: ...``, ``User: ...``), so the verifier sees the
        whole exchange the Answer replies to; a single user turn is its text, as a string prompt is.
        """
        if not isinstance(prompt, str):
            single_user = len(prompt) == 1 and prompt[0].role == "user"
            prompt = prompt[0].content if single_user else conversation_lines(prompt)
        question = VERIFICATION_TEMPLATE.format(prompt=prompt, response=response)
        return super().format_texts(question, "")

    def answer_logprobs(self, hidden_states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p("Yes"), log p("No") at the position after the prompt: [2B, 2]."""
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        logits = self.model.get_output_embeddings()(hidden_states[rows, batch["last_index"]]).float()
        return torch.log_softmax(logits, dim=-1)[:, self.answer_ids]

    def compute_rewards(self, hidden_states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.answer_logprobs(hidden_states, batch)[:, 0].exp()

    def loss_from_rewards(self) -> bool:
        """Not the cross-entropy, which reads log p("No") of rejected rows too; nor a subclass's own ``pair_loss``,
        which an evaluation that scored the rewards ahead would otherwise replace by BT's."""
        return self.loss_type != "yes_no_ce" and type(self).pair_loss is ExplicitGenerativeRM.pair_loss

    def pair_loss(self, batch):
        answer_logps = self.answer_logprobs(self.hidden_states(batch), batch)
        chosen, rejected = answer_logps[:, 0].exp().chunk(2)
        if self.loss_type != "yes_no_ce":
            return preference_loss(chosen, rejected, batch.get("margin"), self.loss_options()), chosen, rejected
        if "margin" in batch:
            rank_zero_warn("EX-GRM loss yes_no_ce ignores the data's per-pair margins; loss: bt uses them")
        yes_chosen, no_rejected = answer_logps[: chosen.numel(), 0], answer_logps[chosen.numel():, 1]
        return -(yes_chosen.mean() + no_rejected.mean()) / 2, chosen, rejected
