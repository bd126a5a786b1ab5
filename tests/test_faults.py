"""Nothing lost, nothing silently wrong: results that survive faults, run directories that never collide,
exact determinism and resume. Tiny model, in-process (``cli.main``), seconds each."""

import json
import os
import signal
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn

from conftest import PROJECT_ROOT, tiny_override
from rm_lightning import cache_entries, cli
from rm_lightning.callbacks import margin_history
from rm_lightning.callbacks.margin_history import MarginHistory
from rm_lightning.callbacks.run_directory import LOCK_FILENAME, RunClaim, claim_version, holder_of
from rm_lightning.dynamics import DynamicsMonitor
from rm_lightning.errors import SettingError
from rm_lightning.pairs import LengthBucketSampler, ResumableLoader

EXRM = str(PROJECT_ROOT / "configs" / "exrm_persona.yaml")
SMALL = ["--data.init_args.num_train", "8", "--data.init_args.num_test", "4", "--trainer.enable_progress_bar", "false"]
EVERY_EPOCH = ["--last_checkpoint.every_minutes", "0"]  # last.ckpt at every epoch's end, not only at the end of fit


class InterruptAt(L.Callback):
    """Ctrl-C as Lightning sees it (a KeyboardInterrupt out of a training step), or a crash there."""

    def __init__(self, step: int, crash: bool = False):
        self.step, self.crash = step, crash

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("boom") if self.crash else KeyboardInterrupt


def interrupt_options(root: Path, step: int, crash: bool = False) -> list[str]:
    """A second ``--config`` adding ``InterruptAt`` to a config's callbacks."""
    callback = root / "interrupt.yaml"
    callback.write_text(f"trainer:\n  callbacks+:\n    - class_path: test_faults.InterruptAt\n"
                        f"      init_args: {{step: {step}, crash: {str(crash).lower()}}}\n")
    return ["--config", str(callback)]


@pytest.fixture(autouse=True)
def sigint_restored():
    """Lightning ignores SIGINT after a KeyboardInterrupt (for its shutdown); give pytest its Ctrl-C back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def fit(root: Path, *args: str, max_epochs: int = 2, max_steps: int = -1, interrupt_at: int | None = None,
        crash: bool = False) -> int:
    """``fit`` of the Persona EX-RM on the tiny model under ``root``; the exit status (0 when it returned)."""
    root.mkdir(parents=True, exist_ok=True)
    override = tiny_override(root, max_epochs=max_epochs, max_steps=max_steps)
    extra = [] if interrupt_at is None else interrupt_options(root, interrupt_at, crash)
    try:
        cli.main(["fit", "--config", EXRM, "--config", str(override), *extra, *SMALL, *args])
    except SystemExit as exited:
        return exited.code
    return 0


def versions(root: Path) -> list[Path]:
    return sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def train_steps(run: Path) -> list[int]:
    """The steps of the training rows of a run's margin_history.csv (a row after each optimizer step)."""
    rows = (run / "margin_history.csv").read_text().splitlines()
    return [int(row.split(",")[0]) for row in rows if ",train,train," in row]


