"""The paper's §4 as tools: one-step reward changes, their closed forms, Theorem 2's exact ties, Theorem 1."""

import csv
import functools
import json

import lightning as L
import pytest
import torch

from data_modules import PersonaDataModule
from conftest import PROJECT_ROOT, tiny_override
from test_faults import interrupt_options
from rm_lightning import ExplicitGenerativeRM, ExplicitRM, ImplicitRM, PreferencePair, cli
from rm_lightning.dynamics import max_margin
from rm_lightning.dynamics.max_margin import accuracy, analyse, hard_margin_separator
from rm_lightning.dynamics.one_step import (loss_gradient, one_step_change, one_step_changes,
                                            predicted_by_backward, predicted_by_forward_mode,
                                            trainable_parameters)
from rm_lightning.dynamics.theorem1 import theorem1_check
from rm_lightning.errors import DataError, RMLightningError

TRAIN = [PreferencePair("Is the sky blue?", "Yes it is.", "No."), PreferencePair("Say hi", "hi there friend", "go away")]
PROBE = [PreferencePair("Is grass green?", "Yes it is.", "No way."), PreferencePair("Say bye", "bye friend", "go away now")]
ETAS = (1e-1, 1e-2, 1e-3)


def built(module_class, **kwargs):
    torch.manual_seed(0)
    if module_class is ImplicitRM:
        kwargs = {"beta": 0.5, "cache_reference": kwargs.get("trainable", "all") == "output_layer", **kwargs}
    return module_class(backbone="tiny-llama-chat", **kwargs)


def change(module, eta, **kwargs):
    encoder = module.pair_encoder()
    train = module.collator()(encoder.encode_all(TRAIN)[0])
    return one_step_change(module, train, encoder.encode_all(PROBE)[0], eta, **kwargs)


