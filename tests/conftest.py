"""Shared fixtures and helpers: tiny random-weight models, pair batches with edge cases, the shared data folder."""

import os
from pathlib import Path

import pytest
import torch

from data_modules.jsonl import data_root
from rm_lightning.models.loss import bradley_terry_loss
from rm_lightning.pairs import EncodedPair
from rm_lightning.pairs.token_cache import TOKEN_CACHE_ENV

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def session_token_cache(tmp_path_factory):
    """Tokenized sets are cached in a folder of this session's, not the user's (the CLI's subprocesses inherit it)."""
    before = os.environ.get(TOKEN_CACHE_ENV)
    os.environ[TOKEN_CACHE_ENV] = str(tmp_path_factory.mktemp("tokenized_pairs"))
    yield
    if before is None:
        os.environ.pop(TOKEN_CACHE_ENV)
    else:
        os.environ[TOKEN_CACHE_ENV] = before


@pytest.fixture(scope="module")
def single_thread():
    """Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``. Tiny models: syncing a second thread costs more than it saves, badly so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared reference data (``$RM_LIGHTNING_DATA``, default ``../shared/data``); tests skip without it."""
    root = data_root()
    if not (root / "README.md").is_file():
        pytest.skip(f"shared data not found at {root} (set RM_LIGHTNING_DATA)")
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
        "    eval_batch_size: 16",
    ]
    if extra.get("reference_cache_dir"):
        lines.insert(lines.index("  init_args:") + 1, f"    reference_cache_dir: {extra['reference_cache_dir']}")
    path = tmp_path / "tiny_override.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def random_tokens(vocab: int, generator: torch.Generator):
    def tokens(n: int) -> list[int]:
        return torch.randint(3, vocab - 1, (n,), generator=generator).tolist()
    return tokens


def edge_case_pairs(vocab: int, seed: int = 0) -> list[EncodedPair]:
    """Shared prompts of several lengths, a rejected row inside the chosen one, the reverse, identical rows,
    and a pair with nothing in common."""
    tokens = random_tokens(vocab, torch.Generator().manual_seed(seed))
    pairs = []
    for prompt, chosen, rejected in [(5, 4, 6), (20, 10, 3), (1, 30, 2), (12, 9, 9)]:
        shared = tokens(prompt)
        pairs.append(EncodedPair(shared + tokens(chosen), prompt, shared + tokens(rejected), prompt))
    long = tokens(14)
    pairs += [EncodedPair(long, 4, long[:9], 4), EncodedPair(long[:6], 4, long, 4), EncodedPair(long, 4, long, 4),
              EncodedPair(tokens(7), 3, tokens(9), 3)]
    return pairs


def ragged_pairs(vocab: int, seed: int = 0) -> list[EncodedPair]:
    """Pairs of very different lengths, nothing shared: most of a padded batch is padding."""
    tokens = random_tokens(vocab, torch.Generator().manual_seed(seed))
    return [EncodedPair(tokens(chosen), 3, tokens(rejected), 3) for chosen, rejected in [(6, 9), (40, 37), (8, 12),
                                                                                          (45, 7)]]


def loss_and_grads(module, batch, hidden_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Bradley-Terry loss of ``module`` on ``batch`` with the decoder run by ``hidden_fn``, and its gradients."""
    module.zero_grad()
    chosen, rejected = module.compute_rewards(hidden_fn(module.decoder, batch), batch).chunk(2)
    loss = bradley_terry_loss(chosen, rejected)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.model.named_parameters() if p.grad is not None}
