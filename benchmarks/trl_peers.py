"""TRL's trainers on the same pairs: DPOTrainer for IM-RM, RewardTrainer for EX-RM.

Both train on the very token ids rm-lightning does (checked, and reported as
``same_tokens_as_ours``): DPOTrainer gets the conversations and applies the chat template
itself, RewardTrainer gets rm-lightning's token ids (its documented pre-tokenized input).

Settings: the whole batch (8 pairs unless ``--pairs``) a step, gradient accumulation 1, lr 1e-5
constant, TRL's default optimizer (fused AdamW, weight decay 0), no gradient clipping, no
evaluation, logging or saving, no dataloader workers; DPO with the sigmoid loss, beta 0.01, no truncation and
``precompute_ref_log_probs=False`` (TRL's default: a reference forward every step). TRL turns
gradient checkpointing on by default; variant ``trl`` turns it off, like ``ours``, and
``trl-ckpt`` keeps it, like ``ours-ckpt``. ``trl-compiled`` is ``trl`` with ``torch_compile``
(the Trainer compiles the whole trained model), the peer of ``ours-compiled``. Precision is
set explicitly (TRL defaults to bf16).

Timed: what ``Trainer`` runs between ``on_step_begin`` and ``on_step_end``, i.e. the
training step (forward, loss, backward), gradient-norm bookkeeping, the optimizer and
scheduler steps and ``zero_grad``; the dataloader is outside.
"""

from __future__ import annotations

import tempfile
import time
from typing import Optional

import torch

from benchmarks.batches import BatchSpec, batch_pairs, chat_encoder
from benchmarks.measure import PeakMemory, synchronize
from rm_lightning.models.backbones import BUNDLED_MODEL, TINY_BACKBONES, ensure_bundled_model_cached, load_backbone
from rm_lightning.errors import RMLightningError


def pretokenized(pairs, tokenizer) -> list[dict]:
    encoder = chat_encoder(tokenizer)
    encoded = [encoder.encode(pair) for pair in pairs]
    return [{"chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids} for e in encoded]


def conversations(pairs) -> list[dict]:
    """Pairs in TRL's conversational preference format; TRL's chat templating then yields the
    same prompt and response tokens as rm-lightning's (the response is all that follows the
    prompt in the templated conversation, end of turn included)."""
    return [{"prompt": [{"role": "user", "content": pair.prompt}],
             "chosen": [{"role": "assistant", "content": pair.chosen}],
             "rejected": [{"role": "assistant", "content": pair.rejected}]} for pair in pairs]


def pretrained_path(backbone: str) -> str:
    if backbone in TINY_BACKBONES:
        raise RMLightningError(f"TRL peers need a pretrained backbone with a chat template, not {backbone!r}")
    return str(ensure_bundled_model_cached()) if backbone == BUNDLED_MODEL else backbone


def _step_timer(device: str, total: int, label: str):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds between on_step_begin and on_step_end of every step."""

        def __init__(self):
            self.times: list[float] = []
            self.progress = tqdm(total=total, desc=label, leave=False, unit="step")

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.times.append(time.perf_counter() - self.start)
            self.progress.update()

    return StepTimer()


def _common_args(device: str, precision: str, steps: int, output_dir: str, variant: str, pairs: int) -> dict:
    return dict(
        output_dir=output_dir, per_device_train_batch_size=pairs, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, bf16=precision == "bf16", use_cpu=device == "cpu", seed=0,
        gradient_checkpointing=variant == "trl-ckpt", torch_compile=variant == "trl-compiled",
    )


def _dpo_trainer(backbone: str, pairs, args: dict, callback, eval_sets: Optional[dict] = None,
                 precompute_ref_log_probs: bool = False):
    """DPOTrainer on ``pairs`` (and ``eval_sets``: name -> pairs). With ``precompute_ref_log_probs`` TRL runs the
    reference once over every set in its constructor, with the policy itself as the reference (none is held)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, tokenizer = load_backbone(backbone)
    dataset = Dataset.from_list(conversations(pairs))
    evaluation = {name: Dataset.from_list(conversations(s)) for name, s in eval_sets.items()} if eval_sets else None
    reference = None if precompute_ref_log_probs else load_backbone(backbone)[0]
    config = DPOConfig(**args, beta=0.01, loss_type=["sigmoid"], max_length=None,
                       precompute_ref_log_probs=precompute_ref_log_probs)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=dataset,
                         eval_dataset=evaluation, processing_class=tokenizer, callbacks=[callback])
    return trainer, [p + c for p, c in zip(trainer.train_dataset["prompt_ids"], trainer.train_dataset["chosen_ids"])]


def _reward_trainer(backbone: str, pairs, args: dict, callback, eval_sets: Optional[dict] = None):
    """RewardTrainer on ``pairs`` (and ``eval_sets``: name -> pairs), as rm-lightning's token ids."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    path = pretrained_path(backbone)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_list(pretokenized(pairs, tokenizer))
    evaluation = ({name: Dataset.from_list(pretokenized(s, tokenizer)) for name, s in eval_sets.items()}
                  if eval_sets else None)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    config = RewardConfig(**args, max_length=None)
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, eval_dataset=evaluation,
                            processing_class=tokenizer, callbacks=[callback])
    return trainer, list(trainer.train_dataset["chosen_ids"])


def run_trl(spec: dict, memory: PeakMemory) -> dict:
    """Time TRL's trainer for ``spec['rm']`` (imrm: DPOTrainer, exrm: RewardTrainer)."""
    import datasets
    from transformers import PrinterCallback

    datasets.disable_progress_bars()
    pretrained_path(spec["backbone"])
    pairs = batch_pairs(BatchSpec.of_run(spec))
    total = spec["warmup"] + spec["steps"]
    callback = _step_timer(spec["device"], total, spec["label"])
    build = {"imrm": _dpo_trainer, "exrm": _reward_trainer}.get(spec["rm"])
    if build is None:
        raise RMLightningError(f"TRL has no trainer for RM type {spec['rm']!r}")
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as output_dir:
        args = _common_args(spec["device"], spec["precision"], total, output_dir, spec["variant"], len(pairs))
        trainer, chosen_ids = build(spec["backbone"], pairs, args, callback)
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics
        memory.reset()
        trainer.train()
    callback.progress.close()
    return {"times": callback.times[spec["warmup"]:], "warmup_s": sum(callback.times[:spec["warmup"]]),
            "chosen_ids": chosen_ids,
            "trainer": type(trainer).__name__}
