"""Peak memory in results.json and the final table: present, positive, from the process's own counters."""

import json

import lightning as L

from rm_lightning.callbacks import MarginHistory, ResultsWriter
from rm_lightning.callbacks.peak_memory import describe, peak_memory


def test_peak_memory_is_the_resident_peak_and_no_cuda_figure_without_cuda():
    peaks = peak_memory()
    assert peaks["host_rss_bytes"] > 0 and peaks["cuda_bytes"] is None
    assert describe(peaks).startswith("peak memory: ") and "CUDA" not in describe(peaks)
    assert "2.00 GiB CUDA" in describe({"host_rss_bytes": 2 ** 30, "cuda_bytes": 2 * 2 ** 30})


def test_results_json_and_final_table_record_the_peak(tmp_path, capsys):
    from data_modules import PersonaDataModule
    from rm_lightning import ExplicitRM

    module, data = ExplicitRM(backbone="tiny-llama-chat"), PersonaDataModule(num_train=4, num_test=2, batch_size=4)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[MarginHistory(), ResultsWriter()])
    trainer.fit(module, datamodule=data)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["peak_memory"]["host_rss_bytes"] > 0 and record["peak_memory"]["cuda_bytes"] is None
    assert "peak memory: " in capsys.readouterr().out