def logged_train_steps(run: Path) -> list[int]:
    """The steps this process logged a training loss at (TensorBoard): where a resumed fit went on from."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 1})
    events.Reload()
    return [event.step for event in events.Scalars("train/loss")]


def metrics(record: dict) -> dict:
    return {name: {k: v for k, v in values.items()} for name, values in record["eval_sets"].items()}


# --- results that survive faults -----------------------------------------------------------------


def test_max_steps_mid_epoch_evaluates_the_final_weights(tmp_path):
    assert fit(tmp_path, "--data.init_args.num_train", "16", max_epochs=2, max_steps=3) == 0
    record = results(versions(tmp_path)[0])
    assert record["status"] == "finished" and record["global_step"] == 3 and record["eval_step"] == 3
    assert set(record["eval_sets"]) == {"original_train_prompts", "original_test_prompts",
                                        "paraphrased_train_prompts", "paraphrased_test_prompts"}


def test_max_steps_in_an_epoch_without_validation_evaluates_the_final_weights(tmp_path):
    assert fit(tmp_path, "--trainer.check_val_every_n_epoch", "2", max_epochs=2, max_steps=1) == 0
    record = results(versions(tmp_path)[0])
    assert record["status"] == "finished" and record["eval_step"] == record["global_step"] == 1


def test_a_time_limit_evaluates_the_weights_it_stops_at(tmp_path):
    assert fit(tmp_path, "--data.init_args.num_train", "64", "--trainer.max_time", "00:00:00:01", max_epochs=1) == 0
    record = results(versions(tmp_path)[0])
    assert record["status"] == "finished" and record["eval_step"] == record["global_step"] > 0


def test_a_fit_without_evaluation_is_not_evaluated_not_finished(tmp_path):
    assert fit(tmp_path, "--trainer.limit_val_batches", "0", max_epochs=1) == 0
    record = results(versions(tmp_path)[0])
    assert record["status"] == "not_evaluated" and record["eval_sets"] == {}


def test_ctrl_c_keeps_the_history_the_last_evaluation_and_says_interrupted(tmp_path):
    assert fit(tmp_path, *EVERY_EPOCH, max_epochs=3, interrupt_at=3) == 1  # 2 steps an epoch: mid second epoch
    run = versions(tmp_path)[0]
    record = results(run)
    assert record["status"] == "interrupted" and record["reason"] == "KeyboardInterrupt"
    assert record["global_step"] == 3 and record["eval_step"] == 2 and record["eval_sets"]
    assert train_steps(run) == [1, 2, 3]
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_a_crash_mid_training_keeps_the_history_and_says_failed(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, max_epochs=3, interrupt_at=3, crash=True)
    run = versions(tmp_path)[0]
    record = results(run)
    assert record["status"] == "failed" and record["reason"] == "RuntimeError: boom" and record["eval_step"] == 2
    assert record["stage"] == "fit"  # the command, not the loop it failed in ("train"): sweeps go by it
    assert (run / "margin_history.csv").is_file() and not (run / LOCK_FILENAME).exists()


def test_a_plot_that_cannot_be_written_is_a_warning_and_results_are_kept(tmp_path, monkeypatch):
    def disk_full(rows, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(margin_history, "plot_history", disk_full)
    with pytest.warns(UserWarning, match="could not write .*margin_history.png"):
        assert fit(tmp_path, max_epochs=1) == 0
    run = versions(tmp_path)[0]
    assert results(run)["status"] == "finished" and (run / "margin_history.csv").is_file()
    assert not (run / "margin_history.png").exists()


def disk_full_for(monkeypatch, name: str) -> None:
    """Writing a file called ``name`` stops half-way on a full disk (its staging file has its name inside)."""
    write_text = Path.write_text

    def half_then_full(self, text, *args, **kwargs):
        if f".{Path(name).stem}.tmp" in self.name:
            write_text(self, text[:len(text) // 2], *args, **kwargs)
            raise OSError(28, "No space left on device")
        return write_text(self, text, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", half_then_full)


@pytest.mark.parametrize("name", ["margin_history.csv", "results.json"])
def test_a_run_file_the_disk_refuses_is_one_line_naming_it_and_no_half_file(name, tmp_path, monkeypatch, capsys):
    # a full disk at the end of fit was a 100-line OSError traceback (twice over for margin_history.csv)
    disk_full_for(monkeypatch, name)
    assert fit(tmp_path, max_epochs=1) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"{name}: could not be written (No space left on device)" in line and "GiB free" in line
    run = versions(tmp_path)[0]
    assert not (run / name).exists() and not list(run.glob(".*.tmp*"))


@pytest.mark.parametrize("name", ["margin_history.csv", "results.json"])
def test_a_crash_whose_record_the_disk_refuses_still_ends_in_the_crash(name, tmp_path, monkeypatch):
    # the file that could not be written stood in for the crash: one line about a full disk, the cause unsaid
    disk_full_for(monkeypatch, name)
    with pytest.warns(UserWarning, match=f"{name}: could not be written"):
        with pytest.raises(RuntimeError, match="boom"):
            fit(tmp_path, max_epochs=3, interrupt_at=3, crash=True)
    assert not (versions(tmp_path)[0] / name).exists()


def test_shipped_configs_keep_only_the_last_checkpoint(tmp_path):
    assert fit(tmp_path, max_epochs=2) == 0
    assert sorted(p.name for p in (versions(tmp_path)[0] / "checkpoints").iterdir()) == ["last.ckpt"]


# --- determinism and resume ------------------------------------------------------------------------


def test_two_runs_with_one_seed_give_identical_metrics(tmp_path):
    assert fit(tmp_path / "a", max_epochs=2) == 0 and fit(tmp_path / "b", max_epochs=2) == 0
    first, second = (results(versions(tmp_path / name)[0]) for name in ("a", "b"))
    assert first["status"] == second["status"] == "finished"
    assert metrics(first) == metrics(second)


def test_a_run_killed_mid_epoch_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    assert fit(tmp_path / "whole", max_epochs=2) == 0
    assert fit(tmp_path / "cut", *EVERY_EPOCH, max_epochs=2, interrupt_at=3) == 1  # last.ckpt: the first epoch's
    assert fit(tmp_path / "cut", "--ckpt_path", "last", max_epochs=2) == 0
    whole, (cut, resumed) = results(versions(tmp_path / "whole")[0]), versions(tmp_path / "cut")
    assert results(cut)["status"] == "interrupted"
    assert results(resumed)["status"] == "finished" and results(resumed)["global_step"] == whole["global_step"] == 4
    assert len(logged_train_steps(resumed)) == 2  # only the second epoch: it went on from the first one's checkpoint
    assert metrics(results(resumed)) == metrics(whole)


def test_a_run_resumed_at_an_epochs_end_under_max_steps_trains_the_epochs_an_uninterrupted_one_trains(tmp_path):
    """With a max_steps (not reached), Lightning took an epoch-end last.ckpt for one from inside the epoch: one
    batch more in it, one epoch fewer after it (7 steps of 8), and no evaluation at the end."""
    limits = [*EVERY_EPOCH, "--trainer.max_steps", "100"]
    assert fit(tmp_path / "whole", *limits, max_epochs=3) == 0
    assert fit(tmp_path / "cut", *limits, max_epochs=3, interrupt_at=3) == 1  # last.ckpt: the first epoch's end
    assert fit(tmp_path / "cut", *limits, "--ckpt_path", "last", max_epochs=3) == 0
    (whole,), (_, resumed) = versions(tmp_path / "whole"), versions(tmp_path / "cut")
    assert train_rows(resumed) == train_rows(whole)


def test_a_resumed_run_writes_the_whole_margin_history(tmp_path):
    """The rows before the checkpoint travel in it: the resumed run's CSV is the uninterrupted run's."""
    assert fit(tmp_path / "whole", max_epochs=2) == 0
    assert fit(tmp_path / "cut", *EVERY_EPOCH, max_epochs=2, interrupt_at=3) == 1
    assert fit(tmp_path / "cut", "--ckpt_path", "last", max_epochs=2) == 0
    (whole,), (_, resumed) = versions(tmp_path / "whole"), versions(tmp_path / "cut")
    assert (resumed / "margin_history.csv").read_text() == (whole / "margin_history.csv").read_text()


def test_resuming_a_finished_run_says_that_nothing_was_left_to_train(tmp_path):
    assert fit(tmp_path, max_epochs=1) == 0
    with pytest.warns(UserWarning, match="no training step ran after resuming"):
        assert fit(tmp_path, "--ckpt_path", "last", max_epochs=1) == 0
    resumed = results(versions(tmp_path)[1])
    assert resumed["status"] == "not_evaluated" and "max_epochs (1) was already reached; raise it" in resumed["reason"]


EXACT = ["--data.init_args.num_train", "16", "--trainer.precision", "32-true"]  # 4 batches an epoch, no bf16 rounding


@pytest.fixture(scope="module")
def stopped_inside_an_epoch(tmp_path_factory) -> dict[str, Path]:
    """Two epochs of 4 batches: never stopped, and stopped by max_steps after batch 2 then resumed."""
    root = tmp_path_factory.mktemp("max_steps_resume")
    assert fit(root / "whole", *EXACT, max_epochs=2) == 0
    assert fit(root / "cut", *EXACT, max_epochs=2, max_steps=2) == 0
    assert fit(root / "cut", *EXACT, "--ckpt_path", "last", max_epochs=2) == 0
    (whole,), (cut, resumed) = versions(root / "whole"), versions(root / "cut")
    return {"whole": whole, "cut": cut, "resumed": resumed}


def train_rows(run: Path) -> list[str]:
    """margin_history.csv's training rows: step, epoch and the batch's metrics, one per optimizer step."""
    return [row for row in (run / "margin_history.csv").read_text().splitlines() if ",train,train," in row]


def test_a_run_stopped_by_max_steps_inside_an_epoch_resumes_the_batches_it_left(stopped_inside_an_epoch):
    """The resumed fit goes on inside the epoch: the same batches, in the same order, as a run never stopped."""
    runs = stopped_inside_an_epoch
    assert train_rows(runs["resumed"]) == train_rows(runs["whole"])


def test_a_run_stopped_by_max_steps_inside_an_epoch_resumes_to_the_uninterrupted_metrics(stopped_inside_an_epoch):
    runs = stopped_inside_an_epoch
    assert metrics(results(runs["resumed"])) == metrics(results(runs["whole"]))


def test_a_run_stopped_inside_its_first_epoch_says_epoch_0(stopped_inside_an_epoch):
    assert results(stopped_inside_an_epoch["cut"])["epoch"] == 0


def test_a_run_resumed_at_an_epochs_end_with_loader_workers_trains_that_epochs_batches(tmp_path):
    """Workers take their first indices when Lightning first iterates, before it sets the resumed epoch."""
    workers = [*EXACT, "--data.init_args.num_workers", "1"]
    assert fit(tmp_path / "whole", *workers, max_epochs=2) == 0
    assert fit(tmp_path / "cut", *workers, max_epochs=2, max_steps=4) == 0
    assert fit(tmp_path / "cut", *workers, "--ckpt_path", "last", max_epochs=2) == 0
    (whole,), (_, resumed) = versions(tmp_path / "whole"), versions(tmp_path / "cut")
    assert train_rows(resumed) == train_rows(whole)


def bucketed_loader(epoch: int) -> ResumableLoader:
    lengths = [5, 1, 4, 2, 8, 3, 7, 6, 9, 0]
    sampler = LengthBucketSampler(lengths, batch_size=2, seed=3)
    sampler.set_epoch(epoch)
    return ResumableLoader(list(range(len(lengths))), batch_size=2, sampler=sampler)


def test_a_loader_restored_inside_an_epoch_yields_the_batches_that_epoch_had_left():
    stopped = bucketed_loader(epoch=1)
    batches = iter(stopped)
    next(batches), next(batches)
    restored = bucketed_loader(epoch=1)
    restored.load_state_dict(stopped.state_dict())
    assert [b.tolist() for b in restored] == [b.tolist() for b in bucketed_loader(epoch=1)][2:]


def test_a_loader_restored_from_an_epochs_end_yields_the_whole_next_epoch():
    finished = bucketed_loader(epoch=0)
    list(finished)
    restored = bucketed_loader(epoch=1)
    restored.load_state_dict(finished.state_dict())
    assert [b.tolist() for b in restored] == [b.tolist() for b in bucketed_loader(epoch=1)]


def test_resuming_at_max_steps_inside_an_epoch_names_only_max_steps(tmp_path):
    assert fit(tmp_path, "--data.init_args.num_train", "16", max_epochs=1, max_steps=2) == 0
    with pytest.warns(UserWarning, match="no training step ran after resuming"):
        assert fit(tmp_path, "--data.init_args.num_train", "16", "--ckpt_path", "last", max_epochs=1, max_steps=2) == 0
    assert "the run's max_steps (2) was already reached; raise it" in results(versions(tmp_path)[1])["reason"]


def test_resuming_with_no_checkpoint_is_one_line(tmp_path, capsys):
    assert fit(tmp_path, "--ckpt_path", "last") == 2
    assert "ckpt_path: 'last' found no" in capsys.readouterr().err
    assert not (tmp_path / "lightning_logs").exists()


# --- run directories that never collide ----------------------------------------------------------


def test_runs_under_one_root_take_different_versions(tmp_path):
    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)  # another run's, still empty
    assert fit(tmp_path, max_epochs=1) == 0
    assert [p.name for p in versions(tmp_path)] == ["version_0", "version_1"]
    assert not list((tmp_path / "lightning_logs" / "version_0").iterdir())
    assert (versions(tmp_path)[1] / "results.json").is_file()
    assert not (versions(tmp_path)[1] / LOCK_FILENAME).exists()  # released at the end


def test_concurrent_claims_get_distinct_versions(tmp_path):
    claimed: list[int] = []
    threads = [threading.Thread(target=lambda: claimed.append(claim_version(tmp_path))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == list(range(8))


def test_a_directory_held_by_a_live_process_is_refused_and_a_stale_lock_taken_over(tmp_path):
    held = tmp_path / "run"
    held.mkdir()
    # a live process other than this one's parent (a sweep's lock is its child's to take over): init
    (held / LOCK_FILENAME).write_text("1\n")
    with pytest.raises(SettingError, match=f"run directory {held} is in use by process 1"):
        RunClaim(held, created=False)
    (held / LOCK_FILENAME).write_text("999999999\n")  # no such process
    assert holder_of(held) is None
    claim = RunClaim(held, created=False)
    assert holder_of(held) == os.getpid()
    claim.release()
    assert not (held / LOCK_FILENAME).exists()


def test_a_run_takes_over_the_lock_its_sweep_holds_for_it(tmp_path):
    held = tmp_path / "run"
    held.mkdir()
    (held / LOCK_FILENAME).write_text(f"{os.getppid()}\n")  # the parent: here pytest's, in a sweep the sweep
    claim = RunClaim(held, created=False)
    assert holder_of(held) == os.getpid()
    claim.release()


def test_a_failed_start_leaves_no_run_directory(tmp_path, capsys):
    """A data error found in setup (after the trainer made its directory) removes that directory."""
    status = fit(tmp_path, "--data.init_args.eval_every_n_epochs", '{"no_such_set": 2}', max_epochs=1)
    assert status == 2 and "no eval set named 'no_such_set'" in capsys.readouterr().err
    assert not list(tmp_path.rglob("lightning_logs"))  # nor the empty folder of versions around it


# --- a reference cache that checks itself --------------------------------------------------------


def imrm_and_train_set(cache_dir: Path):
    """A fresh untrained tiny IM-RM (the same weights every call) and its tokenized 8 training pairs."""
    from data_modules import PersonaDataModule
    from rm_lightning import ImplicitRM

    module = ImplicitRM(backbone="tiny-llama-chat", reference_cache_dir=str(cache_dir))
    data = PersonaDataModule(num_train=8, num_test=4)
    data.attach(module).setup("fit")
    return module, data.train_set


def untrained_rewards(module, dataset):
    module.attach_reference_logps(dataset)
    return module.rewards(module.collator()(dataset.pairs))


def flip_a_bit(path: Path) -> None:
    stored = torch.load(path, weights_only=True)
    stored["values"][3, 1] = torch.tensor(stored["values"][3, 1].item() * (1 + 2 ** -40), dtype=torch.float64)
    torch.save(stored, path)


def other_entry_of_the_same_shape(path: Path) -> None:
    stored = torch.load(path, weights_only=True)
    identity = {**stored["identity"], "tokens": "0" * 64}
    torch.save(cache_entries.entry(identity, values=stored["values"] - 0.3), path)


CORRUPTIONS = {
    "one bit flipped": (flip_a_bit, "contents do not match their checksum"),
    "another entry of the same shape": (other_entry_of_the_same_shape, "computed from other tokens"),
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[:100]), "unreadable"),
    "empty": (lambda path: path.write_bytes(b""), "unreadable"),
    "bare tensor of an old format": (lambda path: torch.save(torch.zeros(8, 2, dtype=torch.float64), path),
                                     "not a reference cache entry"),
    "a pickled object": (lambda path: torch.save({"identity": threading.Lock}, path), "unreadable"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_bad_cache_file_is_named_in_one_line_and_recomputed(corruption, tmp_path):
    module, dataset = imrm_and_train_set(tmp_path)
    assert torch.equal(untrained_rewards(module, dataset), torch.zeros(2 * len(dataset)))
    [path] = tmp_path.glob("*.pt")
    corrupt, reason = CORRUPTIONS[corruption]
    corrupt(path)
    module, dataset = imrm_and_train_set(tmp_path)
    with pytest.warns(UserWarning) as warned:
        rewards = untrained_rewards(module, dataset)
    messages = [str(w.message) for w in warned if "reference cache" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert f"IM-RM reference cache {path}: {reason}" in messages[0] and messages[0].endswith("recomputing it")
    assert torch.equal(rewards, torch.zeros(2 * len(dataset)))  # exactly 0 before training: the right reference
    module, dataset = imrm_and_train_set(tmp_path)  # the recomputed file is whole again and read silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(untrained_rewards(module, dataset), torch.zeros(2 * len(dataset)))


def test_an_unwritable_cache_folder_means_computing_in_memory_with_one_warning(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    module, dataset = imrm_and_train_set(blocker)
    expected = f"IM-RM reference cache folder {blocker} cannot be written \\(it is a file\\)"
    with pytest.warns(UserWarning, match=expected) as warned:
        assert torch.equal(untrained_rewards(module, dataset), torch.zeros(2 * len(dataset)))
    assert len([w for w in warned if "cannot be written" in str(w.message)]) == 1
    assert blocker.read_text().startswith("a file")


# --- data checks with file:line ------------------------------------------------------------------

PAIRS_WITH_PROBLEMS = [
    {"prompt": "p1", "chosen": "a", "rejected": "b"},
    {"prompt": "p2", "chosen": "same", "rejected": "same"},  # line 2: identical
    {"prompt": "  ", "chosen": "a", "rejected": "b"},  # line 3: empty prompt
    {"prompt": "p1", "chosen": "a", "rejected": "b"},  # line 4: a duplicate of line 1
    {"prompt": "p4", "chosen": "x", "rejected": "\t"},  # line 5: whitespace-only response
    {"prompt": "p5", "chosen": "c", "rejected": "d"},
]


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def realworld_fit_args(tmp_path: Path, train: Path, eval_set: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(PROJECT_ROOT / "configs" / "exrm_ultrafeedback.yaml"),
            "--config", str(tiny_override(tmp_path, max_steps=1)),
            "--data.init_args.train", json.dumps({"path": str(train), "hub": None, "limit": None}),
            "--data.init_args.eval_sets", json.dumps({"held_out": {"path": str(eval_set)}}),
            "--trainer.enable_progress_bar", "false", *extra]


def test_problem_pairs_are_dropped_and_counted_in_the_summary(tmp_path, capsys):
    from data_modules import RealWorldDataModule
    from rm_lightning import ExplicitRM

    train = jsonl(tmp_path / "train.jsonl", PAIRS_WITH_PROBLEMS)
    data = RealWorldDataModule(train={"path": str(train)}, eval_sets={"held_out": {"path": str(train)}})
    data.attach(ExplicitRM(backbone="tiny-llama")).setup("fit")
    assert len(data.train_set) == 3 and data.train_set.screened == {"identical": 1, "empty": 2, "duplicate": 1}
    row = next(line for line in data.summary().splitlines() if line.strip().startswith("train "))
    assert row.split()[2:] == ["3", "0", "1", "2", "1"]  # kept, too long, identical, empty, duplicates


def test_responses_that_truncation_cuts_to_the_same_tokens_are_dropped_as_identical(tmp_path):
    from data_modules import RealWorldDataModule
    from rm_lightning import ExplicitRM

    shared = "the same long opening words of both answers " * 4
    train = jsonl(tmp_path / "train.jsonl", [PAIRS_WITH_PROBLEMS[0],
                                              {"prompt": "Q?", "chosen": shared + "yes", "rejected": shared + "no"}])
    data = RealWorldDataModule(train={"path": str(train)}, eval_sets={"held_out": {"path": str(train)}},
                               max_response_tokens=8, truncate=True)
    data.attach(ExplicitRM(backbone="tiny-llama")).setup("fit")
    assert len(data.train_set) == 1 and data.train_set.screened == {"identical": 1}


@pytest.mark.parametrize("line, message", [
    (2, "chosen and rejected responses are identical"),
    (3, "empty or whitespace-only prompt"),
    (5, "empty or whitespace-only rejected"),
])
def test_invalid_pairs_fail_names_the_file_and_line(line, message, tmp_path, capsys):
    records = [PAIRS_WITH_PROBLEMS[0], PAIRS_WITH_PROBLEMS[line - 1]]
    train = jsonl(tmp_path / "train.jsonl", records)
    good = jsonl(tmp_path / "good.jsonl", PAIRS_WITH_PROBLEMS[:1])
    with pytest.raises(SystemExit) as exited:
        cli.main(realworld_fit_args(tmp_path, train, good, "--data.init_args.invalid_pairs", "fail"))
    err = [row for row in capsys.readouterr().err.splitlines() if row.startswith("error:")]
    assert exited.value.code == 2 and len(err) == 1
    assert f"{train}:2: {message}" in err[0]
    assert versions(tmp_path) == []


def test_undecodable_bytes_name_the_line_and_the_expected_encoding(tmp_path, capsys):
    train = tmp_path / "latin1.jsonl"
    train.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                      b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(SystemExit) as exited:
        cli.main(realworld_fit_args(tmp_path, train, train))
    err = [row for row in capsys.readouterr().err.splitlines() if row.startswith("error:")]
    assert exited.value.code == 2 and len(err) == 1
    assert f"{train}:2: not UTF-8 text (byte 0xe9" in err[0] and "must be UTF-8 encoded" in err[0]
    assert versions(tmp_path) == []


# --- sweeps: children die with the sweep, held directories are left alone -------------------------


def test_a_sweep_child_has_its_own_group_and_is_stopped_with_the_sweep(tmp_path, monkeypatch):
    import subprocess
    import sys
    import time

    from rm_lightning.experiments import sweep

    started = tmp_path / "group"
    real_wait = subprocess.Popen.wait

    def interrupted_wait(self, timeout=None):
        if timeout is None:  # the sweep waiting for its child: Ctrl-C arrives once the child runs
            while not started.exists():
                time.sleep(0.05)
            raise KeyboardInterrupt
        return real_wait(self, timeout)

    children = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        children.append(real_popen(*args, **kwargs))
        return children[-1]

    monkeypatch.setattr(subprocess.Popen, "wait", interrupted_wait)
    monkeypatch.setattr(sweep.subprocess, "Popen", recording_popen)
    child_code = (f"import os, pathlib, time; pathlib.Path({str(started)!r}).write_text(str(os.getpgrp())); "
                  f"time.sleep(60)")
    with pytest.raises(KeyboardInterrupt):
        sweep.run_child([sys.executable, "-c", child_code], grace_s=10)
    [child] = children
    assert int(started.read_text()) == child.pid != os.getpgrp()  # its own process group
    assert child.poll() is not None  # and it did not outlive the sweep


def test_a_sweep_leaves_a_directory_held_by_a_live_process_alone(tmp_path):
    from rm_lightning.experiments import sweep

    held = tmp_path / "run"
    held.mkdir()
    (held / LOCK_FILENAME).write_text(f"{os.getppid()}\n")
    (held / "results.json").write_text("{}")
    run = sweep.Run(Path("exrm_persona.yaml"), "rm_lightning.ExplicitRM", "tiny-llama", 0, held)
    outcome = sweep.launch(run, ["false"])
    assert outcome.status == "failed" and f"in use by the live process {os.getppid()}" in outcome.reason
    assert (held / "results.json").read_text() == "{}"


@pytest.mark.parametrize("callback", [MarginHistory, DynamicsMonitor])
def test_a_failed_evaluation_writes_no_copy_of_the_fits_history(callback, tmp_path):
    """validate/test/predict restore the callbacks' rows from the checkpoint they score: those are the fit's."""
    history = callback()
    history.rows = [{"step": 0, "epoch": 0, "set": "original_test_prompts"}]
    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING), _rm_lightning_run_dir=tmp_path)
    history.on_exception(trainer, None, RuntimeError("boom"))
    assert list(tmp_path.iterdir()) == []