@pytest.mark.parametrize("eta", ETAS)
def test_exrm_head_only_step_is_exactly_the_closed_form_and_the_entk_prediction(eta):
    step = change(built(ExplicitRM, trainable="output_layer"), eta)
    torch.testing.assert_close(step.measured_margin, step.output_layer["hidden_similarity"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(step.predicted_margin, step.output_layer["hidden_similarity"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(step.predicted[:, 0] - step.predicted[:, 1], step.predicted_margin, rtol=1e-5,
                               atol=1e-8)


@pytest.mark.parametrize("eta", ETAS)
def test_imrm_unembedding_closed_form_splits_the_entk_prediction(eta):
    step = change(built(ImplicitRM, trainable="output_layer"), eta)
    total = step.output_layer["matching"] + step.output_layer["non_matching"]
    torch.testing.assert_close(total, step.predicted_margin, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("module_class, options", [(ExplicitRM, {"label_smoothing": 0.3}),
                                                    (ExplicitRM, {"center_rewards_coefficient": 1.0}),
                                                    (ImplicitRM, {"loss": "ipo"})])
def test_closed_forms_split_the_step_of_the_modules_own_loss(module_class, options):
    step = change(built(module_class, trainable="output_layer", **options), 1e-3)
    total = sum(step.output_layer.values())
    torch.testing.assert_close(total, step.predicted_margin, rtol=1e-4, atol=1e-7)


def test_a_frozen_output_layer_has_no_share_of_the_step():
    """LoRA freezes an IM-RM's unembedding (it has no closed-form terms); an EX-RM's head still trains."""
    assert change(built(ImplicitRM, lora={"r": 4, "alpha": 8}), 1e-2).output_layer == {}
    assert set(change(built(ExplicitRM, lora={"r": 4, "alpha": 8}), 1e-2).output_layer) == {"hidden_similarity"}


def test_a_step_under_bf16_autocast_is_measured_at_the_weights_precision():
    """Under a bf16-mixed run's context an eta-sized change is below bf16's resolution of the rewards."""
    bf16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    step = change(built(ExplicitRM, trainable="output_layer"), 2e-5, context=bf16)
    torch.testing.assert_close(step.measured_margin, step.predicted_margin, rtol=2e-2, atol=0)


def test_closed_forms_under_bf16_autocast_are_computed_in_float32():
    """Their products end in chosen-minus-rejected differences that a bf16 matmul cannot resolve."""
    bf16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    step = change(built(ExplicitRM, trainable="output_layer"), 2e-5, context=bf16)
    torch.testing.assert_close(step.output_layer["hidden_similarity"], step.measured_margin, rtol=2e-2, atol=0)


@pytest.mark.parametrize("module_class", [ExplicitRM, ImplicitRM, ExplicitGenerativeRM])
def test_forward_mode_prediction_equals_a_backward_pass_per_pair(module_class):
    module = built(module_class)
    encoder = module.pair_encoder()
    train = module.collator()(encoder.encode_all(TRAIN)[0])
    probes = encoder.encode_all(PROBE)[0]
    params = trainable_parameters(module)
    grads = loss_gradient(module, train, params)
    forward = predicted_by_forward_mode(module, params, grads, 1e-2, probes)
    _, backward = predicted_by_backward(module, params, grads, 1e-2, probes, rewards=True)
    torch.testing.assert_close(forward, backward, rtol=1e-4, atol=1e-9)


def test_probe_sets_sharing_one_training_gradient_change_as_each_alone():
    module = built(ImplicitRM)
    encoder = module.pair_encoder()
    train = module.collator()(encoder.encode_all(TRAIN)[0])
    probes = encoder.encode_all(PROBE)[0]
    shared = one_step_changes(module, train, {"first": probes[:1], "second": probes[1:]}, 1e-2)
    for name, pairs in (("first", probes[:1]), ("second", probes[1:])):
        alone = one_step_change(module, train, pairs, 1e-2)
        torch.testing.assert_close(shared[name].measured, alone.measured, rtol=0, atol=0)


# EX-GRM's rewards, p("Yes") ~ 0.004 here, move by less than float32 resolves at the smallest steps
@pytest.mark.parametrize("module_class, trainable, etas", [
    (ExplicitRM, "all", ETAS), (ImplicitRM, "all", ETAS), (ImplicitRM, "output_layer", ETAS),
    (ExplicitGenerativeRM, "all", (10.0, 1.0))])
def test_measured_change_tends_to_the_first_order_prediction(module_class, trainable, etas):
    module = built(module_class, trainable=trainable)
    errors = []
    for eta in etas:
        step = change(module, eta, closed_forms=False)
        errors.append(((step.measured_margin - step.predicted_margin).norm() / step.predicted_margin.norm()).item())
    assert errors[-1] < 0.02 and errors[-1] < errors[0]  # the error shrinks with the step, as first order says


def test_the_probe_leaves_weights_gradients_and_mode_as_it_found_them():
    module = built(ImplicitRM)
    module.train()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    module.model.lm_head.weight.grad = torch.ones_like(module.model.lm_head.weight)
    change(module, 1.0)
    assert all(torch.equal(p, before[name]) for name, p in module.named_parameters())
    assert torch.equal(module.model.lm_head.weight.grad, torch.ones_like(module.model.lm_head.weight))
    assert module.training


def test_the_probe_leaves_an_imrm_knowing_that_it_is_at_its_reference():
    """Else the first probe set's step is measured from an exact 0 to a policy-minus-reference reward."""
    module = built(ImplicitRM)
    change(module, 1e-3)
    assert module.policy_is_reference()


def test_output_layer_training_moves_only_the_output_layer():
    module = built(ImplicitRM, trainable="output_layer")
    assert [name for name, p in module.named_parameters() if p.requires_grad] == ["model.lm_head.weight"]
    head = built(ExplicitRM, trainable="output_layer")
    assert [name for name, p in head.named_parameters() if p.requires_grad] == ["head.weight"]


def single_token_persona(**kwargs) -> PersonaDataModule:
    """Byte-level tiny tokenizer: single characters are single tokens."""
    pools = {"chosen_tokens": ["a", "b"], "rejected_tokens": ["c", "d"], "paraphrased_chosen_tokens": ["e", "f"],
             "paraphrased_rejected_tokens": ["g", "h"]}
    return PersonaDataModule(num_train=16, num_test=8, batch_size=8, eval_batch_size=64, response_format="single_token",
                             **{**pools, **kwargs})


def test_theorem2_imrm_unseen_token_margins_stay_exactly_zero(tmp_path):
    torch.manual_seed(0)
    module = ImplicitRM(backbone="tiny-llama-chat", trainable="output_layer",
                        optimizer=lambda params: torch.optim.Adam(params, lr=0.05))
    trainer = L.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=15, default_root_dir=tmp_path)
    trainer.fit(module, single_token_persona())
    last = module.eval_sets.last
    assert last["original_train_prompts"]["accuracy"] == 1.0
    for name in ("paraphrased_train_prompts", "paraphrased_test_prompts"):
        assert last[name]["accuracy"] == 0.5  # every unseen pair a tie, exactly
        assert torch.all(last[name]["margins"] == 0)


def test_single_token_responses_are_checked_before_anything_is_tokenized():
    module = ExplicitRM(backbone="tiny-llama-chat")
    data = single_token_persona(paraphrased_rejected_tokens=["no way", "g"])
    with pytest.raises(DataError, match=r"'no way' \(6 tokens\)"):
        data.attach(module).setup("fit")
    with pytest.raises(DataError, match="unseen"):
        single_token_persona(paraphrased_chosen_tokens=["a", "e"]).attach(module).setup("fit")


def test_bare_responses_refuse_a_type_that_puts_the_response_in_its_prompt():
    with pytest.raises(DataError, match="assistant's turn"):
        single_token_persona().attach(ExplicitGenerativeRM(backbone="tiny-llama-chat")).setup("fit")


def test_a_single_token_response_has_nothing_after_it():
    module = ExplicitRM(backbone="tiny-llama-chat")
    data = single_token_persona()
    data.attach(module).setup("fit")
    for pair in data.train_set.pairs:
        assert len(pair.chosen_ids) - pair.chosen_start == 1 and len(pair.rejected_ids) - pair.rejected_start == 1


def test_hard_margin_separator_of_a_known_problem():
    differences = torch.tensor([[2.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    separator = hard_margin_separator(differences)
    torch.testing.assert_close(separator.direction, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-6, rtol=0)
    assert separator.support_vectors == 2 and separator.margin == pytest.approx(2 ** 0.5, rel=1e-6)
    with pytest.raises(RMLightningError, match="not linearly separable"):
        hard_margin_separator(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))


def test_max_margin_report_scores_eval_sets_with_the_separator_and_the_head():
    train = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    unseen = torch.tensor([[1.0, 1.0], [1.0, -3.0], [-2.0, 1.0]])  # u* = (0.5, 0.5) ranks one right; the head two
    report = analyse({"train": train, "paraphrased": unseen}, torch.tensor([1.0, 0.0]), {"paraphrased": "token_shift"})
    assert report["eval_sets"]["paraphrased"]["separator_accuracy"] == pytest.approx(1 / 3)
    assert report["eval_sets"]["paraphrased"]["head_accuracy"] == pytest.approx(2 / 3)
    assert report["head_cosine_to_separator"] == pytest.approx(2 ** -0.5)
    assert report["footnote3"]["paraphrased"]["inner_product"]["fraction_positive"] == pytest.approx(4 / 6)
    assert accuracy(torch.tensor([1.0, 0.0, -1.0])) == 0.5


def test_max_margin_takes_a_checkpoint_for_its_run_and_names_a_file_that_is_not_one(tmp_path):
    checkpoint = tmp_path / "version_0" / "checkpoints" / "epoch=1.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    (tmp_path / "version_0" / "config.yaml").write_text("{}")
    assert max_margin.run_and_checkpoint(checkpoint) == (tmp_path / "version_0", checkpoint)
    with pytest.raises(RMLightningError, match="config.yaml is a file: give a run directory"):
        max_margin.run_and_checkpoint(tmp_path / "version_0" / "config.yaml")


def test_max_margin_of_an_imrm_says_what_to_give_with_options_it_has(tmp_path, capsys):
    config = tmp_path / "imrm.yaml"
    config.write_text(f"compose: [{PROJECT_ROOT / 'configs/imrm_persona.yaml'}]\n"
                      f"model: {{init_args: {{backbone: tiny-llama-chat}}}}\n")
    assert max_margin.main(["--config", str(config)]) != 0
    error = capsys.readouterr().err
    assert "this model is ImplicitRM (give an EX-RM run, or --config with an EX-RM config)" in error


def test_max_margin_of_a_run_without_a_checkpoint_says_that_it_has_no_trained_head(tmp_path, capsys):
    run = tmp_path / "version_0"
    run.mkdir()
    (run / "config.yaml").write_text(
        "model: {class_path: rm_lightning.ExplicitRM, init_args: {backbone: tiny-llama-chat}}\n"
        "data: {class_path: data_modules.PersonaDataModule, init_args: {num_train: 8, num_test: 4}}\n"
        "trainer: {accelerator: cpu}\n")
    assert max_margin.main([str(run)]) == 0
    assert f"{run}: no checkpoint in checkpoints/: the initial model's features" in capsys.readouterr().out


def test_max_margin_help_names_where_a_config_analysis_is_written(capsys):
    with pytest.raises(SystemExit):
        max_margin.run(["--help"])
    assert "runs/max_margin/<config file stem>" in " ".join(capsys.readouterr().out.split())


def test_theorem1_margin_is_delta_while_generation_stays_bounded():
    result = theorem1_check(vertices=5, beta=0.01, delta=0.02, seed=1)
    assert result["min_margin"] == pytest.approx(0.02, abs=1e-12) and result["max_margin"] == pytest.approx(0.02, abs=1e-12)
    assert result["p_ref_correct"] < result["p_policy_correct"] <= result["bound"]
    assert result["bound"] == pytest.approx(torch.e ** 2 * result["p_ref_correct"])


def test_theorem1_bound_past_a_float_is_infinite_not_an_overflow():
    result = theorem1_check(beta=1e-5, delta=0.01)  # e^1000
    assert result["bound"] == float("inf") and result["p_policy_correct"] <= 1.0


def test_monitor_logs_every_eval_set_at_step_zero_and_every_n_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    override = tiny_override(tmp_path, max_steps=5, reference_cache_dir=tmp_path / "ref")
    cli.main(["fit", "--config", str(PROJECT_ROOT / "configs/dynamics_imrm_persona.yaml"), "--config", str(override),
              "--data.init_args.num_train", "20", "--data.init_args.num_test", "4",
              "--trainer.callbacks.init_args.every_n_steps", "2", "--trainer.callbacks.init_args.probe_pairs", "3"])
    (run,) = tmp_path.glob("lightning_logs/version_*")
    rows = list(csv.DictReader(open(run / "dynamics.csv")))
    sets = {"original_train_prompts", "original_test_prompts", "paraphrased_train_prompts", "paraphrased_test_prompts"}
    assert {(int(r["step"]), r["set"]) for r in rows} == {(step, name) for step in (0, 2, 4) for name in sets}
    assert all(r["matching"] and r["non_matching"] and not r["hidden_similarity"] for r in rows)  # IM-RM terms
    assert (run / "dynamics.png").stat().st_size > 1000
    events = EventAccumulator(str(run))
    events.Reload()
    assert {f"dynamics/{name}/{key}" for name in sets for key in ("real_margin_change", "ntk_margin_change", "matching")} \
        <= set(events.Tags()["scalars"])


def test_the_monitor_plot_names_every_step_size_a_schedule_gave(tmp_path, monkeypatch):
    from rm_lightning.dynamics import monitor

    figures = []
    monkeypatch.setattr(monitor, "save_figure_atomically", lambda figure, path: figures.append(figure))
    rows = [{"step": step, "set": "s", "eta": eta, "real_margin_change": 0.0, "sgd_margin_change": 0.0}
            for step, eta in ((0, 2e-6), (5, 2e-5))]
    monitor.plot_dynamics(rows, tmp_path / "dynamics.png")
    assert figures[0].axes[len(figures[0].axes) // 2].get_ylabel() == "one SGD step (eta = 2e-06 to 2e-05)"


def test_monitor_refuses_several_processes():
    from types import SimpleNamespace

    from rm_lightning.dynamics import DynamicsMonitor

    with pytest.raises(RMLightningError, match="needs one process"):
        DynamicsMonitor().setup(SimpleNamespace(world_size=2), None, "fit")


def dynamics_fit(root, *args: str, interrupt_at: int | None = None) -> int:
    """A tiny dynamics IM-RM fit under ``root`` (a check every 2 steps); its exit status."""
    override = tiny_override(root, max_epochs=2, max_steps=-1, reference_cache_dir=root.parent / "ref")
    extra = [] if interrupt_at is None else interrupt_options(root, interrupt_at)
    try:
        cli.main(["fit", "--config", str(PROJECT_ROOT / "configs/dynamics_imrm_persona.yaml"), "--config",
                  str(override), "--data.init_args.num_train", "12", "--data.init_args.num_test", "4",
                  "--trainer.callbacks.init_args.every_n_steps", "2", "--trainer.callbacks.init_args.probe_pairs", "2",
                  *extra, "--trainer.enable_progress_bar", "false", "--last_checkpoint.every_minutes", "0", *args])
    except SystemExit as exited:
        return exited.code
    return 0


def test_an_interrupted_monitor_keeps_the_checks_it_finished(tmp_path):
    assert dynamics_fit(tmp_path, interrupt_at=3) == 1
    (run,) = tmp_path.glob("lightning_logs/version_*")
    assert {int(r["step"]) for r in csv.DictReader(open(run / "dynamics.csv"))} == {0, 2}


def test_a_resumed_monitor_writes_the_checks_before_the_checkpoint(tmp_path):
    assert dynamics_fit(tmp_path, interrupt_at=5) == 1  # 3 steps an epoch: last.ckpt at step 3
    assert dynamics_fit(tmp_path, "--ckpt_path", "last") == 0
    resumed = tmp_path / "lightning_logs" / "version_1"
    assert sorted({int(r["step"]) for r in csv.DictReader(open(resumed / "dynamics.csv"))}) == [0, 2, 4]


def test_a_monitor_plot_that_cannot_be_written_is_a_warning_and_the_run_finishes(tmp_path, monkeypatch):
    from rm_lightning.dynamics import monitor

    def disk_full(figure, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(monitor, "save_figure_atomically", disk_full)
    with pytest.warns(UserWarning, match="could not write .*dynamics.png"):
        assert dynamics_fit(tmp_path) == 0
    (run,) = tmp_path.glob("lightning_logs/version_*")
    assert json.loads((run / "results.json").read_text())["status"] == "finished"


def test_two_monitors_of_a_run_keep_their_rows_apart_in_checkpoints():
    from rm_lightning.dynamics import DynamicsMonitor

    assert DynamicsMonitor(filename="a").state_key != DynamicsMonitor(filename="b", eta=1e-3).state_key


def test_under_bf16_mixed_the_real_sgd_step_is_the_analysed_one(tmp_path):
    """With plain SGD at eta = lr the optimizer's step is the analysed step: both changes scored alike."""
    assert dynamics_fit(tmp_path, "--trainer.max_steps", "1", "--trainer.precision", "bf16-mixed",
                        "--model.init_args.optimizer", "{class_path: torch.optim.SGD, init_args: {lr: 0.05}}") == 0
    (run,) = tmp_path.glob("lightning_logs/version_*")
    for row in csv.DictReader(open(run / "dynamics.csv")):
        assert float(row["real_margin_change"]) == pytest.approx(float(row["sgd_margin_change"]), rel=0.02)
