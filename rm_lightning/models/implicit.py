"""IM-RM: r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), summed over response tokens."""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn

from rm_lightning.cache_entries import cache_dir
from rm_lightning.errors import BackboneError, SettingError
from rm_lightning.models import reference_cache
from rm_lightning.models.backbones import check_backbone_name, check_language_model_backbone, load_backbone
from rm_lightning.models.logprobs import response_logratios, response_token_logps, sum_per_row
from rm_lightning.models.lora import adapters_disabled
from rm_lightning.models.loss import LOSS_KINDS, PairLossOptions, check_loss_options
from rm_lightning.models.reward_module import RewardModule
from rm_lightning.models.trainable import frozen_copy, prepare_trainable, untie_output_embeddings
from rm_lightning.pairs.contract import preference_data_of
from rm_lightning.pairs.records import EncodedPairs
from rm_lightning.perf.by_prompt import consecutive_batches
from rm_lightning.perf.eval_rewards import evaluated_part
from rm_lightning.settings import check_options


IMPLICIT_FILE = "implicit_reward.json"  # beside an exported IM-RM's weights: its reference and beta


class ImplicitRM(RewardModule):
    """Implicit reward model (the DPO reward).

    The reference is the frozen initial model, so every reward is 0 before training. Because
    the reference and the data are fixed, its response log-probs are computed once, in one
    pass before training, stored with each dataset and on disk (keyed by a hash of weights,
    token ids, precision and decoder layout), and reused every epoch; no reference model is
    held in memory during training.

    Args:
        beta: reward scale (the paper's 0.01).
        reference: ``frozen`` (the paper's IM-RM) or ``none`` (ablation: r = beta * log pi).
        cache_reference: precompute reference log-probs; ``False`` keeps a frozen copy of the
            model and runs it on every batch (slower; used to check the cache).
        reference_cache_dir: where cached reference log-probs live (default: the rm-lightning
            cache dir, ``$RM_LIGHTNING_CACHE`` or ``~/.cache/rm_lightning``).
        logprob_chunk_size: response tokens per LM-head chunk.
        loss: ``bt`` (default; ``sigmoid``, TRL's name for it), ``hinge`` or ``ipo``: the DPO-family
            losses in terms of r = beta * log-ratio (``models/loss.py``); label smoothing is bt's only.
        reference_backbone: the reference model, a hub id or folder (e.g. the SFT model a DPO policy
            was trained from, as RewardBench scores DPO models); null (default): the policy's own
            initial weights. It must share the policy's tokenizer. The reference cache keys on its
            weights.

    With ``lora`` the reference is the base model itself with its adapters switched off
    (``models/lora.py``): no copy is held, with or without ``cache_reference``.

    With ``trainable: output_layer`` only an untied copy of the unembedding learns and the
    reference is the initial unembedding over the same (frozen) hidden states, so no reference
    pass or cache is needed (``rm_lightning.models.logprobs.response_logratios``).
    """

    def __init__(self, beta: float = 0.01, reference: Literal["frozen", "none"] = "frozen",
                 cache_reference: bool = True, reference_cache_dir: Optional[str] = None,
                 logprob_chunk_size: int = 2048, loss: Literal["bt", "sigmoid", "hinge", "ipo"] = "bt",
                 reference_backbone: Optional[str] = None, **kwargs):
        check_options("model", {"beta": beta, "logprob_chunk_size": logprob_chunk_size,  # before the model loads
                                "label_smoothing": kwargs.get("label_smoothing", 0.0)})
        self.loss_kind = "sigmoid" if loss == "bt" else loss
        if self.loss_kind not in LOSS_KINDS:
            raise SettingError(f"model.loss: expected one of bt, {', '.join(LOSS_KINDS)} for an IM-RM, got {loss!r}")
        check_loss_options("model.loss", self.loss_kind, kwargs.get("label_smoothing", 0.0), beta)
        self._check_reference_backbone(reference_backbone, reference, kwargs.get("trainable", "all"))
        super().__init__(**kwargs)
        check_language_model_backbone(self.hparams.backbone, "model.backbone", "IM-RM")
        self.beta, self.reference, self.cache_reference = beta, reference, cache_reference
        self.reference_cache_dir = Path(reference_cache_dir) if reference_cache_dir else cache_dir() / "reference_logps"
        self.logprob_chunk_size = logprob_chunk_size
        self._initial_fingerprint = reference_cache.weights_fingerprint(self.model) if reference == "frozen" else ""
        self._reference_holder: list[torch.nn.Module] = []  # a list hides it from state_dict and optimizers
        self._separate_reference = False  # a reference_backbone whose weights differ from the policy's
        if reference_backbone is not None:
            self._load_reference_backbone(reference_backbone)
        if reference == "frozen" and not cache_reference and self.hparams.trainable == "all" and not self.hparams.lora \
                and not self._reference_holder:
            self._reference_holder.append(self._frozen(copy.deepcopy(self.model)))
        self._initial_head: list[torch.nn.Module] = []  # a list hides it from state_dict and optimizers
        if self.hparams.trainable == "output_layer":
            untie_output_embeddings(self.model)
            self._initial_head.append(frozen_copy(self.model.get_output_embeddings()))
        prepare_trainable(self)
        # the weights at which the policy is its own reference (``policy_is_reference``); None: another model is,
        # or the policy has moved since
        self._initial_parameters = (reference_cache.parameters_fingerprint(self.model)
                                    if reference == "frozen" and not self._separate_reference else None)

    def output_layer(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def loss_options(self) -> PairLossOptions:
        return replace(super().loss_options(), kind=self.loss_kind, beta=self.beta)

    def fixed_transient_bytes(self) -> int:
        """A chunk of fp32 vocabulary logits, alive in forward and again (recomputed, with its gradient) in backward."""
        return 3 * self.logprob_chunk_size * self.model.config.vocab_size * 4

    # --- rewards ---------------------------------------------------------------------------------

    def response_logps(self, hidden_states: torch.Tensor, batch: dict[str, torch.Tensor],
                       model: torch.nn.Module | None = None) -> torch.Tensor:
        """Sum of response-token log-probs per row, [2B] float32."""
        lm_head = (model or self.model).get_output_embeddings()
        logps, rows = response_token_logps(lm_head, hidden_states, batch["input_ids"], batch["response_mask"],
                                           self.logprob_chunk_size, batch["attention_mask"])
        return sum_per_row(logps, rows, hidden_states.shape[0])

    def rewards(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """In a trainer's validation, test or prediction, while the policy is its own reference, every reward is 0
        by definition: no forward is run (an untrained IM-RM's step-0 evaluation, or a model scored against
        itself, costs nothing). Elsewhere rewards are computed, as their derivatives may be wanted (the §4
        tools differentiate them at the initial weights, also in forward mode under ``no_grad``), and so they
        are where gradients are on: ``token_budget: auto`` measures a training forward's cost inside the first
        evaluation (an untrained IM-RM's would otherwise cost nothing, and the budget grow unbounded).
        A subclass's own ``compute_rewards`` is always run: its rewards need not be 0 there (a per-token
        penalty, say), and an evaluation of it at step 0 would otherwise report zeros."""
        trainer = self._trainer
        evaluating = trainer is not None and (trainer.validating or trainer.testing or trainer.predicting)
        if (evaluating and not torch.is_grad_enabled() and self.reference == "frozen"
                and type(self).compute_rewards is ImplicitRM.compute_rewards and self.policy_is_reference()):
            return torch.zeros(batch["input_ids"].shape[0], device=batch["input_ids"].device)
        return super().rewards(batch)

    def compute_rewards(self, hidden_states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._initial_head and self.reference == "frozen":
            initial = self._initial_head[0].to(hidden_states.device)
            return self.beta * response_logratios(self.output_layer(), initial, hidden_states, batch)
        policy = self.response_logps(hidden_states, batch)
        if self.reference == "none":
            return self.beta * policy
        if self.policy_is_reference():
            # r = beta * (log pi - log pi_ref) with pi = pi_ref is 0: exactly, rather than the float rounding between
            # this batch and the reference pass's batches of other shapes; the gradient is log pi's, as always
            return self.beta * (policy - policy.detach())
        return self.beta * (policy - self.reference_logps(batch).to(policy.dtype))

    def policy_is_reference(self) -> bool:
        """Whether the policy still has the reference's weights (before the first step, or a model scored
        against itself). Not decided for sharded (FSDP) weights, which no process holds whole."""
        if self._initial_parameters is None or self.device_mesh is not None:
            return False
        if reference_cache.parameters_fingerprint(self.model) != self._initial_parameters:
            self._initial_parameters = None  # moved for good: no hashing of the weights at every later batch
            return False
        return True

    @contextmanager
    def weights_moved_then_restored(self) -> Iterator[None]:
        """Around work that moves the weights and puts them back bit for bit (the §4 one-step analysis): inside,
        every reward is policy minus reference, as after any step, and ``policy_is_reference`` does not forget
        for good that the policy sits at its reference, as it does once the weights really move."""
        initial, self._initial_parameters = self._initial_parameters, None
        try:
            yield
        finally:
            self._initial_parameters = initial

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "reference_logps" in batch:
            return batch["reference_logps"]
        reference = self.reference_model()
        with torch.no_grad(), adapters_disabled(reference):
            hidden = self.hidden_states(batch, decoder=reference.base_model)
            return self.response_logps(hidden, batch, model=reference)

    def reference_model(self) -> torch.nn.Module:
        """The frozen initial model, loaded only when a batch has no cached reference log-probs;
        with LoRA the policy itself (run with its adapters disabled)."""
        if self.hparams.lora and not self.hparams.get("reference_backbone"):
            return self.model
        if not self._reference_holder:
            rank_zero_warn("IM-RM: reference log-probs that are not cached; loading the reference model.")
            name = self.hparams.get("reference_backbone") or self.hparams.backbone
            model = load_backbone(name, extra_tokens=self.hparams.extra_tokens)[0]
            self._reference_holder.append(self._frozen(model))
        reference = self._reference_holder[0]
        if reference.device != self.device:
            reference.to(self.device)
        return reference

    @staticmethod
    def _check_reference_backbone(name: Optional[str], reference: str, trainable: str) -> None:
        """Before any model loads: a reference backbone must be loadable and fit the other options."""
        if name is None:
            return
        check_backbone_name(name, option="model.init_args.reference_backbone")
        if reference != "frozen":
            raise SettingError(f"model.reference_backbone is given ({name!r}) but model.reference is {reference!r}; "
                               f"a reference backbone needs reference: frozen")
        if trainable != "all":
            raise SettingError("model.reference_backbone needs trainable: all (trainable: output_layer takes the "
                               "policy's own initial unembedding as the reference)")

    def _load_reference_backbone(self, name: str) -> None:
        """Load the reference, key the cache on its weights, and hold it unless it equals the policy."""
        check_language_model_backbone(name, "model.reference_backbone", "IM-RM")
        model, tokenizer = load_backbone(name, extra_tokens=self.hparams.extra_tokens)
        if tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise BackboneError(f"model.reference_backbone '{name}' has another tokenizer than the policy "
                                f"'{self.hparams.backbone}' ({len(tokenizer)} vs {len(self.tokenizer)} tokens); "
                                f"an IM-RM's reference must share the policy's vocabulary")
        self._initial_fingerprint = reference_cache.weights_fingerprint(model)
        if self._initial_fingerprint != reference_cache.weights_fingerprint(self.model):
            self._reference_holder.append(self._frozen(model))
            self._separate_reference = True

    @staticmethod
    def _frozen(model: torch.nn.Module) -> torch.nn.Module:
        model.eval()
        model.requires_grad_(False)
        return model

    # --- the reference cache --------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            self._warn_if_an_export_is_its_own_reference()
        self._attach_references(stage)

    def _warn_if_an_export_is_its_own_reference(self) -> None:
        """An exported IM-RM's folder names its reference; evaluated without ``reference_backbone`` it is its own
        reference, every reward exactly 0 and every accuracy 0.5, which would otherwise read as a result."""
        info_file = Path(self.hparams.backbone).expanduser() / IMPLICIT_FILE
        if self.reference != "frozen" or self.hparams.reference_backbone or not info_file.is_file():
            return
        try:
            info = json.loads(info_file.read_text())
        except (OSError, ValueError):
            return
        if info.get("reference_backbone"):
            rank_zero_warn(f"IM-RM: backbone {self.hparams.backbone} is an exported IM-RM whose reference is "
                           f"{info['reference_backbone']!r} ({IMPLICIT_FILE}), but no reference_backbone is given: "
                           f"it is its own reference, so every reward is 0; add --model.init_args.reference_backbone "
                           f"{info['reference_backbone']} --model.init_args.beta {info.get('beta')}")

    def _attach_references(self, stage: str) -> None:
        """Reference log-probs for every pair ``stage`` scores against another model (``_sets_needing_reference``);
        sets that already have theirs are skipped. Once they have them no reference model is held (one
        held for ``cache_reference: false``, which computes no such sets, stays)."""
        sets = self._sets_needing_reference(stage)
        self.attach_reference_logps(*sets)
        if sets:
            self._reference_holder.clear()

    def _sets_needing_reference(self, stage: str) -> list[EncodedPairs]:
        """The sets this stage will score with a reference other than the policy itself.

        In fit, the training set and the part of each eval set validation scores (none with
        ``limit_val_batches: 0``, the first batches with a smaller limit). In validate, test and
        predict every set once the policy has moved from its initial weights: at setup it has not, so
        none are computed then (its rewards are 0 without a reference); a checkpoint restored after
        setup moves it, and the stage's start hook (``on_validation_start`` ...) computes them.
        """
        data = self._data_with_cached_reference()
        if data is None:
            return []
        sets = data.encoded_sets()
        if stage != "fit":
            return [] if self.policy_is_reference() else list(sets.values())
        train = [sets["train"]] if "train" in sets else []
        if self._trainer.limit_val_batches == 0:
            return train
        loaders = data.val_dataloader()
        limit = self._trainer.limit_val_batches
        return train + [evaluated_part(dataset, loader, validated_batches(loader, limit))
                        for dataset, loader in zip(data.eval_sets.values(), loaders)]

    def _data_with_cached_reference(self):
        """The trainer's preference data when this IM-RM scores it against cached reference log-probs, else None."""
        if self.reference != "frozen" or not self.cache_reference or self._initial_head:
            return None
        return preference_data_of(self._trainer)

    def on_validation_start(self) -> None:
        if self._trainer.state.fn != "fit":  # fit's sets were given theirs at setup
            self._attach_references("validate")

    def on_test_start(self) -> None:
        self._attach_references("test")

    def on_predict_start(self) -> None:
        self._attach_references("predict")

    def attach_reference_logps(self, *datasets: EncodedPairs) -> None:
        """Give every pair of ``datasets`` its reference log-probs: a pair an earlier set holds gets that set's
        values (Persona's original responses of the train prompts are the training pairs), a set cached on
        disk is read back, and what remains is computed in one pass over the pairs of all sets together, by
        prompt (``reference_cache.unscored_pairs``). Each computed set is cached for the next run."""
        known: dict = {}
        computing = []
        for dataset in datasets:
            reference_cache.reuse_known(dataset, known)
            if any(pair.reference_logps is None for pair in dataset.pairs):
                identity = self._reference_identity(dataset)
                values = reference_cache.cached_values(self.reference_cache_dir, identity, dataset)
                if values is None:
                    computing.append((dataset, identity))
                else:
                    reference_cache.attach(dataset, values)
            reference_cache.remember(dataset, known)
        if not computing:
            return
        self._compute_reference_logps([dataset for dataset, _ in computing])
        for dataset, identity in computing:
            reference_cache.store(self.reference_cache_dir, identity, dataset)

    def _reference_identity(self, dataset: EncodedPairs) -> dict[str, str]:
        precision = str(getattr(getattr(self, "_trainer", None), "precision", "32-true"))
        layout = f"{self.hparams.decoder_layout}|{self.hparams.packed_attention}"
        return reference_cache.cache_identity(self._initial_fingerprint, dataset, precision, layout)

    def _compute_reference_logps(self, datasets: list[EncodedPairs]) -> None:
        pairs = reference_cache.unscored_pairs(datasets)
        union = EncodedPairs(", ".join(dataset.name for dataset in datasets), pairs)
        batches = consecutive_batches(pairs, self.hparams.decoder_layout)
        reference = self._pristine_or_reference()
        with adapters_disabled(reference):  # LoRA: the base model (a no-op without adapters)
            values = reference_cache.reference_pass(self, reference, union, batches)
        scored = {reference_cache.pair_key(pair): tuple(row) for pair, row in zip(pairs, values.tolist())}
        for dataset in datasets:
            reference_cache.reuse_known(dataset, scored)

    def _pristine_or_reference(self) -> torch.nn.Module:
        """The policy itself while its weights are still the initial ones (no second model in memory)."""
        pristine = reference_cache.weights_fingerprint(self.model) == self._initial_fingerprint
        return self.model if pristine else self.reference_model()


def validated_batches(loader, limit_batches: int | float) -> int:
    """How many batches of ``loader`` validation runs under ``limit_val_batches`` (as Lightning counts it: a
    number of batches, or a fraction of them)."""
    batches = len(loader)
    return min(batches, limit_batches) if isinstance(limit_batches, int) else int(batches * limit_batches)
