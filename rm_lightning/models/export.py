"""A trained reward model in the formats the Hugging Face ecosystem loads, and back.

* EX-RM -> a ``*ForSequenceClassification`` folder (num_labels 1, the decoder's weights, our head as
  ``score.weight``, the tokenizer and a chat template) that ``AutoModelForSequenceClassification``
  loads and that gives our rewards on text formatted as we format it: the prompt as the user turn,
  the response as the assistant turn, through the chat template. Hugging Face reads the last token
  that is not the pad token; we read the last token. They agree as long as the pad token never
  occurs in formatted text, so a pad token that could (EOS reused as pad, as SmolLM2's tokenizer
  does, or any token of the formatted text) is replaced by a new, dedicated one. A tokenizer without
  a chat template gets one that renders our plain ``User: ...\\nAssistant: ...`` format. Every export
  checks itself on sample texts: same token ids, same rewards.
* IM-RM -> the policy's causal-LM folder plus ``implicit_reward.json`` (reference backbone, beta),
  which ``load_exported`` (or ``ImplicitRM(backbone=<folder>, reference_backbone=..., beta=...)``)
  turns back into the same IM-RM.
* EX-GRM -> the causal-LM folder plus ``generative_reward.json`` (its prompt template and answer words).

Folders are written atomically (``rm_lightning.files``): a failed export leaves no half folder.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from rm_lightning.callbacks.run_directory import newest_run_checkpoint
from rm_lightning.checkpoint_options import is_sharded_checkpoint, sharded_checkpoint_error
from rm_lightning.errors import RMLightningError
from rm_lightning.files import write_directory_atomically
from rm_lightning.models.backbones import HUB_ID, is_sequence_classification
from rm_lightning.models.explicit import ExplicitRM
from rm_lightning.models.generative import VERIFICATION_TEMPLATE, ExplicitGenerativeRM
from rm_lightning.models.implicit import IMPLICIT_FILE, ImplicitRM
from rm_lightning.models.lora import merge_adapters
from rm_lightning.models.reward_module import RewardModule
from rm_lightning.models.scoring import reward_module_class
from rm_lightning.pairs.encoding import uses_plain_format
from rm_lightning.pairs.records import PreferencePair

GENERATIVE_FILE = "generative_reward.json"
# options that change how fast a module runs, never its weights or rewards: off for an export
RUN_ONLY_OPTIONS = {"activation_checkpointing": False, "compile_layers": False, "optimizer_in_backward": False,
                    "token_budget": None}
# texts every export is checked on (one short, one with a longer, multi-sentence response)
CHECK_PAIRS = [PreferencePair("What is 2 + 2?", "4", "5"),
               PreferencePair("Say hello to a friend.", "Hello there, my friend! How have you been?", "Go away.")]
# what decides an IM-RM's or EX-GRM's reward: a subclass overriding one is not what its export format records
REWARD_METHODS = ("format_texts", "hidden_states", "rewards", "compute_rewards")
MAX_REWARD_DIFFERENCE = 1e-4  # fp32 forwards in two layouts agree to ~1e-6; anything larger is a format mismatch


def say(message: str) -> None:
    print(f"[export] {message}", flush=True)


# --- reading a checkpoint -------------------------------------------------------------------------


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory's ``checkpoints/last.ckpt`` (the newest run's under a root)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    for sharded in (path, path / "checkpoints" / "last.ckpt"):
        if is_sharded_checkpoint(sharded):
            raise sharded_checkpoint_error(sharded, "export")
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        if last.is_file():
            return last
        newest = newest_run_checkpoint(path)  # the newest run under a runs root
        if newest is not None:
            return newest
        raise RMLightningError(f"{path}: no checkpoints/last.ckpt in this run directory (train with "
                               f"trainer.enable_checkpointing: true, or give the .ckpt file)")
    raise RMLightningError(f"{source}: no such checkpoint file or run directory")


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(hyper-parameters, state dict) of a Lightning checkpoint; tensors and plain containers only."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, not a torch file, unsafe content: all unusable
        raise RMLightningError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise RMLightningError(f"{path}: not a Lightning checkpoint (no state_dict)")
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or "backbone" not in hparams:
        raise RMLightningError(f"{path}: not a reward-model checkpoint of rm-lightning (no backbone in its "
                               f"hyper-parameters)")
    return dict(hparams), checkpoint["state_dict"]


def module_class(hparams: dict, checkpoint: Path) -> type[RewardModule]:
    """The reward-module class a checkpoint was trained as: its ``_class_path`` (LightningCLI writes it), else
    the run's config.yaml ``model.class_path``."""
    class_path = hparams.get("_class_path") or _run_config_class_path(checkpoint)
    if not class_path:
        raise RMLightningError(f"{checkpoint}: cannot tell which reward-model type it is (no class path in the "
                               f"checkpoint and no config.yaml beside its run)")
    return reward_module_class(class_path, checkpoint)


