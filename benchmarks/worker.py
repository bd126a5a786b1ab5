"""Run one benchmark variant in a process of its own and write its measurements as JSON.

A process per variant gives each one a clean peak-memory reading and keeps TRL's and
Accelerate's global state away from the others. Usage (by ``bench_step.py``):
``python benchmarks/worker.py SPEC.json``; the spec names the RM type, variant, precision,
batch, step counts and where to write the result.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.batches import BatchSpec, batch_pairs, chat_encoder, encoded_batch, padding_fraction  # noqa: E402
from benchmarks.flops import ModelShape, decoder_linear_shapes, distinct_tokens, useful_training_flops  # noqa: E402
from benchmarks.measure import MIB, PeakMemory, linear_layers_seconds, median, time_steps  # noqa: E402
from benchmarks import steps as bench_steps  # noqa: E402
from rm_lightning import ExplicitGenerativeRM, ExplicitRM, ImplicitRM  # noqa: E402
from rm_lightning.models.backbones import load_backbone  # noqa: E402
from rm_lightning.errors import exit_status  # noqa: E402
from rm_lightning.perf.process_tuning import tune_process  # noqa: E402
from rm_lightning.pairs import PairCollator  # noqa: E402

logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # the data module's summary
transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars
# ours, ours-ckpt, ours-lean and ours-compiled run the module's default, packed pairs with shared prefixes
OUR_LAYOUTS = {"ours-unshared": "unshared", "ours-bucketed": "bucketed", "ours-padded": "padded"}
RM_CLASSES = {"exrm": ExplicitRM, "imrm": ImplicitRM, "exgrm": ExplicitGenerativeRM}


def batch_stats(rm_type: str, shape: ModelShape, batch: dict[str, torch.Tensor]) -> dict:
    return {"tokens": int(batch["attention_mask"].sum()), "padded_tokens": int(batch["attention_mask"].numel()),
            "padding_fraction": padding_fraction(batch), "distinct_tokens": distinct_tokens(batch),
            "useful_flops": useful_training_flops(shape, rm_type, batch)}


def build_module_step(spec: dict) -> tuple[bench_steps.TrainingStep, dict]:
    """Ours (in one of its decoder layouts, with activation checkpointing, lean or compiled) or the naive
    step, ready to call, and what is known before it runs (batch statistics, the reference pass)."""
    device, variant, rm_type = spec["device"], spec["variant"], spec["rm"]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-ref-") as cache:
        extra = {"reference_cache_dir": cache} if rm_type == "imrm" else {}
        lean = variant == "ours-lean"  # and optimizer steps folded into backward
        module = RM_CLASSES[rm_type](backbone=spec["backbone"], activation_checkpointing=lean or variant == "ours-ckpt",
                                     optimizer_in_backward=lean, compile_layers=variant == "ours-compiled",
                                     **extra)
        module.to(device)
        if variant != "naive":
            bench_steps.use_decoder_layout(module, OUR_LAYOUTS.get(variant, "packed"))
        encoded = encoded_batch(BatchSpec.of_run(spec), module)
        result = {}
        if rm_type == "imrm" and variant != "naive":
            start = time.perf_counter()
            module.attach_reference_logps(encoded)
            result["reference_pass_s"] = time.perf_counter() - start
        module.configure_model()  # what a trainer does after setup: compiles the layers of ours-compiled
    batch = {key: value.to(device) for key, value in module.collator()(encoded.pairs).items()}
    result.update(batch_stats(rm_type, ModelShape.of(module.model), batch),
                  linear_shapes=decoder_linear_shapes(module.model))
    if variant == "naive":
        loss_fn = naive_loss(module, rm_type, batch, spec)
    else:
        loss_fn = bench_steps.our_loss(module, batch)
    return bench_steps.TrainingStep(loss_fn, module.configure_optimizers(), device, spec["precision"]), result


def run_module_step(spec: dict, memory: PeakMemory) -> dict:
    step, result = build_module_step(spec)
    memory.reset()
    times, warmup_s = time_steps(step, spec["warmup"], spec["steps"], spec["device"], spec["label"])
    phases = {name: median([p[name] for p in step.phases[spec["warmup"]:]]) for name in ("forward", "backward", "optimizer")}
    return {**result, "times": times, "warmup_s": warmup_s, "phases": phases, "first_loss": step.losses[0]}


def naive_loss(module, rm_type: str, batch, spec: dict):
    if rm_type == "imrm":
        reference, _ = load_backbone(spec["backbone"])
        reference.to(spec["device"]).eval().requires_grad_(False)
        return bench_steps.naive_imrm_loss(module, reference, batch)
    if rm_type == "exrm":
        return bench_steps.naive_exrm_loss(module, batch)
    return bench_steps.naive_exgrm_loss(module, batch)


def run_trl_peer(spec: dict, memory: PeakMemory) -> dict:
    """TRL's trainer; batch statistics come from rm-lightning's encoding of the same pairs."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from benchmarks.trl_peers import pretrained_path, run_trl

    measured = run_trl(spec, memory)
    path = pretrained_path(spec["backbone"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = chat_encoder(tokenizer)
    ours = [encoder.encode(p) for p in batch_pairs(BatchSpec.of_run(spec))]
    batch = PairCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)(ours)
    with torch.device("meta"):  # parameter shapes without allocating them
        shape = ModelShape.of(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)))
    same = measured.pop("chosen_ids") == [p.chosen_ids for p in ours]
    return {**batch_stats(spec["rm"], shape, batch), **measured, "same_tokens_as_ours": same}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    # every variant alike, TRL's too, before any model exists; "default": glibc's own behaviour
    keeps_freed_memory = tune_process(keep_freed=spec.get("host_memory", "kept") == "kept")  # as cli.py runs
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    is_trl = spec["variant"].startswith("trl")
    if is_trl:  # imported before the memory baseline, like torch and transformers
        import datasets  # noqa: F401
        import trl  # noqa: F401
    memory = PeakMemory(spec["device"])
    runner = run_trl_peer if is_trl else run_module_step
    result = runner(spec, memory)
    result.update(peak_mem_mb=memory.peak_bytes() / MIB, peak_includes_setup=memory.lifetime_peak,
                  keeps_freed_memory=keeps_freed_memory,
                  threads=torch.get_num_threads(), median_s=median(result["times"]))
    if spec.get("time_linear_layers") and not is_trl:  # once the step's time and peak memory are taken
        result["linear_layers_s"] = linear_layers_seconds(result["linear_shapes"], result["distinct_tokens"],
                                                          spec["device"], spec["precision"])
    target = Path(spec["result_path"])
    staging = target.with_suffix(f".tmp{os.getpid()}")
    staging.write_text(json.dumps(result, indent=1))
    os.replace(staging, target)


if __name__ == "__main__":
    sys.exit(exit_status(main, sys.argv[1]))
