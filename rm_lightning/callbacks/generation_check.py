"""Can the IM-RM's policy generate what it verifies? Sample responses and check them.

Theorem 1 of the paper says an IM-RM can rank correct above incorrect responses while its
policy almost never generates a correct one. This callback samples one response per prompt
from the reward module's language model and asks the datamodule whether it is correct, as the
authors' code does for the Hamiltonian-cycle task: at every validation (each epoch), on all
train and test prompts, one try per prompt.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from tqdm.auto import tqdm
from transformers import GenerationConfig

from rm_lightning.callbacks.epoch_progress import epoch_cut_short, uncount_cut_short_epoch
from rm_lightning.callbacks.run_directory import run_dir
from rm_lightning.errors import RMLightningError, SettingError
from rm_lightning.files import save_figure_atomically, write_json_atomically
from rm_lightning.models.implicit import ImplicitRM
from rm_lightning.pairs.contract import VerifiableData
from rm_lightning.pairs.encoding import uses_plain_format
from rm_lightning.perf.sharding import is_sharded, root_gathered, unsharded_class
from rm_lightning.settings import Rule, check_options, whole_number

SPLITS = ("train", "test")
ALL = "all"


def max_prompts_rule(option: str, value: Any) -> None:
    if value == ALL:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(f"{option}: expected a whole number >= 1 or '{ALL}', got {value!r}")


# checked by the class and, for a CLI run, by ``settings.check_config`` before any model loads
OPTION_RULES: dict[str, Rule] = {
    "max_prompts": max_prompts_rule,
    "every_n_epochs": whole_number(0),
    "max_new_tokens": whole_number(1),
    "batch_size": whole_number(1),
    "num_examples": whole_number(0),
}


class GenerationCheck(L.Callback):
    """Sample from the policy at the end of every n-th training epoch and at the end of fit.

    The datamodule supplies ``generation_prompts() -> {"train": [...], "test": [...]}`` (raw
    prompts) and ``verify(prompt, response) -> bool``. Prompts are formatted and tokenized exactly
    as the pair encoding makes them, and sampled at temperature 1 with no top-k/top-p filtering
    (the paper's setting). Each check logs ``gen/train_correct_rate`` and ``gen/test_correct_rate``
    (and ``gen/epoch``) to the trainer's loggers at its optimizer step, and rewrites ``filename``
    (settings, every check's rates and counts, a few sample generations per check) and the PNG of
    the same stem (correct rate against epochs trained, one line per prompt set) in the run
    directory; ``results.json`` keeps the rates of every check too. A check never runs twice at
    the same optimizer step, so the end of fit adds one only when the last epoch had none. The
    history is saved in checkpoints, so a resumed run continues it. With several processes (DDP or
    FSDP) each rank samples its share of the prompt batches and every rank gathers the responses;
    since each batch has a seed of its own, they are the ones one process samples from the same
    weights. Rank 0 logs and writes.

    Args:
        max_prompts: the first prompts of each split to check, or ``all`` (the paper).
        every_n_epochs: check at the end of every n-th training epoch (the paper: 1); 0 checks only at
            the end of fit.
        max_new_tokens: generation length cap (paper: 300).
        batch_size: prompts per ``generate`` call.
        every_validation: also check after each validation (not the sanity check).
        num_examples: sample generations kept per split and check in the JSON file.
        seed: sampling seed, the same for every check (a check's batch b uses seed + b); the training RNG
            state is left untouched.
        filename: the JSON file; the plot takes its stem (``generation_check.png``).
    """

    def __init__(self, max_prompts: Union[int, str] = ALL, every_n_epochs: int = 1, max_new_tokens: int = 300,
                 batch_size: int = 16, every_validation: bool = False, num_examples: int = 5, seed: int = 0,
                 filename: str = "generation_check.json"):
        check_options("GenerationCheck", dict(max_prompts=max_prompts, every_n_epochs=every_n_epochs,
                                              max_new_tokens=max_new_tokens, batch_size=batch_size,
                                              num_examples=num_examples), OPTION_RULES)
        self.max_prompts, self.every_n_epochs = max_prompts, every_n_epochs
        self.max_new_tokens, self.batch_size, self.every_validation = max_new_tokens, batch_size, every_validation
        self.num_examples, self.seed, self.filename = num_examples, seed, filename
        self.history: list[dict] = []
        self._title = ""

    # --- hooks -----------------------------------------------------------------------------------

    def on_fit_start(self, trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, VerifiableData):
            raise RMLightningError(f"GenerationCheck needs a datamodule with generation_prompts() and verify(); "
                                   f"{type(datamodule).__name__} has not both")
        if not isinstance(pl_module, ImplicitRM):
            rank_zero_warn(f"GenerationCheck on {unsharded_class(pl_module).__name__}: its LM head is not what "
                           f"training optimizes; the check is meant for IM-RMs.")
        from rm_lightning.callbacks.margin_history import run_title

        self._title = run_title(trainer, pl_module)  # collective: resolves the run directory on every rank now

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.every_validation and not trainer.sanity_checking and trainer.state.fn == "fit":
            self.check(trainer, pl_module, "validation")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if epoch_cut_short(trainer):
            return  # the epoch goes on when the fit resumes; the end of fit checks these weights
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.check(trainer, pl_module, "epoch_end")

    def on_train_end(self, trainer, pl_module) -> None:
        """The end of fit (before any ``on_fit_end``, so ``results.json`` has this check too)."""
        uncount_cut_short_epoch(trainer)  # the check's epoch: the one a stop ended inside, not the next
        result = self.check(trainer, pl_module, "fit_end")
        if result is not None:
            rates = ", ".join(f"{split} {result['correct'][split]}/{result['total'][split]}" for split in result["rates"])
            print(f"\ngeneration check (epoch {result['epoch']}, step {result['step']}): correct responses: {rates}")

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    # --- the check -------------------------------------------------------------------------------

    def check(self, trainer, pl_module, trigger: str) -> dict | None:
        """Run a check unless one already ran at this optimizer step; returns the latest (None on other ranks)."""
        if self.history and self.history[-1]["step"] == trainer.global_step:
            return self.history[-1] if trainer.is_global_zero else None
        return self.run(trainer, pl_module, trigger)

    def run(self, trainer, pl_module, trigger: str = "fit_end") -> dict | None:
        """Sample, verify, log and save; returns this check's result (None on other ranks). Every rank calls it."""
        datamodule = trainer.datamodule
        prompts = self.chosen_prompts(datamodule.generation_prompts())
        epoch = epochs_trained(trainer)
        result = {"epoch": epoch, "step": trainer.global_step, "trigger": trigger, "rates": {}, "correct": {},
                  "total": {}, "examples": {}}
        show = (trainer.is_global_zero and trainer.progress_bar_callback is not None
                and trainer.progress_bar_callback.is_enabled)
        ranks = (trainer.global_rank, trainer.world_size)
        own = sum(min(self.batch_size, len(chosen) - batch * self.batch_size) for chosen in prompts.values()
                  for batch in batches_sampled_by(len(chosen), self.batch_size, *ranks))
        with tqdm(total=own, desc=f"generation check (epoch {epoch})", unit="prompt", leave=False,
                  disable=not show) as bar:
            for split, chosen in prompts.items():
                responses = sample_responses(pl_module, chosen, self.max_new_tokens, self.batch_size, self.seed,
                                             trainer.precision_plugin.forward_context, bar=bar, ranks=ranks)
                verdicts = [bool(datamodule.verify(p, r)) for p, r in zip(chosen, responses)]
                result["correct"][split], result["total"][split] = sum(verdicts), len(verdicts)
                result["rates"][split] = sum(verdicts) / len(verdicts)
                result["examples"][split] = [{"prompt": p, "response": r, "correct": v}
                                             for p, r, v in list(zip(chosen, responses, verdicts))[:self.num_examples]]
        self.history.append(result)  # on every rank: the next check's "already ran" test reads it
        if not trainer.is_global_zero:
            return None
        metrics = {f"gen/{split}_correct_rate": rate for split, rate in result["rates"].items()}
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "gen/epoch": epoch}, step=trainer.global_step)
        self.write(run_dir(trainer) / self.filename)
        return result

    def chosen_prompts(self, prompts: dict[str, list[str]]) -> dict[str, list[str]]:
        """The prompts of each split that is not empty: all, or the first ``max_prompts``."""
        limit = None if self.max_prompts == ALL else self.max_prompts
        chosen = {split: list(prompts.get(split, []))[:limit] for split in SPLITS}
        return {split: values for split, values in chosen.items() if values}

    def settings(self) -> dict:
        return {"max_prompts": self.max_prompts, "every_n_epochs": self.every_n_epochs,
                "every_validation": self.every_validation, "max_new_tokens": self.max_new_tokens,
                "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": self.seed}

    def summary(self) -> dict:
        """What ``results.json`` keeps: the settings and every check's rates and counts (no samples)."""
        keys = ("epoch", "step", "trigger", "rates", "correct", "total")
        return {"settings": self.settings(), "history": [{k: check[k] for k in keys if k in check}
                                                         for check in self.history]}

    def write(self, path: Path) -> None:
        """The JSON file, then the plot; a plot that cannot be written is a warning (the JSON has the figures)."""
        payload = {"settings": self.settings(), "latest": self.history[-1], "history": self.history}
        write_json_atomically(path, payload)
        plot = path.with_suffix(".png")
        try:
            plot_correct_rates(self.history, plot, self._title)
        except Exception as err:  # noqa: BLE001 - the figures are in the JSON; the plot is a convenience
            rank_zero_warn(f"could not write {plot} ({type(err).__name__}: {err}); the rates are in {path.name}")


def batches_sampled_by(count: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The batches of ``count`` prompts (``batch_size`` each, the last maybe fewer) that ``rank`` samples itself:
    every ``world_size``-th, from its own index (all of them for one process)."""
    return list(range(rank, -(-count // batch_size), world_size))


def generation_summary(trainer) -> dict | None:
    """The generation check's ``summary()`` for ``results.json``; None when the run has no check."""
    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, GenerationCheck):
            return callback.summary()
    return None


def epochs_trained(trainer) -> float | int:
    """Epochs of training behind the current weights: whole epochs, plus the share of one in progress
    (a check after a validation inside an epoch); 1 at the end of the first epoch."""
    epochs = trainer.fit_loop.epoch_progress.current  # ``processed`` counts an epoch before its end hooks
    if epochs.started <= epochs.processed:
        return int(epochs.processed)
    batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    total = trainer.num_training_batches
    share = min(batches / total, 1.0) if isinstance(total, int) and total > 0 else 0.0
    value = round(epochs.processed + share, 4)
    return int(value) if value == int(value) else value


def plot_correct_rates(history: list[dict], path: Path, title: str = "") -> None:
    """Correct rate against epochs trained, one line per prompt set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    styles = {"train": dict(marker="o", ls="-", color="C0"), "test": dict(marker="s", ls="--", color="C1", mfc="none")}
    for split in SPLITS:  # distinct markers and dashes: both lines often lie on 0
        points = [(check["epoch"], check["rates"][split], check["total"][split])
                  for check in history if split in check["rates"]]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=f"{split} prompts ({points[-1][2]})",
                    ms=7, **styles[split])
    ax.set(xlabel="epochs trained", ylabel="correct rate", ylim=(-0.02, 1.02),
           title="generation check: share of sampled responses that are correct")
    ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure_atomically(fig, path)
    plt.close(fig)


@torch.no_grad()
def sample_responses(pl_module, prompts: list[str], max_new_tokens: int, batch_size: int = 16, seed: int = 0,
                     precision_context=None, desc: str = "sampling", bar: Optional[tqdm] = None,
                     ranks: tuple[int, int] = (0, 1)) -> list[str]:
    """One sampled response per raw prompt, from ``pl_module.model``, formatted as in training.

    Batch ``b`` (prompts ``b * batch_size`` onwards) is sampled with seed ``seed + b``, so its responses depend
    on that batch alone. With ``ranks = (rank, world_size)`` and several processes, every rank must call this
    with the same prompts: each samples batches ``rank, rank + world_size, ...`` and all get every response
    (``torch.distributed.all_gather_object``), the same ones one process samples. A sharded (FSDP) module
    runs a forward only with every rank, so there each rank makes the same number of ``generate`` calls (a
    rank short of a batch samples one of its own again and drops it), kept in step by ``synced_gpus``.

    Progress goes to ``bar`` (advanced by prompts) when given, else to a bar of its own over batches.
    """
    model, tokenizer = pl_module.model, pl_module.tokenizer
    device = next(model.parameters()).device
    prefixes = [encode_prefix(pl_module, prompt) for prompt in prompts]
    config = sampling_config(model, tokenizer, max_new_tokens)
    keep = set(tokenizer.convert_tokens_to_ids(list(pl_module.hparams.get("extra_tokens", []))))
    drop = set(tokenizer.all_special_ids) - keep
    stops = set(config.eos_token_id)
    rank, world_size = ranks
    sharded = is_sharded(pl_module)
    batches = batches_sampled_by(len(prefixes), batch_size)
    mine = batches_sampled_by(len(prefixes), batch_size, rank, world_size)
    calls = -(-len(batches) // world_size) if sharded else len(mine)
    was_training = model.training
    model.eval()
    sampled: dict[int, list[str]] = {}
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices), root_gathered(pl_module):
            for call in (range(calls) if bar is not None else tqdm(range(calls), desc=desc, leave=False)):
                batch = mine[call] if call < len(mine) else (mine or batches)[0]  # past its share: in step only
                torch.manual_seed(seed + batch)
                input_ids, attention_mask = left_padded(prefixes[batch * batch_size:(batch + 1) * batch_size],
                                                        tokenizer.pad_token_id)
                with (precision_context() if precision_context else nullcontext()):
                    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                            generation_config=config, synced_gpus=sharded)
                if call < len(mine):
                    sampled[batch] = [decode_response(tokenizer, row, stops, drop)
                                      for row in output[:, input_ids.shape[1]:].tolist()]
                    if bar is not None:
                        bar.update(input_ids.shape[0])
    finally:
        model.train(was_training)
    if world_size > 1:
        shares: list[dict[int, list[str]]] = [{} for _ in range(world_size)]
        torch.distributed.all_gather_object(shares, sampled)
        sampled = {batch: responses for share in shares for batch, responses in share.items()}
    return [response for batch in batches for response in sampled[batch]]


def encode_prefix(pl_module, prompt: str) -> list[int]:
    """Token ids of the formatted prompt, as ``PairEncoder`` makes them: the tokenizer's special tokens (BOS)
    only in the plain base format; a chat template's text, the authors' base-model one included, as it stands."""
    tokenizer = pl_module.tokenizer
    prefix = pl_module.format_texts(prompt, "")[0]
    add_special = uses_plain_format(tokenizer, pl_module.base_format)
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
