"""The training options TRL users expect: a per-pair margin, reward centering, label smoothing, and an IM-RM's
DPO-family losses (hinge, IPO), each against a value computed by hand, and refused in one line where they
cannot apply."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from conftest import PROJECT_ROOT, edge_case_pairs, ragged_pairs, tiny_override
from data_modules import PersonaDataModule
from rm_lightning import ExplicitGenerativeRM, ExplicitRM, ImplicitRM, cli
from rm_lightning.errors import SettingError
from rm_lightning.models.loss import PairLossOptions, bradley_terry_loss, preference_loss
from rm_lightning.perf.micro_batches import select_pairs
from rm_lightning.settings import check_config

CHOSEN, REJECTED = torch.tensor([1.0, 0.5, -0.2]), torch.tensor([0.0, 1.0, -0.4])
MARGIN = torch.tensor([0.5, 0.0, 2.0])


def softplus(x: float) -> float:
    """-log sigmoid(-x), by hand."""
    return math.log1p(math.exp(x))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def loss(**options) -> float:
    margin = options.pop("margin", None)
    return float(preference_loss(CHOSEN, REJECTED, margin, PairLossOptions(**options)))


def differences(margin=(0.0, 0.0, 0.0)) -> list[float]:
    return [c - r - m for c, r, m in zip(CHOSEN.tolist(), REJECTED.tolist(), margin)]


def test_sigmoid_is_the_bradley_terry_loss():
    expected = mean(softplus(-d) for d in differences())
    assert loss() == pytest.approx(expected, rel=1e-6)
    assert float(bradley_terry_loss(CHOSEN, REJECTED)) == pytest.approx(expected, rel=1e-6)


def test_margin_is_subtracted_from_each_pairs_reward_difference_as_in_trl():
    expected = mean(softplus(-d) for d in differences(MARGIN.tolist()))  # -logsigmoid(r+ - r- - margin)
    assert loss(margin=MARGIN) == pytest.approx(expected, rel=1e-6)
    assert loss(margin=MARGIN) > loss()  # positive margins ask for more


def test_centering_adds_the_coefficient_times_the_mean_squared_reward_sum():
    squares = mean((c + r) ** 2 for c, r in zip(CHOSEN.tolist(), REJECTED.tolist()))
    assert loss(center_rewards_coefficient=0.01) == pytest.approx(loss() + 0.01 * squares, rel=1e-6)


def test_label_smoothing_is_the_robust_cdpo_form():
    eps = 0.1
    expected = mean((1 - eps) * softplus(-d) + eps * softplus(d) for d in differences())
    assert loss(label_smoothing=eps) == pytest.approx(expected, rel=1e-6)


def test_hinge_and_ipo_are_trls_losses_of_the_log_ratio_difference():
    beta = 0.1
    ratios = [d / beta for d in differences()]  # h: an IM-RM's reward is beta times its log-ratio
    assert loss(kind="hinge", beta=beta) == pytest.approx(mean(max(0.0, 1 - beta * h) for h in ratios), rel=1e-6)
    assert loss(kind="ipo", beta=beta) == pytest.approx(mean((h - 1 / (2 * beta)) ** 2 for h in ratios), rel=1e-6)


def test_module_loss_reads_the_batch_margin_and_its_options():
    module = ExplicitRM(backbone="tiny-llama", center_rewards_coefficient=0.5, label_smoothing=0.2)
    batch = module.collator()(edge_case_pairs(len(module.tokenizer)))
    batch["margin"] = torch.linspace(-1.0, 1.0, batch["input_ids"].shape[0] // 2)
    value, chosen, rejected = module.pair_loss(batch)
    options = PairLossOptions(label_smoothing=0.2, center_rewards_coefficient=0.5)
    assert torch.equal(value, preference_loss(chosen, rejected, batch["margin"], options))
    assert not torch.equal(value, preference_loss(chosen, rejected, None, options))


@pytest.mark.parametrize("kind", ["hinge", "ipo"])
def test_imrm_trains_with_the_chosen_dpo_family_loss(kind):
    module = ImplicitRM(backbone="tiny-llama", beta=0.1, reference="none", loss=kind)
    batch = module.collator()(edge_case_pairs(len(module.tokenizer)))
    value, chosen, rejected = module.pair_loss(batch)
    assert torch.equal(value, preference_loss(chosen, rejected, None, PairLossOptions(kind=kind, beta=0.1)))


def test_exgrm_bt_loss_takes_the_options_on_p_yes():
    module = ExplicitGenerativeRM(backbone="tiny-llama", label_smoothing=0.1)
    batch = module.collator()(edge_case_pairs(len(module.tokenizer)))
    batch["margin"] = torch.full((batch["input_ids"].shape[0] // 2,), 0.25)
    value, chosen, rejected = module.pair_loss(batch)
    assert torch.equal(value, preference_loss(chosen, rejected, batch["margin"], PairLossOptions(label_smoothing=0.1)))


def test_micro_batches_split_the_margin_and_keep_the_mean_over_all_pairs():
    module = ImplicitRM(backbone="tiny-llama", reference="none", beta=0.1, center_rewards_coefficient=0.3)
    batch = module.collator()(ragged_pairs(len(module.tokenizer), seed=4) + edge_case_pairs(len(module.tokenizer)))
    pairs = batch["input_ids"].shape[0] // 2
    batch["margin"] = torch.arange(pairs, dtype=torch.float32) / 10
    assert torch.equal(select_pairs(batch, [3, 1])["margin"], batch["margin"][[3, 1]])
    with torch.no_grad():
        whole, _, _ = module.micro_batched_pair_loss(batch)
        module.resolved_token_budget = 100
        assert len(module.micro_batch_plan(batch)) > 1
        split, _, _ = module.micro_batched_pair_loss(batch)
    assert float(split) == pytest.approx(float(whole), rel=1e-5)


@pytest.mark.parametrize("build, message", [
    (lambda: ImplicitRM(backbone="tiny-llama", loss="hinge", label_smoothing=0.1),
     "label_smoothing applies to the sigmoid (BT) loss only"),
    (lambda: ImplicitRM(backbone="tiny-llama", loss="dpo"), "model.loss: expected one of bt, sigmoid, hinge, ipo"),
    (lambda: ExplicitRM(backbone="tiny-llama", label_smoothing=0.5), "model.label_smoothing: expected a number in [0, 0.5)"),
    (lambda: ExplicitRM(backbone="tiny-llama", center_rewards_coefficient=-1.0),
     "model.center_rewards_coefficient: expected a finite number >= 0"),
    (lambda: ExplicitGenerativeRM(backbone="tiny-llama", loss="yes_no_ce", center_rewards_coefficient=0.1),
     "model.center_rewards_coefficient: applies to the bt loss only"),
])
def test_options_that_cannot_apply_are_refused_before_the_model_loads(build, message, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the options were checked")

    monkeypatch.setattr("rm_lightning.models.reward_module.load_backbone", no_loading)
    with pytest.raises(SettingError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        build()


def test_config_check_names_the_option():
    with pytest.raises(SettingError, match="model.init_args.loss: expected one of"):
        check_config({"model": {"init_args": {"loss": "dpo"}}})
    with pytest.raises(SettingError, match="model.init_args.label_smoothing"):
        check_config({"model": {"init_args": {"label_smoothing": -0.1}}})


def test_cli_fits_an_imrm_with_ipo_and_the_bt_options(tmp_path):
    override = tiny_override(tmp_path, max_steps=2, reference_cache_dir=tmp_path / "ref")
    cli.main(["fit", "--config", str(PROJECT_ROOT / "configs/imrm_persona.yaml"), "--config", str(override),
              "--data.init_args.num_train", "8", "--data.init_args.num_test", "4", "--trainer.limit_val_batches", "0",
              "--model.init_args.loss", "ipo", "--model.init_args.center_rewards_coefficient", "0.1"])
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert checkpoint["hyper_parameters"]["loss"] == "ipo"
    assert checkpoint["hyper_parameters"]["center_rewards_coefficient"] == 0.1


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradients_are_clipped_under_bf16_mixed_with_the_fused_adam_the_configs_use(algorithm, tmp_path):
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer, which only matters with a
    GradScaler (16-mixed); bf16-mixed has none."""
    override = tiny_override(tmp_path, max_steps=2)
    cli.main(["fit", "--config", str(PROJECT_ROOT / "configs/exrm_persona.yaml"), "--config", str(override),
              "--data.init_args.num_train", "8", "--data.init_args.num_test", "4", "--trainer.limit_val_batches", "0",
              "--trainer.precision", "bf16-mixed", "--trainer.gradient_clip_val", "0.5",
              "--trainer.gradient_clip_algorithm", algorithm])
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2


class GradientNorms(L.Callback):
    """The gradients' total norm as the optimizer's step starts (Lightning's hook before it runs before clipping)."""

    def __init__(self):
        self.norms = []

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_pre_hook(self.record)

    def record(self, optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        scale = getattr(optimizer, "grad_scale", None)  # a fused step divides by it when the scaler sets it
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)) / (1.0 if scale is None else float(scale)))


def test_gradients_are_unscaled_then_clipped_under_16_mixed_with_a_fused_adam():
    """16-mixed has a GradScaler (on a GPU; here its CPU one): Lightning refused to clip for a fused optimizer
    at the first step. The gradients the optimizer steps with are the true ones, clipped."""
    module = ExplicitRM(backbone="tiny-llama-chat", optimizer=lambda params: torch.optim.Adam(params, fused=True))
    norms = GradientNorms()
    trainer = L.Trainer(accelerator="cpu", plugins=[MixedPrecision("16-mixed", "cpu")], gradient_clip_val=1e-3,
                        max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[norms])
    trainer.fit(module, PersonaDataModule(num_train=8, num_test=4, batch_size=4))
    assert norms.norms == pytest.approx([1e-3, 1e-3], rel=1e-2)
