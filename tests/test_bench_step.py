"""The step benchmark: its naive step computes the same loss as ours, its batches and FLOP counts
are what they claim, and one command runs end to end (tiny model, TRL skipped)."""

import copy
import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT))  # benchmarks/ is a folder of scripts, not an installed package

from benchmarks import summary as report  # noqa: E402
from benchmarks.batches import (  # noqa: E402
    PERSONA_MAX_PAIRS, ULTRAFEEDBACK_FILE, BatchSpec, encoded_batch, padding_fraction, select_padding_heavy_rows,
)
from benchmarks.flops import ModelShape, decoder_linear_shapes, distinct_tokens, useful_training_flops  # noqa: E402
from benchmarks.measure import PeakMemory, linear_layers_seconds, matmul_peak_gflops  # noqa: E402
from benchmarks.steps import (  # noqa: E402
    LAYOUTS, full_vocab_response_logps, naive_exrm_loss, naive_imrm_loss, our_loss, use_decoder_layout,
)
from benchmarks.random_backbone import write_random_backbone  # noqa: E402
from rm_lightning import ExplicitRM, ImplicitRM  # noqa: E402
from rm_lightning.models.backbones import load_backbone, tiny_llama  # noqa: E402
from rm_lightning.errors import BackboneError, DataError  # noqa: E402
from rm_lightning.pairs import EncodedPair, PairCollator  # noqa: E402


@pytest.fixture(scope="module")
def imrm_and_batch():
    module = ImplicitRM(backbone="tiny-llama-chat", reference="none", beta=1.0)
    batch = module.collator()(encoded_batch(BatchSpec("persona"), module).pairs)
    return module, batch


def test_naive_full_vocab_logps_match_selective_logps(imrm_and_batch):
    module, batch = imrm_and_batch
    with torch.no_grad():
        naive = full_vocab_response_logps(module.model, batch)
        ours = module.response_logps(module.hidden_states(batch), batch)
    torch.testing.assert_close(naive, ours, atol=1e-4, rtol=1e-5)


def test_naive_imrm_with_the_initial_reference_gives_log_2(imrm_and_batch):
    module, batch = imrm_and_batch
    reference = copy.deepcopy(module.model).eval().requires_grad_(False)
    assert naive_imrm_loss(module, reference, batch)().item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_naive_exrm_loss_equals_ours_in_every_decoder_layout():
    module = ExplicitRM(backbone="tiny-llama-chat", head_init="normal")  # a zero head makes every loss log 2
    batch = module.collator()(encoded_batch(BatchSpec("persona"), module).pairs)
    naive = naive_exrm_loss(module, batch)().item()
    for layout in LAYOUTS:
        use_decoder_layout(module, layout)
        assert our_loss(module, batch)().item() == pytest.approx(naive, abs=1e-6), layout


def test_useful_flops_count_distinct_real_tokens_and_the_head_where_read():
    module = ImplicitRM(backbone="tiny-llama", reference="none")
    shape = ModelShape.of(module.model)
    config = module.model.config
    assert shape.vocab == len(module.tokenizer) and shape.layers == config.num_hidden_layers
    embedding_and_head = 2 * shape.vocab * shape.hidden  # untied in tiny-llama
    assert shape.decoder_params == sum(p.numel() for p in module.model.parameters()) - embedding_and_head
    batch = PairCollator(0)([EncodedPair([5, 6, 7, 8], 2, [5, 6, 9], 2)])
    # the rejected row's first two tokens are the chosen row's: only its third is new work
    attention = 4 * shape.hidden * shape.layers * (4 * 5 / 2 + 3)
    forward = 2 * shape.decoder_params * 5 + attention
    assert useful_training_flops(shape, "imrm", batch) == pytest.approx(3 * (forward + 2 * shape.hidden * shape.vocab * 3))
    assert useful_training_flops(shape, "exrm", batch) == pytest.approx(3 * (forward + 2 * shape.hidden * 2))
    assert distinct_tokens(batch) == 5


def test_decoder_linear_shapes_hold_every_decoder_matmul_parameter_but_no_head():
    model = ImplicitRM(backbone="tiny-llama", reference="none").model
    shapes = decoder_linear_shapes(model)
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    assert sum(fan_in * fan_out * count for fan_in, fan_out, count in shapes) == ModelShape.of(model).decoder_params - norms
    layers = model.config.num_hidden_layers
    assert [model.config.hidden_size, model.config.intermediate_size, 2 * layers] in shapes  # gate and up
    assert all(count % layers == 0 for _, _, count in shapes)


