"""``RewardModule``: everything the RM types share, so a new type only says how rewards are computed."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Literal, Optional, get_args

import lightning as L
import torch
from torch import nn
from torchmetrics import CatMetric, MeanMetric

from rm_lightning.backbones import load_backbone
from rm_lightning.compiled_layers import compile_decoder_layers
from rm_lightning.loss import bradley_terry_loss
from rm_lightning.metrics import NormalizedRewardMargin, PairwiseAccuracy
from rm_lightning.optim_in_backward import OptimizerInBackward, check_trainer_supports
from rm_lightning.packing import bucketed_hidden_states, padded_hidden_states
from rm_lightning.pair_packing import packed_hidden_states
from rm_lightning.pairs import LengthBucketSampler, PairCollator, PairEncoder, chat_formatter
from rm_lightning.sharding import shard_reward_module

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
DecoderLayout = Literal["packed", "bucketed", "padded"]
DECODER_LAYOUTS = get_args(DecoderLayout)


def adam_1e5(params: Iterable) -> torch.optim.Optimizer:
    """Default optimizer: Adam at lr 1e-5 (fast on 135M models; the paper used 1e-6 on 1B ones).

    Fused: one kernel updates every parameter, several times faster than Adam's default
    per-parameter loop on a CPU (0.2 s vs 1.1 s a step for 135M parameters on one core).
    """
    return torch.optim.Adam(params, lr=1e-5, fused=True)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing of every decoder layer, under the name this transformers version uses.

    transformers 5 renamed ``gradient_checkpointing_enable`` (now a deprecated alias that warns)
    to ``activation_checkpointing_enable``; the project supports versions from before the rename.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextmanager
def autocast_weight_cache(enabled: bool) -> Iterator[None]:
    """Turn autocast's cache of low-precision weight copies on or off for the block.

    The cache keeps the bf16 copy of every weight a forward has used until the autocast block
    ends, so that a weight used twice is cast once. With activation checkpointing nothing else
    keeps those copies, so the cache alone would hold a second, bf16 model (270 MB for 135M
    parameters) through the forward, while a packed forward uses each decoder weight once.
    Checkpoint recomputation in backward restores the setting it finds here.
    """
    previous = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(enabled)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(previous)


def is_repeated_batch(sampler, step: int) -> bool:
    """Whether this rank's ``step``-th batch only pads the rank to an equal step count.

    Eval leaves such copies out of the metrics, so every pair counts once, as in a 1-process run.
    """
    return isinstance(sampler, LengthBucketSampler) and sampler.is_repeated(step)


class EvalSetMetrics(nn.Module):
    """The metrics of one named eval set; states are sums or concatenations, reduced across ranks."""

    def __init__(self):
        super().__init__()
        self.accuracy = PairwiseAccuracy()
        self.normalized_margin = NormalizedRewardMargin()
        self.chosen_reward, self.rejected_reward, self.loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.margins = CatMetric()

    def update(self, chosen: torch.Tensor, rejected: torch.Tensor, loss: torch.Tensor) -> None:
        self.accuracy.update(chosen, rejected)
        self.normalized_margin.update(chosen, rejected)
        self.chosen_reward.update(chosen.detach().float())
        self.rejected_reward.update(rejected.detach().float())
        self.loss.update(loss.detach().float(), weight=chosen.numel())
        self.margins.update((chosen - rejected).detach().float())

    def compute_and_reset(self) -> dict[str, torch.Tensor]:
        values = {
            "accuracy": self.accuracy.compute(), "normalized_margin": self.normalized_margin.compute(),
            "chosen_reward": self.chosen_reward.compute(), "rejected_reward": self.rejected_reward.compute(),
            "loss": self.loss.compute(),
        }
        margins = self.margins.compute()
        values["margin"] = margins.mean() if margins.numel() else torch.tensor(float("nan"))
        values["margins"] = margins.reshape(-1)
        for metric in self.children():
            metric.reset()
        return values


class RewardModule(L.LightningModule):
    """A reward model on a causal-LM backbone, trained with the Bradley-Terry loss.

    Chosen and rejected responses go through the backbone in one concatenated forward
    (rows 0..B-1 chosen, B..2B-1 rejected). Subclasses implement ``compute_rewards`` and may
    override ``format_texts`` (how a prompt and response become text) or ``pair_loss``.

    Args:
        backbone: hub id, local directory, ``smollm2-135m-instruct`` or ``tiny-llama[-chat]``.
        optimizer: called with the parameters; from YAML, e.g. ``class_path: torch.optim.Adam``.
        lr_scheduler: optional, called with the optimizer; stepped every optimizer step.
        padding_side: side of padding in batches; rewards do not depend on it.
        activation_checkpointing: recompute decoder layers in backward to save memory.
        extra_tokens: tokens to add to the tokenizer (embeddings resized), e.g. ``<sep>``.
        decoder_layout: how a batch goes through the decoder. ``packed`` (default): one call over
            the batch's real tokens, each pair's common prefix (the prompt) computed once for
            chosen and rejected (``rm_lightning.pair_packing``); ``bucketed``: one call per group
            of rows of similar length (``rm_lightning.packing``; padded under FSDP, where ranks
            must make identical decoder calls); ``padded``: one call on the padded batch. All
            three give the same hidden states up to float rounding.
        optimizer_in_backward: step each parameter in backward as soon as its gradient is
            complete, and free that gradient (``rm_lightning.optim_in_backward``): a quarter
            less memory for Adam, with the same updates; one process, no gradient accumulation
            or clipping.
        compile_layers: ``torch.compile`` each decoder layer when the trainer sets the model up
            (``rm_lightning.compiled_layers``; the packed attention stays eager): on a 2-core CPU
            1-7% faster bf16 steps after a one-off compile of seconds to tens of seconds; on an
            H100 with a 1B model, EX-RM and EX-GRM steps a quarter shorter but IM-RM ones longer.
    """

    def __init__(self, backbone: str = "smollm2-135m-instruct", optimizer: OptimizerFactory = adam_1e5,
                 lr_scheduler: Optional[SchedulerFactory] = None, padding_side: str = "right",
                 activation_checkpointing: bool = False, extra_tokens: list[str] = [],
                 decoder_layout: DecoderLayout = "packed",
                 optimizer_in_backward: bool = False, compile_layers: bool = False):
        super().__init__()
        if decoder_layout not in DECODER_LAYOUTS:
            raise ValueError(f"decoder_layout must be one of {DECODER_LAYOUTS}, got {decoder_layout!r}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model, self.tokenizer = load_backbone(backbone, extra_tokens=extra_tokens)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modes as it finds them
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.train_accuracy = PairwiseAccuracy(dist_sync_on_step=True)  # the global batch's accuracy
        self.eval_metrics = nn.ModuleDict()
        self.eval_set_names: list[str] = []
        self.eval_every_n_epochs: dict[str, int] = {}
        self.last_eval: dict[str, dict[str, torch.Tensor]] = {}
        if activation_checkpointing:
            enable_activation_checkpointing(self.model)

    # --- what a subclass implements -----------------------------------------------------------

    def compute_rewards(self, hidden_states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rewards [2B] from the final hidden states [2B, T, H] of the concatenated batch."""
        raise NotImplementedError

    def format_texts(self, prompt: str, response: str) -> tuple[str, str]:
        """(prompt, response) -> (prefix, response suffix); the chat template by default."""
        if not hasattr(self, "_chat_formatter"):
            self._chat_formatter = chat_formatter(self.tokenizer)
        return self._chat_formatter(prompt, response)

    def pair_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, chosen rewards, rejected rewards) of a batch; the Bradley-Terry loss by default."""
        chosen, rejected = self.rewards(batch).chunk(2)
        return bradley_terry_loss(chosen, rejected), chosen, rejected

    # --- shared machinery ---------------------------------------------------------------------

    def pair_encoder(self, max_prompt_tokens: int | None = 512, max_response_tokens: int | None = 512,
                     truncate: bool = False) -> PairEncoder:
        return PairEncoder(self.tokenizer, self.format_texts, max_prompt_tokens, max_response_tokens, truncate)

    def collator(self) -> PairCollator:
        return PairCollator(self.tokenizer.pad_token_id, self.hparams.padding_side)

    @property
    def decoder(self) -> nn.Module:
        """The transformer without its LM head (e.g. ``LlamaModel``), so no vocab logits are computed."""
        return self.model.base_model

    def hidden_states(self, batch: dict[str, torch.Tensor], decoder: nn.Module | None = None) -> torch.Tensor:
        """Final hidden states of ``decoder`` (default: the policy's) on ``batch``.

        A frozen reference goes through the same path as the policy, so that identical weights
        give bit-identical log-probs (an untrained IM-RM's rewards are exactly 0).
        """
        decoder = self.decoder if decoder is None else decoder
        layout = self.hparams.decoder_layout
        if layout == "packed":
            return packed_hidden_states(decoder, batch)
        # Under FSDP every rank must make the same decoder calls (each gathers weights collectively),
        # and the number of length groups depends on each rank's own batch: one padded call there.
        if layout == "bucketed" and self.device_mesh is None:
            return bucketed_hidden_states(decoder, batch)
        return padded_hidden_states(decoder, batch)

    def rewards(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.compute_rewards(self.hidden_states(batch), batch)

    def run_pair_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``pair_loss`` as training and eval run it: without autocast's weight cache under activation checkpointing.

        Without checkpointing the cached bf16 weights are the very tensors backward saves, so
        the cache costs nothing and spares re-casting a weight used twice (length buckets,
        IM-RM's LM-head chunks).
        """
        with autocast_weight_cache(enabled=not self.hparams.activation_checkpointing):
            return self.pair_loss(batch)

    def configure_eval_sets(self, names: list[str]) -> None:
        """Create one metric group per named eval set (called from ``setup`` with the datamodule's names)."""
        self.eval_set_names = list(names)
        for name in names:
            if name not in self.eval_metrics:
                self.eval_metrics[name] = EvalSetMetrics().to(self.device)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, "eval_set_names", None) or self.eval_set_names or ["eval"]
        self.configure_eval_sets(names)
        self.eval_every_n_epochs = dict(getattr(datamodule, "eval_every_n_epochs", None) or {})

    def evaluates_now(self, name: str) -> bool:
        """Whether eval set ``name`` is due at this validation (see ``eval_every_n_epochs``).

        Every set is due outside fit, at every N-th epoch, and in the last epoch (the final
        figures must cover every set); all ranks decide alike, so metrics stay collective.
        """
        every = self.eval_every_n_epochs.get(name, 1)
        trainer = self._trainer
        if every == 1 or trainer is None or trainer.state.fn != "fit" or trainer.sanity_checking:
            return True
        epoch = trainer.current_epoch
        last_epoch = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs
        out_of_steps = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        return (epoch + 1) % every == 0 or last_epoch or out_of_steps or trainer.should_stop

    def configure_model(self) -> None:
        """Shard with FSDP2 when the strategy supplies a device mesh (``ModelParallelStrategy``), then compile
        the decoder layers if asked.

        Lightning calls this after ``setup``, so IM-RM's reference pass has run eagerly by then.
        """
        if self.device_mesh is not None:
            shard_reward_module(self, self.device_mesh)
        if self.hparams.compile_layers:
            compile_decoder_layers(self.model)

    def training_step(self, batch, batch_idx):
        loss, chosen, rejected = self.run_pair_loss(batch)
        self.train_accuracy(chosen, rejected)
        size = chosen.numel()
        self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)  # mean over ranks
        self.log("train/accuracy", self.train_accuracy, prog_bar=True, batch_size=size)
        self.log_dict({
            "train/chosen_reward": chosen.detach().float().mean(),
            "train/rejected_reward": rejected.detach().float().mean(),
            "train/margin": (chosen - rejected).detach().float().mean(),
        }, batch_size=size, sync_dist=True)
        return loss

    def _eval_step(self, batch, batch_idx: int, dataloader_idx: int) -> None:
        name = self.eval_set_names[dataloader_idx]
        if not self.evaluates_now(name):
            return
        loss, chosen, rejected = self.run_pair_loss(batch)  # every rank runs every step: FSDP gathers collectively
        if not self._is_repeated_batch(batch_idx, dataloader_idx):
            self.eval_metrics[name].update(chosen, rejected, loss)

    def _is_repeated_batch(self, batch_idx: int, dataloader_idx: int) -> bool:
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return False
        loaders = trainer.test_dataloaders if trainer.testing else trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        return is_repeated_batch(getattr(loaders[dataloader_idx], "sampler", None), batch_idx)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, batch_idx, dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, batch_idx, dataloader_idx)

    def _log_eval_sets(self, prefix: str) -> None:
        self.last_eval = {}
        for name in self.eval_set_names:
            metrics = self.eval_metrics[name]
            if not self.evaluates_now(name):
                continue
            if metrics.accuracy.total == 0 and not self.trainer.world_size > 1:
                continue
            values = metrics.compute_and_reset()
            self.last_eval[name] = values
            for key, value in values.items():
                if key != "margins":
                    # already reduced over ranks by the metric; sync_dist states that (a no-op mean)
                    self.log(f"{prefix}/{name}/{key}", value.float(), add_dataloader_idx=False, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_sets("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_sets("test")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.optimizer_in_backward:
            optimizer = self._optimizer_in_backward(params)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def _optimizer_in_backward(self, params: list[nn.Parameter]) -> OptimizerInBackward:
        if self._trainer is not None:
            check_trainer_supports(self._trainer)
        previous = getattr(self, "_backward_optimizer", None)
        if previous is not None:  # a second fit on this module: its hooks would step twice
            previous.remove_hooks()
        self._backward_optimizer = OptimizerInBackward(params, self.optimizer_factory)
        return self._backward_optimizer
