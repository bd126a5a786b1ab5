"""``RewardModule``: the training steps every RM type shares, so a new type only says how rewards are computed."""

from __future__ import annotations

from typing import Callable, Iterable, Literal, Optional, Union

import lightning as L
import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info
from torch import nn

from rm_lightning.errors import RMLightningError, SettingError
from rm_lightning.metrics.eval_sets import EvalSets, is_repeated_eval_batch
from rm_lightning.metrics.keys import EPOCH_ACCURACY, batch_means, train_key
from rm_lightning.metrics.pairwise import PairwiseAccuracy
from rm_lightning.models.backbones import load_backbone
from rm_lightning.models import scoring
from rm_lightning.models.lora import apply_lora
from rm_lightning.models.loss import PairLossOptions, preference_loss
from rm_lightning.models.trainable import Trainable, prepare_trainable
from rm_lightning.pairs.collation import PairCollator
from rm_lightning.pairs.contract import preference_data_of
from rm_lightning.pairs.encoding import BaseFormat, PairEncoder, chat_formatter, check_base_format
from rm_lightning.pairs.records import EncodedPairs, Prompt
from rm_lightning.perf.checkpointing import autocast_weight_cache, enable_activation_checkpointing
from rm_lightning.perf.eval_rewards import EvalRewards, rank_part, why_not_ahead
from rm_lightning.perf.layouts import DECODER_LAYOUTS, DecoderLayout, decoder_hidden_states
from rm_lightning.perf.micro_batches import encoded_pair_tokens, plan_for, run_in_micro_batches
from rm_lightning.perf.model_setup import prepare_model
from rm_lightning.perf.optim_in_backward import backward_optimizer
from rm_lightning.perf.packed_pairs import ATTENTION_KINDS, AttentionKind, packing_unsupported
from rm_lightning.perf.sharding import class_path_of, is_sharded
from rm_lightning.perf.token_budget import check_token_budget, parse_memory_limit, resolve_auto_budget
from rm_lightning.perf.weight_casts import SharedWeightCasts
from rm_lightning.settings import check_options

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def adam_1e5(params: Iterable) -> torch.optim.Optimizer:
    """Default optimizer: Adam at lr 1e-5, fused (one kernel for every parameter, much faster on a CPU)."""
    return torch.optim.Adam(params, lr=1e-5, fused=True)