def test_ultrafeedback_batch_is_about_half_padding(shared_data):
    module = ExplicitRM(backbone="tiny-llama-chat")  # byte-level tokens, hence the wide rows
    rows = select_padding_heavy_rows(module.tokenizer, width=700)
    assert len(rows) == 8 and list(rows) == sorted(set(rows))
    batch = module.collator()(encoded_batch(BatchSpec("ultrafeedback", rows), module).pairs)
    assert 0.4 <= padding_fraction(batch) <= 0.6
    assert (shared_data / ULTRAFEEDBACK_FILE).is_file()


def test_peak_memory_is_the_resident_peak_above_the_size_after_imports(monkeypatch):
    status = {"VmRSS": 1000, "VmHWM": 5000}  # kB, as /proc/self/status gives them
    monkeypatch.setattr(PeakMemory, "_status_kib", staticmethod(lambda field: status[field]))
    memory = PeakMemory("cpu")
    status["VmHWM"] = 7000
    assert memory.peak_bytes() == (7000 - 1000) * 1024


def test_matmul_and_linear_layer_probes_give_sane_numbers():
    probe = matmul_peak_gflops("cpu", "fp32", budget_s=0.05, max_size=512)
    assert probe["gflops"] > 0 and probe["sizes"][0] == 256
    assert linear_layers_seconds([], 64, "cpu", "fp32") == 0
    seconds = linear_layers_seconds([[64, 128, 3]], 32, "cpu", "bf16")
    assert seconds > 0


def persona_imrm_run(variant, precision, seconds, memory=1000.0):
    return {"batch": "persona", "rm": "imrm", "variant": variant, "precision": precision, "median_s": seconds,
            "tokens": 800, "useful_flops": 4e11, "padding_fraction": 0.1, "peak_mem_mb": memory}


def test_ratios_and_targets_use_each_peer_at_its_best_precision():
    run = persona_imrm_run
    runs = [run("ours", "fp32", 4.0, 500.0), run("trl", "fp32", 12.0, 1000.0), run("trl", "bf16", 10.0, 900.0),
            run("naive", "fp32", 8.0), run("ours-ckpt", "fp32", 5.0, 450.0), run("trl-ckpt", "fp32", 14.0, 750.0)]
    peaks = {"fp32": 100.0, "bf16": 200.0}
    for r in runs:
        report.derive(r, peaks)
    report.add_ratios(runs)
    assert runs[0]["vs_trl"] == pytest.approx(2.5) and runs[0]["vs_naive"] == pytest.approx(2.0)
    assert runs[0]["mfu"] == pytest.approx(0.5) and runs[0]["mfu_own_precision"] == pytest.approx(1.0)
    goals = {g.name: g for g in report.targets(runs, peaks)}
    assert goals["persona IM-RM throughput / TRL DPOTrainer"].value == pytest.approx(2.5)
    assert goals["persona IM-RM throughput / TRL DPOTrainer"].met is False
    assert goals["persona IM-RM peak memory / TRL DPOTrainer"].value == pytest.approx(450 / 750)
    assert goals["persona IM-RM peak memory / TRL DPOTrainer"].met is True
    assert goals["persona EX-RM throughput / TRL RewardTrainer"].met is None
    assert "DPOTrainer+ckpt" in report.table(runs)


