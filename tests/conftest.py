"""Shared fixtures: tiny random-weight models and the shared data folder."""

import os
from pathlib import Path

import pytest
import torch

from data_modules.jsonl import data_root

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if not (root / "README.md").is_file():
        pytest.fail(f"shared data not found at {root}; set RM_LIGHTNING_DATA")
    return root


def tiny_override(tmp_path: Path, **extra) -> Path:
    """A second --config file turning any shipped config into a seconds-long tiny-model run."""
    lines = [
        "trainer:",
        f"  default_root_dir: {tmp_path}",
        f"  max_epochs: {extra.get('max_epochs', 1)}",
        f"  max_steps: {extra.get('max_steps', 3)}",
        "model:",
        "  init_args:",
        "    backbone: tiny-llama-chat",
        "data:",
        "  init_args:",
        f"    batch_size: {extra.get('batch_size', 4)}",
        f"    eval_batch_size: 16",
    ]
    if extra.get("reference_cache_dir"):
        lines.insert(lines.index("  init_args:") + 1, f"    reference_cache_dir: {extra['reference_cache_dir']}")
    path = tmp_path / "tiny_override.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path