class RewardModule(L.LightningModule):
    """A reward model on a causal-LM backbone, trained with the Bradley-Terry loss.

    Chosen and rejected responses go through the backbone in one concatenated forward
    (rows 0..B-1 chosen, B..2B-1 rejected). Subclasses implement ``compute_rewards`` and may
    override ``format_texts`` (how a prompt and response become text) or ``pair_loss``.

    Args:
        backbone: hub id, local directory, ``smollm2-135m-instruct`` or ``tiny-llama[-chat]``.
        optimizer: called with the parameters; from YAML, e.g. ``class_path: torch.optim.Adam``.
        lr_scheduler: optional, called with the optimizer; stepped every optimizer step.
        activation_checkpointing: recompute decoder layers in backward to save memory.
        extra_tokens: tokens to add to the tokenizer (embeddings resized), e.g. ``<sep>``.
        decoder_layout: ``packed`` (default; ``perf/packed_pairs.py``: no padding, each pair's prompt
            once) or ``padded``; same states. Sliding-window layers (Gemma 3) pack; a backbone whose
            attention cannot be packed (logit soft-capping) runs padded, said in one info line.
        packed_attention: ``grouped`` (default) or ``flex`` (FlexAttention; CUDA only for training).
        optimizer_in_backward: step each parameter as soon as its gradient is complete
            (``perf/optim_in_backward.py``): less memory, same updates; one process.
        compile_layers: ``torch.compile`` each decoder layer (``perf/compiled_layers.py``).
        trainable: ``all`` (default) or ``output_layer``: only the layer mapping final hidden states
            to rewards learns (``models/trainable.py``, the paper's §4 setting).
        token_budget: most tokens one forward runs (``perf/micro_batches.py``): a larger batch
            runs as micro-batches of whole pairs with gradients accumulated, the same update as
            the whole batch's; ``auto`` picks it from ``memory_limit`` (``perf/token_budget.py``);
            null (default) runs every batch whole.
        memory_limit: what ``token_budget: auto`` may fill per process, in bytes or as ``"12GB"``/``"12GiB"``;
            default: the host's available memory on a CPU (shared by the host's processes), the
            device's free memory on a GPU.
        center_rewards_coefficient: adds this times mean((r+ + r-)^2) to the loss (TRL's
            RewardTrainer option): rewards stay centred on 0; null (default) adds nothing.
        label_smoothing: eps in [0, 0.5): the robust (cDPO) BT loss
            -(1-eps) log sigmoid(d) - eps log sigmoid(-d); 0 (default): plain BT.
        lora: null (default): full fine-tuning; a mapping ``{r, alpha, dropout, target_modules}``
            (defaults 16, 32, 0.0, ``all-linear``): LoRA adapters through peft, the backbone frozen
            (``models/lora.py``).
        base_format: how a backbone without a chat template of its own formats pairs: ``authors``
            (default; the paper's code: ``<|user|>prompt<eos><|assistant|>response<eos>``, no BOS) or
            ``plain`` (``<bos>User: prompt\\nAssistant: response``, the format before the authors' was
            adopted). A backbone with a chat template always uses its own (``pairs/encoding.py``).

    A batch that carries ``margin`` (one number per pair, in reward units) trains with
    d = r+ - r- - margin, as TRL's RewardTrainer (``models/loss.py``).
    """

    def __init__(self, backbone: str = "smollm2-135m-instruct", optimizer: OptimizerFactory = adam_1e5,
                 lr_scheduler: Optional[SchedulerFactory] = None, activation_checkpointing: bool = False,
                 extra_tokens: list[str] = [], decoder_layout: DecoderLayout = "packed",
                 packed_attention: AttentionKind = "grouped", optimizer_in_backward: bool = False,
                 compile_layers: bool = False, trainable: Trainable = "all",
                 token_budget: Optional[Union[int, Literal["auto"]]] = None,
                 memory_limit: Optional[Union[int, str]] = None,
                 center_rewards_coefficient: Optional[float] = None, label_smoothing: float = 0.0,
                 lora: Optional[dict] = None, base_format: BaseFormat = "authors"):
        super().__init__()
        check_base_format(base_format)
        check_training_options(center_rewards_coefficient, label_smoothing, lora, trainable)  # before the model loads
        for name, value, allowed in (("decoder_layout", decoder_layout, DECODER_LAYOUTS),
                                     ("packed_attention", packed_attention, ATTENTION_KINDS),
                                     ("trainable", trainable, ("all", "output_layer"))):
            if value not in allowed:
                raise SettingError(f"model.{name}: expected one of {', '.join(allowed)}, got {value!r}")
        check_token_budget(token_budget, optimizer_in_backward, memory_limit)
        self.memory_limit_bytes = parse_memory_limit(memory_limit)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model, self.tokenizer = load_backbone(backbone, extra_tokens=extra_tokens)
        self._fall_back_to_padded_layout(backbone)
        if lora is not None:
            apply_lora(self.model, lora)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modes as it finds them
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.train_accuracy = PairwiseAccuracy(dist_sync_on_step=True)  # the global batch's accuracy
        self.epoch_train_accuracy = PairwiseAccuracy()  # over the epoch's batches: what a plateau is judged on
        self.eval_sets = EvalSets()
        self.checkpointing = activation_checkpointing  # token_budget: auto may switch it on
        if activation_checkpointing:
            enable_activation_checkpointing(self.model)
        # the budget in tokens: the option's, or what ``auto`` chose at the first batch
        self.resolved_token_budget: Optional[int] = token_budget if isinstance(token_budget, int) else None
        self._longest_pair_tokens: Optional[int] = None  # in the data, for ``auto``; set in setup
        self._zeroed_for_micro_batches = False
        self._eval_weight_casts = SharedWeightCasts()  # one bf16 cast of the weights per evaluation loop
        self._eval_rewards = EvalRewards()  # an evaluation's rewards, scored ahead by prompt

    def _fall_back_to_padded_layout(self, backbone: str) -> None:
        """``decoder_layout: padded`` for a backbone whose attention the packed layout cannot run exactly."""
        reason = packing_unsupported(self.model.config) if self.hparams.decoder_layout == "packed" else None
        if reason:
            rank_zero_info(f"decoder_layout: padded, as backbone '{backbone}' has {reason}, which the packed "
                           f"layout does not run")
            self.hparams.decoder_layout = "padded"

    # --- what a subclass implements -----------------------------------------------------------

    def compute_rewards(self, hidden_states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rewards [2B] from the final hidden states [2B, T, H] of the concatenated batch."""
        raise NotImplementedError

    def format_texts(self, prompt: Prompt, response: str) -> tuple[str, str]:
        """(prompt, response) -> (prefix, response suffix); the chat template by default.

        ``prompt`` is a string (one user turn) or a conversation (a tuple of ``pairs.Turn``).
        """
        if not hasattr(self, "_chat_formatter"):
            self._chat_formatter = chat_formatter(self.tokenizer, self.base_format)
        return self._chat_formatter(prompt, response)

    def pair_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, chosen rewards, rejected rewards) of a batch: ``models/loss.preference_loss`` under
        ``loss_options()``, with the batch's per-pair ``margin`` when it has one."""
        chosen, rejected = self.rewards(batch).chunk(2)
        return preference_loss(chosen, rejected, batch.get("margin"), self.loss_options()), chosen, rejected

    def loss_from_rewards(self) -> bool:
        """Whether ``pair_loss`` is ``preference_loss`` of ``rewards`` (then an evaluation may score its rewards
        ahead, ``perf/eval_rewards.py``); a type whose loss reads more than the rewards says so."""
        return type(self).pair_loss is RewardModule.pair_loss

    def loss_options(self) -> PairLossOptions:
        """The loss this module trains with: Bradley-Terry with the ``center_rewards_coefficient`` and
        ``label_smoothing`` options; a type with loss choices of its own (IM-RM) extends it."""
        return PairLossOptions(label_smoothing=self.hparams.label_smoothing,
                               center_rewards_coefficient=self.hparams.center_rewards_coefficient)

    def output_layer(self) -> nn.Module:
        """The layer ``trainable: output_layer`` trains; a type that supports it says which."""
        raise RMLightningError(f"trainable: output_layer is not defined for {type(self).__name__}")

    # --- text to rewards --------------------------------------------------------------------------

    def pair_encoder(self, **options) -> PairEncoder:
        """The one tokenization path; ``options`` are ``PairEncoder``'s (caps, truncation, bare responses)."""
        return PairEncoder(self.tokenizer, self.format_texts, base_format=self.base_format, **options)

    @property
    def base_format(self) -> str:
        """``base_format`` (checkpoints saved before the option existed: ``authors``)."""
        return self.hparams.get("base_format", "authors")

    def collator(self) -> PairCollator:
        return PairCollator(self.tokenizer.pad_token_id)

    @property
    def decoder(self) -> nn.Module:
        """The transformer without its LM head (e.g. ``LlamaModel``), so no vocab logits are computed."""
        return self.model.base_model

    def hidden_states(self, batch: dict[str, torch.Tensor], decoder: nn.Module | None = None) -> torch.Tensor:
        """Final hidden states of ``decoder`` (default: the policy's) on ``batch``.

        A frozen reference goes through the same path as the policy, so that identical weights
        give bit-identical log-probs (an untrained IM-RM's rewards are exactly 0). A batch that
        carries a frozen backbone's states (``trainable: output_layer``) is not run again.
        """
        if decoder is None and "hidden_states" in batch:
            return batch["hidden_states"]
        return decoder_hidden_states(self.decoder if decoder is None else decoder, batch,
                                     self.hparams.decoder_layout, self.hparams.packed_attention)

    def rewards(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.compute_rewards(self.hidden_states(batch), batch)

    def run_pair_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``pair_loss`` as training and evaluation run it (autocast's weight cache off under checkpointing)."""
        with autocast_weight_cache(enabled=not self.checkpointing):
            return self.pair_loss(batch)

    # --- micro-batches within the token budget ----------------------------------------------------

    def fixed_transient_bytes(self) -> int:
        """Memory a step briefly needs whatever its tokens (``token_budget: auto`` keeps it free); none here."""
        return 0

    def token_budget(self) -> Optional[int]:
        """The budget in tokens per forward (``auto`` is resolved here, once, at the first batch)."""
        if self.hparams.token_budget == "auto" and self.resolved_token_budget is None:
            self.resolved_token_budget = resolve_auto_budget(self)
        return self.resolved_token_budget

    def micro_batch_plan(self, batch: dict[str, torch.Tensor]) -> list[list[int]]:
        """Pair indices per micro-batch within the token budget (``perf/micro_batches.plan_for``)."""
        return plan_for(self, batch)

    def micro_batched_pair_loss(self, batch: dict[str, torch.Tensor],
                                backward: Optional[Callable[[torch.Tensor], None]] = None):
        """``run_pair_loss`` of the whole batch, as micro-batches within the token budget; training passes
        ``backward`` for every micro-batch but the last (``perf/micro_batches.run_in_micro_batches``)."""
        return run_in_micro_batches(self, batch, backward)

    def _backward_micro_batch(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Backward of one micro-batch's weighted loss as Lightning's own backward runs it: scaled for
        gradient accumulation, through the strategy and precision plugin, outside autocast.

        Lightning zeroes gradients after ``training_step`` and before its backward, which would
        drop these; so at the first batch of an accumulation they are zeroed here, before the first
        micro-batch's backward, and ``optimizer_zero_grad`` skips that step's zeroing.

        They are zeroed through the optimizers, as Lightning does, not through ``self.parameters()``:
        under FSDP2 the root unit keeps its weights gathered from its forward to its backward
        (``perf/sharding.py``), and meanwhile ``parameters()`` yields those gathered copies, not the
        sharded weights whose gradients the optimizer steps; the previous step's gradients of the
        embeddings, final norm and heads would be kept and added to. They are zeroed in place: freeing
        and allocating them again each step scatters them over a heap that the micro-batches'
        activations share, which raises the peak (``benchmarks/README.md``, "Token budget").
        """
        trainer = self._trainer
        first_to_accumulate = batch_idx % trainer.accumulate_grad_batches == 0  # as Lightning decides
        if first_to_accumulate and not self._zeroed_for_micro_batches:
            for optimizer in trainer.optimizers:
                optimizer.zero_grad(set_to_none=False)  # kept in place: no new gradient buffers each step
            self._zeroed_for_micro_batches = True
        with torch.autocast(self.device.type, enabled=False):
            trainer.strategy.backward(loss / trainer.accumulate_grad_batches, None)

    # --- Lightning hooks --------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self._loaded_step: Optional[int] = None  # a checkpoint this run restores sets it (``on_load_checkpoint``)
        data = preference_data_of(self._trainer)
        # a data module names its eval sets, possibly none (one that predict only scores single responses)
        names = list(data.eval_set_names) if data is not None else self.eval_sets.names or ["eval"]
        self.eval_sets.configure(names, data.eval_every_n_epochs if data is not None else {}, self.device)
        prepare_trainable(self, data)
        if data is not None and self.hparams.token_budget == "auto":
            layout = self.hparams.decoder_layout
            pairs = (pair for dataset in data.encoded_sets().values() for pair in dataset.pairs)
            self._longest_pair_tokens = max((encoded_pair_tokens(pair, layout) for pair in pairs), default=None)

    def configure_model(self) -> None:
        prepare_model(self, self.hparams.compile_layers)

    def training_step(self, batch, batch_idx):
        loss, chosen, rejected = self.micro_batched_pair_loss(
            batch, backward=lambda part: self._backward_micro_batch(part, batch_idx))
        self.train_accuracy(chosen, rejected)
        size = chosen.numel()
        self.log(train_key("loss"), loss, prog_bar=True, batch_size=size, sync_dist=True)  # mean over ranks
        self.log(train_key("accuracy"), self.train_accuracy, prog_bar=True, batch_size=size)
        self.epoch_train_accuracy.update(chosen, rejected)
        self.log(train_key(EPOCH_ACCURACY), self.epoch_train_accuracy, on_step=False, on_epoch=True, batch_size=size)
        self.log_dict(batch_means(chosen, rejected), batch_size=size, sync_dist=True)
        return loss

    def _eval_step(self, batch, batch_idx: int, dataloader_idx: int) -> None:
        name = self.eval_sets.name_of(dataloader_idx)
        if not self.eval_sets.is_due(name, self._trainer):
            return
        ahead = self._eval_rewards.lookup(batch)
        if ahead is not None:
            chosen, rejected = ahead.chunk(2)
            loss = preference_loss(chosen, rejected, batch.get("margin"), self.loss_options())
        else:  # every rank runs every step (and as many micro-batches): FSDP gathers collectively
            loss, chosen, rejected = self.micro_batched_pair_loss(batch)
        if not is_repeated_eval_batch(self._trainer, batch_idx, dataloader_idx):
            self.eval_sets.update(name, chosen, rejected, loss)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, batch_idx, dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, batch_idx, dataloader_idx)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Rewards of a batch of ``predict_dataloader`` with each pair's index (``models/scoring.py``)."""
        return scoring.predict_batch(self, batch)

    # --- using a trained model ------------------------------------------------------------------

    def score(self, prompts: list[str], responses: list[str], batch_size: int = 16, **encoding_options) -> torch.Tensor:
        """One reward per (prompt, response), batched, without gradients, in eval mode; float32 on the CPU.

        Texts go through this module's tokenization and collation, whole (``encoding_options``, e.g.
        ``max_response_tokens=512, truncate=True``, are ``pair_encoder``'s).
        """
        return scoring.score_responses(self, prompts, responses, batch_size, **encoding_options)

    def score_pairs(self, prompts: list[str], chosen: list[str], rejected: list[str], batch_size: int = 16,
                    **encoding_options) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen rewards, rejected rewards) of preference pairs, as evaluation computes them."""
        return scoring.score_pairs(self, prompts, chosen, rejected, batch_size, **encoding_options)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A fit resumed from an epoch's end goes on at the next epoch, also under ``max_steps``."""
        from rm_lightning.callbacks.epoch_progress import resume_at_the_next_epoch  # the callbacks import this module

        resume_at_the_next_epoch(self._trainer, checkpoint)
        self._loaded_step = checkpoint.get("global_step")

    def evaluated_step(self) -> int:
        """The step an evaluation is logged at: the weights' optimizer steps. In fit the trainer's; validate and
        test restore only the weights, so the trainer's step stays 0 and the checkpoint's is the one (as
        results.json records it); without a checkpoint, the trainer's."""
        trainer = self._trainer
        if trainer.state.fn != "fit" and getattr(self, "_loaded_step", None) is not None:
            return self._loaded_step
        return trainer.global_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the RM type, so ``rm_lightning.load_reward_model`` needs only the checkpoint."""
        checkpoint[scoring.CLASS_PATH_KEY] = class_path_of(self)  # under FSDP too, not its FSDP<Name> class

    def _log_eval_sets(self, stage: str) -> None:
        self.eval_sets.compute(self._trainer, step=self.evaluated_step())
        # already reduced over ranks by the metrics; sync_dist states that (a no-op mean)
        self.log_dict(self.eval_sets.scalars(stage), add_dataloader_idx=False, sync_dist=True)

    def _share_weight_casts(self) -> None:
        """Evaluation cannot change the weights: cast them to the autocast dtype once for the whole loop
        (``perf/weight_casts.py``), not once per batch; not for sharded weights."""
        if not is_sharded(self):
            self._eval_weight_casts.open()

    def _score_evaluation_ahead(self, stage: str) -> None:
        """Every row this validation or test runs, scored in one pass by prompt (``perf/eval_rewards.py``)."""
        trainer = self._trainer
        if why_not_ahead(self, trainer) is not None:
            return
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        counts = trainer.num_val_batches if stage == "val" else trainer.num_test_batches
        if not all(isinstance(getattr(loader, "dataset", None), EncodedPairs) for loader in loaders):
            return  # a data module of other loaders: scored batch by batch
        due = [(loader, count) for index, (loader, count) in enumerate(zip(loaders, counts))
               if self.eval_sets.is_due(self.eval_sets.name_of(index), trainer)]
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        several = trainer.world_size > 1 or is_sharded(self)
        if several and all(count >= len(loader) for loader, count in due):
            # every rank the whole sets, each scoring its share of the pass: a prompt's pairs stay together
            self._eval_rewards.fill(self, [loader.dataset for loader, _ in due], show_progress=show,
                                    share=(trainer.global_rank, trainer.world_size))
        elif not is_sharded(self):  # sharded: each rank's own loaders would give passes of different lengths
            self._eval_rewards.fill(self, [rank_part(loader.dataset, loader, count) for loader, count in due],
                                    show_progress=show)

    def on_validation_epoch_start(self) -> None:
        self._share_weight_casts()
        self._score_evaluation_ahead("val")

    def on_test_epoch_start(self) -> None:
        self._share_weight_casts()
        self._score_evaluation_ahead("test")

    def on_predict_epoch_start(self) -> None:
        self._share_weight_casts()

    def on_validation_epoch_end(self) -> None:
        self._eval_weight_casts.close()
        self._eval_rewards.clear()
        self._log_eval_sets("val")

    def on_test_epoch_end(self) -> None:
        self._eval_weight_casts.close()
        self._eval_rewards.clear()
        self._log_eval_sets("test")

    def on_predict_epoch_end(self) -> None:
        self._eval_weight_casts.close()

    def teardown(self, stage: str) -> None:
        self._eval_weight_casts.close()  # a loop that ended in an exception
        self._eval_rewards.clear()

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        if self._zeroed_for_micro_batches:  # zeroed before this batch's first micro-batch backward
            self._zeroed_for_micro_batches = False
            return
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip under mixed precision with the fused Adam the configs use. Lightning's mixed-precision plugin
        refuses any optimizer that unscales gradients itself, because a GradScaler's scaled gradients would be
        clipped. bf16-mixed has no scaler: the gradients are true ones and the plain clip is right. Under
        16-mixed (a GPU without bf16) they are unscaled here first; the scaler's step then tells the fused
        optimizer they already are (and still skips the step when one is not finite)."""
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and gradient_clip_val:
            if plugin.scaler is not None and _optimizer_handles_unscaling(optimizer):
                plugin.scaler.unscale_(optimizer)  # Lightning unscales every other optimizer before this hook
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val,
                                     GradClipAlgorithmType(gradient_clip_algorithm or "norm"))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.optimizer_in_backward:
            optimizer = backward_optimizer(self, params, self.optimizer_factory)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}


def check_training_options(center_rewards_coefficient, label_smoothing, lora, trainable) -> None:
    """The loss and LoRA options, one line each, before a backbone is loaded (``rm_lightning.settings``)."""
    check_options("model", {"center_rewards_coefficient": center_rewards_coefficient,
                            "label_smoothing": label_smoothing, "lora": lora})
    if lora is not None and trainable != "all":
        raise SettingError(f"model.lora: LoRA adapts the decoder, trainable: {trainable} freezes it; use one of "
                           f"them (lora: null, or trainable: all)")