def test_compiled_runs_count_for_ours_and_for_trl_alike():
    run = persona_imrm_run
    runs = [run("ours", "bf16", 4.0), run("ours-compiled", "bf16", 2.5), run("trl", "bf16", 10.0),
            run("trl-compiled", "bf16", 7.5)]
    peaks = {"fp32": 100.0, "bf16": 400.0}
    for r in runs:
        report.derive(r, peaks)
    report.add_ratios(runs)
    goals = {g.name: g for g in report.targets(runs, peaks)}
    assert goals["persona IM-RM throughput / TRL DPOTrainer"].value == pytest.approx(3.0)  # 7.5 / 2.5
    share = goals["persona IM-RM linear layers' share of the step"]  # on a CPU: the linear layers' share
    assert share.value is None and "ours-compiled bf16" in share.detail and "MFU 40%" in share.detail
    timed = {**run("ours-compiled", "bf16", 2.5), "linear_layers_s": 1.0, "distinct_tokens": 100,
             "linear_shapes": [[1000, 1000, 300]]}  # 6 * 100 * 3e8 = 1.8e11 FLOPs in 1 s
    report.derive(timed, peaks)
    assert timed["linear_layers_gflops"] == pytest.approx(180) and timed["linear_layers_share"] == pytest.approx(0.4)
    goals = {g.name: g for g in report.targets([timed], peaks)}
    share = goals["persona IM-RM linear layers' share of the step"]
    assert share.value == pytest.approx(0.4) and share.met is False
    assert "linear layers alone 40% of the step, at 180 GFLOP/s" in share.detail
    assert "DPOTrainer+compiled" in report.table(runs)


def test_padding_target_compares_unshared_packing_with_padding_at_one_precision():
    def run(variant, precision, seconds):
        return {"batch": "ultrafeedback", "rm": "exrm", "variant": variant, "precision": precision,
                "median_s": seconds, "padding_fraction": 0.5}

    runs = [run("ours-unshared", "bf16", 5.0), run("ours-padded", "bf16", 10.0), run("ours", "bf16", 4.0),
            run("ours-padded", "fp32", 6.0), run("ours-unshared", "fp32", 5.5)]
    target = report.padding_target(runs, "exrm")
    assert target.value == pytest.approx(0.5) and target.met is True
    assert "with shared prompts 0.40" in target.detail and "bf16" in target.detail
    assert report.padding_target(runs, "imrm").met is None


