"""Can the IM-RM's policy generate what it verifies? Sample responses and check them.

Theorem 1 of the paper says an IM-RM can rank correct above incorrect responses while its
policy almost never generates a correct one. This callback samples one response per prompt
from the reward module's language model and asks the datamodule whether it is correct.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from tqdm.auto import tqdm
from transformers import GenerationConfig

from rm_lightning.callbacks.run_directory import run_dir
from rm_lightning.errors import RMLightningError
from rm_lightning.files import write_json_atomically
from rm_lightning.models.implicit import ImplicitRM
from rm_lightning.pairs.contract import VerifiableData

SPLITS = ("train", "test")


class GenerationCheck(L.Callback):
    """Sample from the policy at the end of fit (and optionally after every validation).

    The datamodule supplies ``generation_prompts() -> {"train": [...], "test": [...]}`` (raw
    prompts) and ``verify(prompt, response) -> bool``. Prompts are formatted exactly as in
    training and sampled at temperature 1 with no top-k/top-p filtering (the paper's setting).
    Logs ``gen/train_correct_rate`` and ``gen/test_correct_rate`` and writes ``filename`` (rates,
    counts and a few sample generations per check) to the run directory. Runs on global rank 0
    with the module's full model (single device or DDP; not sharded strategies).

    Args:
        num_train_prompts, num_test_prompts: the first prompts of each split to check (null: all).
        max_new_tokens: generation length cap (paper: 300).
        batch_size: prompts per ``generate`` call.
        every_validation: also check after each validation (not the sanity check).
        num_examples: sample generations kept per split in the JSON file.
        seed: sampling seed; the training RNG state is left untouched.
    """

    def __init__(self, num_train_prompts: Optional[int] = 200, num_test_prompts: Optional[int] = 200,
                 max_new_tokens: int = 300, batch_size: int = 16, every_validation: bool = False,
                 num_examples: int = 5, seed: int = 0, filename: str = "generation_check.json"):
        if max_new_tokens < 1 or batch_size < 1:
            raise RMLightningError(f"GenerationCheck: max_new_tokens and batch_size must be positive "
                                   f"(got {max_new_tokens}, {batch_size})")
        self.prompt_counts = {"train": num_train_prompts, "test": num_test_prompts}
        self.max_new_tokens, self.batch_size, self.every_validation = max_new_tokens, batch_size, every_validation
        self.num_examples, self.seed, self.filename = num_examples, seed, filename
        self.history: list[dict] = []

    # --- hooks -----------------------------------------------------------------------------------

    def on_fit_start(self, trainer, pl_module) -> None:
        if getattr(pl_module, "device_mesh", None) is not None:
            raise RMLightningError("GenerationCheck does not support FSDP sharding yet (generate() bypasses the "
                                   "FSDP hooks); run the check on one process or with DDP")
        datamodule = trainer.datamodule
        if not isinstance(datamodule, VerifiableData):
            raise RMLightningError(f"GenerationCheck needs a datamodule with generation_prompts() and verify(); "
                                   f"{type(datamodule).__name__} has not both")
        if not isinstance(pl_module, ImplicitRM):
            rank_zero_warn(f"GenerationCheck on {type(pl_module).__name__}: its LM head is not what training "
                           f"optimizes; the check is meant for IM-RMs.")
        run_dir(trainer)  # collective: resolve the run directory on every rank now

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.every_validation and not trainer.sanity_checking:
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        already_checked = self.history and self.history[-1]["step"] == trainer.global_step
        result = self.history[-1] if already_checked else self.run(trainer, pl_module)
        if result is not None:
            rates = ", ".join(f"{split} {result['correct'][split]}/{result['total'][split]}" for split in result["rates"])
            print(f"\ngeneration check (step {result['step']}): correct responses: {rates}")

    # --- the check -------------------------------------------------------------------------------

    def run(self, trainer, pl_module) -> dict | None:
        """Sample, verify, log and save; returns this check's result (None on other ranks)."""
        if not trainer.is_global_zero:
            return None
        datamodule = trainer.datamodule
        prompts = datamodule.generation_prompts()
        result = {"step": trainer.global_step, "epoch": trainer.current_epoch, "rates": {}, "correct": {},
                  "total": {}, "examples": {}}
        for split in SPLITS:
            count = self.prompt_counts[split]
            chosen = list(prompts.get(split, []))[:count] if count is not None else list(prompts.get(split, []))
            if not chosen:
                continue
            responses = sample_responses(pl_module, chosen, self.max_new_tokens, self.batch_size, self.seed,
                                         trainer.precision_plugin.forward_context, desc=f"generation check [{split}]")
            verdicts = [bool(datamodule.verify(p, r)) for p, r in zip(chosen, responses)]
            result["correct"][split], result["total"][split] = sum(verdicts), len(verdicts)
            result["rates"][split] = sum(verdicts) / len(verdicts)
            result["examples"][split] = [{"prompt": p, "response": r, "correct": v}
                                         for p, r, v in list(zip(chosen, responses, verdicts))[:self.num_examples]]
        self.history.append(result)
        metrics = {f"gen/{split}_correct_rate": rate for split, rate in result["rates"].items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.write(run_dir(trainer) / self.filename)
        return result

    def write(self, path: Path) -> None:
        settings = {"max_new_tokens": self.max_new_tokens, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                    "seed": self.seed, "prompts": self.prompt_counts}
        payload = {"settings": settings, "latest": self.history[-1], "history": self.history}
        write_json_atomically(path, payload)


@torch.no_grad()
def sample_responses(pl_module, prompts: list[str], max_new_tokens: int, batch_size: int = 16, seed: int = 0,
                     precision_context=None, desc: str = "sampling") -> list[str]:
    """One sampled response per raw prompt, from ``pl_module.model``, formatted as in training."""
    model, tokenizer = pl_module.model, pl_module.tokenizer
    device = next(model.parameters()).device
    prefixes = [encode_prefix(pl_module, prompt) for prompt in prompts]
    config = sampling_config(model, tokenizer, max_new_tokens)
    keep = set(tokenizer.convert_tokens_to_ids(list(pl_module.hparams.get("extra_tokens", []))))
    drop = set(tokenizer.all_special_ids) - keep
    stops = set(config.eos_token_id)
    was_training = model.training
    model.eval()
    responses = []
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            for begin in tqdm(range(0, len(prefixes), batch_size), desc=desc, leave=False):
                input_ids, attention_mask = left_padded(prefixes[begin:begin + batch_size], tokenizer.pad_token_id)
                with (precision_context() if precision_context else nullcontext()):
                    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                            generation_config=config)
                for row in output[:, input_ids.shape[1]:].tolist():
                    responses.append(decode_response(tokenizer, row, stops, drop))
    finally:
        model.train(was_training)
    return responses


def encode_prefix(pl_module, prompt: str) -> list[int]:
    """Token ids of the formatted prompt, as ``PairEncoder`` makes them (BOS only without a chat template)."""
    tokenizer = pl_module.tokenizer
    prefix = pl_module.format_texts(prompt, "")[0]
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(prefix, add_special_tokens=add_special)["input_ids"]


def sampling_config(model, tokenizer, max_new_tokens: int) -> GenerationConfig:
    """Pure sampling: temperature 1, top-k and top-p off, nothing inherited from the model's defaults."""
    eos = model.generation_config.eos_token_id
    eos_ids = ([eos] if isinstance(eos, int) else list(eos or [])) + [tokenizer.eos_token_id]
    return GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=sorted({i for i in eos_ids if i is not None}))


def left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def decode_response(tokenizer, ids: list[int], stops: set[int], drop: set[int]) -> str:
    """Text up to the first stop token, without special tokens other than the kept added ones.

    ``skip_special_tokens`` would also drop added separators such as ``<sep>``, so specials are
    filtered by id instead.
    """
    cut = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    return tokenizer.decode([t for t in ids[:cut] if t not in drop], skip_special_tokens=False)