def _run_config_class_path(checkpoint: Path) -> Optional[str]:
    config = checkpoint.parent.parent / "config.yaml"
    try:
        model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return model.get("class_path") if isinstance(model, dict) else None


def load_reward_module(source: str | os.PathLike) -> RewardModule:
    """The trained reward module of a checkpoint or run directory, in eval mode on the CPU."""
    path = resolve_checkpoint(source)
    hparams, state = read_checkpoint(path)
    cls = module_class(hparams, path)
    options = {k: v for k, v in hparams.items() if not k.startswith("_")}
    options.update({k: v for k, v in RUN_ONLY_OPTIONS.items() if k in options})
    say(f"loading {cls.__name__} from {path}")
    module = cls(**options)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        names = ", ".join([*missing[:2], *unexpected[:2]])
        raise RMLightningError(f"{path}: its weights do not fit a {cls.__name__} on backbone "
                               f"{options['backbone']!r} ({len(missing)} missing, {len(unexpected)} unexpected: {names})")
    return module.eval()


# --- EX-RM: a sequence classifier -----------------------------------------------------------------


def plain_chat_template(tokenizer) -> str:
    """A chat template rendering our plain format (``chat_formatter`` with ``base_format: plain``), BOS included
    when the tokenizer adds one, so that users of the exported folder format text as we did."""
    with_specials = tokenizer("x", add_special_tokens=True)["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    bos = "{{ bos_token }}" if with_specials[:1] == [tokenizer.bos_token_id] and with_specials[1:] == without else ""
    # newlines as {{ '\n' }}: chat templates render with trim_blocks, which drops a newline after a tag
    return (bos + r"{% for message in messages %}{% if not loop.first %}{{ '\n' }}{% endif %}"
            r"{% if message['role'] == 'assistant' %}Assistant: {{ message['content'] }}"
            r"{% elif message['role'] == 'system' %}System: {{ message['content'] }}"
            r"{% else %}User: {{ message['content'] }}{% endif %}{% endfor %}"
            r"{% if add_generation_prompt %}{{ '\nAssistant:' }}{% endif %}")


def formatted_ids(module: RewardModule, pair: PreferencePair) -> list[list[int]]:
    """Token ids of the chosen and rejected texts exactly as training encoded them."""
    encoded = module.pair_encoder(max_prompt_tokens=None, max_response_tokens=None).encode(pair)
    return [encoded.chosen_ids, encoded.rejected_ids]


def chat_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """What a user of the exported folder feeds it: the chat template's text, tokenized as it stands."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def exported_tokenizer(module: ExplicitRM):
    """The module's tokenizer with a chat template and a pad token that never occurs in formatted text."""
    tokenizer = copy.deepcopy(module.tokenizer)
    if not getattr(tokenizer, "chat_template", None) or uses_plain_format(tokenizer, module.base_format):
        tokenizer.chat_template = plain_chat_template(tokenizer)  # else its own, or the authors' base-model one
    used = {token for pair in CHECK_PAIRS for ids in formatted_ids(module, pair) for token in ids}
    special = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in used | special:
        name = next(n for n in (f"<|pad{i or ''}|>" for i in range(1000)) if n not in tokenizer.get_vocab())
        tokenizer.add_special_tokens({"pad_token": name})
    return tokenizer


def sequence_classifier(module: ExplicitRM, tokenizer) -> torch.nn.Module:
    """A ``*ForSequenceClassification`` model holding the module's decoder and head."""
    from transformers import AutoModelForSequenceClassification

    if module.pooling != "last":
        raise RMLightningError(f"an EX-RM with pooling {module.pooling!r} cannot be exported: Hugging Face sequence "
                               f"classifiers read the last token only (pooling: last)")
    config = copy.deepcopy(module.model.config)
    config.num_labels = 1
    config.architectures = None
    try:
        with torch.random.fork_rng():
            classifier = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    except ValueError:
        raise RMLightningError(f"backbone type {config.model_type!r} has no sequence-classification model in "
                               f"transformers, so this EX-RM cannot be exported to one") from None
    score = getattr(classifier, "score", None)
    if not isinstance(score, torch.nn.Linear) or score.bias is not None:
        raise RMLightningError(f"{type(classifier).__name__} has no bias-free 'score' layer; this EX-RM cannot be "
                               f"exported to it")
    classifier.base_model.load_state_dict(module.model.base_model.state_dict())
    with torch.no_grad():
        score.weight.copy_(module.head.weight)
    if len(tokenizer) > classifier.get_input_embeddings().num_embeddings:  # a new pad token: one unused row
        with torch.random.fork_rng():
            torch.manual_seed(0)
            classifier.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    classifier.config.pad_token_id = tokenizer.pad_token_id  # what Hugging Face's pooling skips
    return classifier.eval()


@torch.no_grad()
def our_rewards(module: RewardModule, pair: PreferencePair) -> torch.Tensor:
    encoded = module.pair_encoder(max_prompt_tokens=None, max_response_tokens=None).encode(pair)
    batch = module.collator()([encoded])
    return module.eval().rewards(batch).float()


@torch.no_grad()
def check_sequence_classifier(module: ExplicitRM, classifier, tokenizer) -> float:
    """Largest reward difference on ``CHECK_PAIRS``, with padding; fails when ids or rewards differ."""
    for pair in CHECK_PAIRS:
        ours = formatted_ids(module, pair)
        theirs = [chat_ids(tokenizer, pair.prompt, response) for response in (pair.chosen, pair.rejected)]
        if ours != theirs:
            raise RMLightningError("the exported tokenizer's chat template does not reproduce the texts this EX-RM "
                                   "was trained on (token ids differ); it cannot be exported faithfully")
    worst = 0.0
    for pair in CHECK_PAIRS:
        batch = tokenizer([tokenizer.apply_chat_template([{"role": "user", "content": pair.prompt},
                                                          {"role": "assistant", "content": response}], tokenize=False)
                           for response in (pair.chosen, pair.rejected)],
                          add_special_tokens=False, padding=True, return_tensors="pt")
        theirs = classifier(**batch).logits[:, 0].float()
        worst = max(worst, (theirs - our_rewards(module, pair)).abs().max().item())
    if worst > MAX_REWARD_DIFFERENCE:
        raise RMLightningError(f"the exported sequence classifier's rewards differ from this EX-RM's by {worst:.2e} "
                               f"on sample texts; not exported")
    return worst


def export_explicit(module: ExplicitRM, out: Path, overwrite: bool = False) -> str:
    tokenizer = exported_tokenizer(module)
    classifier = sequence_classifier(module, tokenizer)
    worst = check_sequence_classifier(module, classifier, tokenizer)

    def save(folder: Path) -> None:
        classifier.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_folder(out, save, overwrite)
    return (f"EX-RM as {type(classifier).__name__} (num_labels 1, pad token {tokenizer.pad_token!r}, id "
            f"{tokenizer.pad_token_id}); rewards checked against the checkpoint's: max |difference| {worst:.1e}")


# --- IM-RM and EX-GRM: a causal LM plus a small JSON ----------------------------------------------


def portable_backbone(name: str) -> str:
    """A backbone name that still means the same model elsewhere on this machine: folders made absolute."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def implicit_reward_info(module: ImplicitRM) -> dict:
    reference = None
    if module.reference == "frozen":
        reference = portable_backbone(module.hparams.get("reference_backbone") or module.hparams.backbone)
    return {"reward": "beta * (log pi(y|x) - log pi_ref(y|x)), summed over response tokens",
            "reference_backbone": reference, "beta": module.beta, "reference": module.reference,
            "extra_tokens": list(module.hparams.extra_tokens)}


def export_causal_lm(module: RewardModule, out: Path, info_file: str, info: dict, overwrite: bool) -> None:
    def save(folder: Path) -> None:
        module.model.save_pretrained(folder)
        module.tokenizer.save_pretrained(folder)
        (folder / info_file).write_text(json.dumps(info, indent=2) + "\n")

    write_folder(out, save, overwrite)


def export_implicit(module: ImplicitRM, out: Path, overwrite: bool = False) -> str:
    info = implicit_reward_info(module)
    export_causal_lm(module, out, IMPLICIT_FILE, info, overwrite)
    return (f"IM-RM policy as {type(module.model).__name__} plus {IMPLICIT_FILE} (reference "
            f"{info['reference_backbone']!r}, beta {info['beta']})")


def export_generative(module: ExplicitGenerativeRM, out: Path, overwrite: bool = False) -> str:
    yes, no = (module.tokenizer.convert_ids_to_tokens(i) for i in module.answer_ids)
    info = {"reward": "p(yes_token) as the next token after the prompt template, given as the user turn",
            "prompt_template": VERIFICATION_TEMPLATE, "yes_token": module.hparams.yes_token,
            "no_token": module.hparams.no_token, "yes_token_text": yes, "no_token_text": no}
    export_causal_lm(module, out, GENERATIVE_FILE, info, overwrite)
    return f"EX-GRM as {type(module.model).__name__} plus {GENERATIVE_FILE} (its prompt template and answer words)"


def export_module(module: RewardModule, out: str | os.PathLike, overwrite: bool = False) -> str:
    """Write ``module`` to ``out`` in its type's format; returns a one-line summary. A LoRA module's adapters
    are folded into its weights first (in ``module`` itself): the folder holds the adapted model."""
    out = Path(out).expanduser()
    merge_adapters(module.model)
    for cls, export in ((ExplicitGenerativeRM, export_generative), (ImplicitRM, export_implicit),
                        (ExplicitRM, export_explicit)):
        if isinstance(module, cls):
            if cls is not ExplicitRM:  # an EX-RM export compares its rewards with the module's instead
                check_rewards_as_exported(module, cls)
            return export(module, out, overwrite)
    raise RMLightningError(f"no export format for reward-model type {type(module).__name__}")


def check_rewards_as_exported(module: RewardModule, cls: type[RewardModule]) -> None:
    """A subclass (README, "Adding an RM type") is written in ``cls``'s format, which records ``cls``'s reward:
    one that computes or formats its rewards otherwise would load back as ``cls`` with other rewards."""
    changed = [name for name in REWARD_METHODS if getattr(type(module), name) is not getattr(cls, name)]
    if changed:
        raise RMLightningError(f"{type(module).__name__} overrides {', '.join(changed)} of {cls.__name__}, so the "
                               f"{cls.__name__} export format would not give its rewards; not exported")


# --- loading an export back -----------------------------------------------------------------------


def load_exported(folder: str | os.PathLike, **options) -> RewardModule:
    """The reward module an export folder holds.

    ``options`` go to its constructor (e.g. ``decoder_layout``) and take precedence over what the folder
    records (an IM-RM's ``beta`` or ``reference_backbone``), so a user can score an exported model under
    another setting; the backbone is the folder itself."""
    folder = Path(folder).expanduser()
    if "backbone" in options:
        raise RMLightningError(f"load_exported({folder}): the folder is the backbone; leave out backbone=")
    if (folder / IMPLICIT_FILE).is_file():
        info = json.loads((folder / IMPLICIT_FILE).read_text())
        recorded = dict(reference_backbone=info.get("reference_backbone"), beta=info["beta"],
                        reference=info.get("reference", "frozen"), extra_tokens=info.get("extra_tokens", []))
        return ImplicitRM(backbone=str(folder), **{**recorded, **options})
    if (folder / GENERATIVE_FILE).is_file():
        info = json.loads((folder / GENERATIVE_FILE).read_text())
        if info.get("prompt_template") != VERIFICATION_TEMPLATE:
            raise RMLightningError(f"{folder / GENERATIVE_FILE}: its prompt template is not the one ExplicitGenerativeRM "
                                   f"uses; this EX-GRM cannot be loaded back as one")
        recorded = dict(yes_token=info["yes_token"], no_token=info["no_token"])
        return ExplicitGenerativeRM(backbone=str(folder), **{**recorded, **options})
    if is_sequence_classification(str(folder)):
        return ExplicitRM(backbone=str(folder), **options)
    raise RMLightningError(f"{folder}: not an exported reward model (no {IMPLICIT_FILE}, no {GENERATIVE_FILE}, no "
                           f"sequence-classification config.json)")


# --- writing and publishing -----------------------------------------------------------------------


def check_output(out: Path, overwrite: bool) -> None:
    """Before any model loads: ``out`` must be new, empty, or replaceable."""
    if out.exists() and not out.is_dir():
        raise RMLightningError(f"{out}: exists and is a file; give a folder to export to")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RMLightningError(f"{out}: exists and is not empty; pass --overwrite to replace it")


def check_not_replacing_source(out: Path, checkpoint: Path) -> None:
    """``--overwrite`` replaces ``out`` whole: a folder holding the checkpoint (the run directory, its
    ``checkpoints/`` or a runs root) would lose the run, so it is refused before any model loads."""
    if checkpoint.resolve().is_relative_to(out.resolve()):
        raise RMLightningError(f"{out}: holds the checkpoint being exported ({checkpoint}); exporting there would "
                               f"replace the run, so give a new folder")


def write_folder(out: Path, save: Callable[[Path], None], overwrite: bool) -> None:
    """Write ``out`` through a staged folder: readers see the old folder or the new one, never a half one."""
    check_output(out, overwrite)
    if not (out.is_dir() and any(out.iterdir())):
        write_directory_atomically(out, save)
        return
    fresh = write_directory_atomically(out.with_name(f".{out.name}.new-{os.getpid()}"), save)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(fresh, out)
    shutil.rmtree(old, ignore_errors=True)


def check_hub_repo(repo: Optional[str]) -> None:
    if repo is not None and not HUB_ID.fullmatch(repo):
        raise RMLightningError(f"--push_to_hub: {repo!r} is not a hub repository id of the form user/name")


def push_to_hub(folder: Path, repo: str) -> str:
    """Upload ``folder`` to the hub repository ``repo`` (created if needed); one error line when unreachable."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        url = api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="rm-lightning export")
    except Exception as err:  # noqa: BLE001 - offline, no token, refused: all end the same way
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RMLightningError(f"--push_to_hub {repo}: the Hugging Face hub cannot be reached or refused the upload "
                               f"({why}); {folder} is written, upload it later with: hf upload {repo} {folder}") from None
    return str(url)


def export(source: str | os.PathLike, out: str | os.PathLike, push_to_hub_repo: Optional[str] = None,
           overwrite: bool = False) -> Path:
    """Export the reward model of a checkpoint or run directory to ``out`` (and the hub, when asked)."""
    out = Path(out).expanduser()
    check_hub_repo(push_to_hub_repo)
    check_output(out, overwrite)
    check_not_replacing_source(out, resolve_checkpoint(source))
    module = load_reward_module(source)
    summary = export_module(module, out, overwrite)
    files = sorted(p for p in out.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files) / 2**20
    say(f"wrote {out}: {summary}; {len(files)} files, {size:.1f} MiB")
    if push_to_hub_repo is not None:
        say(f"pushed to {push_to_hub(out, push_to_hub_repo)}")
    return out