@pytest.mark.slow
def test_one_command_runs_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    command = [sys.executable, str(PROJECT_ROOT / "benchmarks" / "bench_step.py"), "--backbone", "tiny-llama-chat",
               "--rm", "exrm", "--batches", "persona", "--variants", "ours", "naive", "--steps", "1", "--warmup", "0",
               "--precision", "fp32",  # fp32: bf16 only where it pays
               "--skip-trl", "--pairs", "12", "--peak-budget", "0.02", "--out", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "Targets:" in completed.stdout and "12 pairs a batch" in completed.stdout
    results = json.loads(out.read_text())
    assert [r["variant"] for r in results["runs"]] == ["ours", "naive"]
    for run in results["runs"]:
        assert "error" not in run and run["median_s"] > 0 and run["peak_mem_mb"] > 0
        assert run["pairs"] == 12 and run["pairs_per_s"] == pytest.approx(12 / run["median_s"])
        assert run["first_loss"] == pytest.approx(results["runs"][0]["first_loss"], abs=1e-5)
    ours, naive = results["runs"]
    assert ours["linear_layers_s"] > 0 and ours["linear_layers_gflops"] > 0 and 0 < ours["linear_layers_share"]
    assert "linear_layers_s" not in naive  # the layers are timed for the runs the MFU target reads
    assert "linear layers alone" in completed.stdout


def test_a_bigger_persona_batch_starts_with_the_usual_eight_pairs():
    module = ExplicitRM(backbone="tiny-llama-chat")
    usual = encoded_batch(BatchSpec("persona"), module).pairs
    bigger = encoded_batch(BatchSpec("persona", pairs=100), module).pairs
    assert len(usual) == 8 and len(bigger) == 100 and bigger[:8] == usual
    with pytest.raises(DataError, match=str(PERSONA_MAX_PAIRS)):
        encoded_batch(BatchSpec("persona", pairs=PERSONA_MAX_PAIRS + 1), module)


def step_target(linear_layers_s: float, device: str):
    """The step target of a 1-second IM-RM step whose linear layers alone took ``linear_layers_s``."""
    run = {**persona_imrm_run("ours", "bf16", 1.0), "linear_layers_s": linear_layers_s, "distinct_tokens": 100,
           "linear_shapes": [[1000, 1000, 300]]}
    peaks = {"fp32": 100.0, "bf16": 1000.0}
    report.derive(run, peaks)
    name = ("persona IM-RM MFU (vs the machine's matmul peak)" if device == "cuda"
            else "persona IM-RM linear layers' share of the step")
    return {g.name: g for g in report.targets([run], peaks, device)}[name]


def test_step_goal_is_mfu_on_cuda_and_the_linear_layers_share_on_a_cpu():
    gpu = step_target(0.55, "cuda")
    assert gpu.goal == 0.45 and gpu.value == pytest.approx(0.4) and gpu.met is False
    cpu = step_target(0.55, "cpu")
    assert cpu.goal == 0.5 and cpu.value == pytest.approx(0.55) and cpu.met is True


def test_random_backbone_keeps_the_tokenizer_and_shape_with_new_weights(tmp_path):
    model, tokenizer = tiny_llama(chat=True)
    model.save_pretrained(tmp_path / "source")
    tokenizer.save_pretrained(tmp_path / "source")
    out = write_random_backbone(tmp_path / "random", tokenizer_dir=tmp_path / "source", seed=1)
    loaded, loaded_tokenizer = load_backbone(str(out))
    assert loaded_tokenizer.chat_template == tokenizer.chat_template and len(loaded_tokenizer) == len(tokenizer)
    assert loaded.config.hidden_size == model.config.hidden_size
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert not torch.equal(loaded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(BackboneError, match="unknown shape"):
        write_random_backbone(tmp_path / "other", shape="llama-70b", tokenizer_dir=tmp_path / "source")
    with pytest.raises(BackboneError, match="config.json"):
        write_random_backbone(tmp_path / "other", tokenizer_dir=tmp_path)
    model.config.save_pretrained(tmp_path / "config_only")
    with pytest.raises(BackboneError, match="tokenizer"):
        write_random_backbone(tmp_path / "other", tokenizer_dir=tmp_path / "config_only")


@pytest.mark.slow
def test_profile_command_prints_the_operator_table():
    command = [sys.executable, str(PROJECT_ROOT / "benchmarks" / "profile_step.py"), "--backbone", "tiny-llama-chat",
               "--rm", "exrm", "--warmup", "1", "--steps", "1", "--rows", "5", "--precision", "fp32"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "a step under the profiler" in completed.stdout


def graph_node_names(loss: torch.Tensor) -> set[str]:
    """The autograd node types behind ``loss``, as this torch names them."""
    names, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        names.add(node.name())
        stack += [next_node for next_node, _ in node.next_functions if next_node is not None]
    return names


def test_backward_node_clock_splits_the_backward_between_its_nodes():
    from benchmarks.backward_nodes import BackwardNodeClock

    weight = torch.randn(8, 8, requires_grad=True)
    inputs = torch.randn(4, 8)
    clock = BackwardNodeClock()
    loss_fn = clock.wrap(lambda: (inputs @ weight).relu().sum())
    for _ in range(2):
        loss = loss_fn()
        start = time.perf_counter()
        loss.backward()
        clock_total = time.perf_counter() - start
    seconds, calls = clock.per_node_type([0.5, clock_total])[-1]
    assert dict(calls) == {name: 1 for name in graph_node_names(loss_fn())}  # every node of the graph, once
    assert sum(seconds.values()) == pytest.approx(clock_total)  # the nodes tile the backward
    assert all(value >= 0 for value in seconds.values())
    table = clock.table([0.5, clock_total], rows=10)
    assert all(name in table for name in calls) and "backward, wall clock" in table


@pytest.mark.slow
def test_profile_command_times_backward_nodes_without_the_profiler():
    command = [sys.executable, str(PROJECT_ROOT / "benchmarks" / "profile_step.py"), "--backbone", "tiny-llama-chat",
               "--rm", "imrm", "--warmup", "1", "--steps", "2", "--rows", "5", "--precision", "fp32",
               "--backward-nodes"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "backward by autograd node over 2 steps" in completed.stdout
    assert "backward, wall clock" in completed.stdout


def test_backward_nodes_refuse_a_gpu_and_a_trace(capsys):
    from benchmarks.profile_step import parse_args

    for extra in (["--device", "cuda"], ["--trace", "trace.json"]):
        with pytest.raises(SystemExit) as refused:
            parse_args(["--backward-nodes", *extra])
        assert refused.value.code == 2 and "--backward-nodes times a CPU backward" in capsys.readouterr().err


def test_a_linear_layer_share_over_the_whole_step_is_not_read_as_met():
    cpu = step_target(1.15, "cpu")
    assert cpu.met is None and "disturbed reading" in cpu.detail
