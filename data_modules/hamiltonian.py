"""Hamiltonian cycle (paper §3.2): verifying a solution is easy, generating one is hard.

Each prompt is a random graph that is known to hold a Hamiltonian cycle (one is planted); the
chosen response is that cycle, the rejected one a vertex permutation that is not a cycle of the
graph. An IM-RM can learn to rank these while its policy still cannot produce a correct cycle
(Theorem 1), which ``rm_lightning.callbacks.GenerationCheck`` measures with ``verify``.

Text formats (as in the authors' code), shown for 4 vertices::

    prompt   = "Vertices: <sep>0<sep>1<sep>2<sep>3\\nEdges: <sep>0<edge_sep>2<sep>1<edge_sep>3<sep>..."
    response = "2<sep>0<sep>1<sep>3"

Edges are undirected and written smaller endpoint first; their order is shuffled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from data_modules.base import EvalSet, PreferenceDataModule
from rm_lightning.errors import DataError
from rm_lightning.pairs import PreferencePair

SEP = "<sep>"
EDGE_SEP = "<edge_sep>"
EXTRA_TOKENS = (SEP, EDGE_SEP)
VERTICES_HEADER = "Vertices: "
EDGES_HEADER = "Edges: "

Edge = tuple[int, int]


# --- graphs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HamiltonianInstance:
    """One graph with its planted cycle and a permutation that is not a cycle of it."""

    num_vertices: int
    edges: list[Edge]
    cycle: list[int]
    non_cycle: list[int]

    def pair(self) -> PreferencePair:
        return PreferencePair(format_prompt(self.num_vertices, self.edges), format_vertex_sequence(self.cycle),
                              format_vertex_sequence(self.non_cycle))


def undirected(u: int, v: int) -> Edge:
    return (u, v) if u < v else (v, u)


def cycle_edges(order: list[int]) -> list[Edge]:
    """The edges a vertex order walks through, the closing edge (last back to first) included."""
    return [undirected(order[i], order[(i + 1) % len(order)]) for i in range(len(order))]


def is_cycle_of(order: list[int], num_vertices: int, edge_set: set[Edge]) -> bool:
    """Every vertex exactly once and every step, wrap-around included, along an edge."""
    if len(order) != num_vertices or set(order) != set(range(num_vertices)):
        return False
    return all(edge in edge_set for edge in cycle_edges(order))


def generate_instance(num_vertices: int, edge_prob: float, rng: random.Random) -> HamiltonianInstance:
    """Plant a random Hamiltonian cycle, add every other edge with ``edge_prob``, shuffle the edges.

    A complete graph has no non-cycle permutation to reject, so such a draw (possible only for
    tiny graphs or a large ``edge_prob``) is discarded and the graph redrawn.
    """
    if num_vertices < 4:
        raise DataError(f"num_vertices must be at least 4 (got {num_vertices}): smaller graphs are complete "
                        f"and have no non-Hamiltonian permutation to reject")
    if not 0.0 <= edge_prob < 1.0:
        raise DataError(f"edge_prob must be in [0, 1) (got {edge_prob}): at 1 every graph is complete")
    while True:
        cycle = list(range(num_vertices))
        rng.shuffle(cycle)
        edges = cycle_edges(cycle)
        planted = set(edges)
        for u in range(num_vertices):
            for v in range(u + 1, num_vertices):
                if (u, v) not in planted and rng.random() < edge_prob:
                    edges.append((u, v))
        if len(edges) < num_vertices * (num_vertices - 1) // 2:
            break
    rng.shuffle(edges)
    return HamiltonianInstance(num_vertices, edges, cycle, _non_cycle_permutation(num_vertices, set(edges), rng))


def _non_cycle_permutation(num_vertices: int, edge_set: set[Edge], rng: random.Random) -> list[int]:
    """Resample until the permutation misses an edge; the graph is not complete, so this ends
    (a fixed missing edge lies on a random permutation with probability 2 / (N - 1))."""
    while True:
        order = list(range(num_vertices))
        rng.shuffle(order)
        if not is_cycle_of(order, num_vertices, edge_set):
            return order


def generate_instances(count: int, num_vertices: int, edge_prob: float, seed: int | str) -> list[HamiltonianInstance]:
    rng = random.Random(seed)
    return [generate_instance(num_vertices, edge_prob, rng) for _ in range(count)]


# --- text formats --------------------------------------------------------------------------------


def format_prompt(num_vertices: int, edges: list[Edge]) -> str:
    vertices = VERTICES_HEADER + SEP + SEP.join(str(v) for v in range(num_vertices))
    edge_list = EDGES_HEADER + SEP + SEP.join(f"{u}{EDGE_SEP}{v}" for u, v in edges)
    return f"{vertices}\n{edge_list}"


def format_vertex_sequence(order: list[int]) -> str:
    return SEP.join(str(v) for v in order)


def _parse_int(text: str, what: str) -> int:
    stripped = text.strip()
    if not (stripped.isascii() and stripped.isdigit()):
        raise DataError(f"{what}: expected a vertex number, got {text!r}")
    return int(stripped)


def parse_prompt(prompt: str) -> tuple[list[int], list[Edge]]:
    """(vertices, undirected edges) of a prompt in the format above; DataError when malformed."""
    lines = prompt.strip().split("\n")
    if len(lines) != 2 or not lines[0].startswith(VERTICES_HEADER + SEP) or not lines[1].startswith(EDGES_HEADER + SEP):
        raise DataError(f"not a Hamiltonian-cycle prompt (want '{VERTICES_HEADER}{SEP}...' then "
                        f"'{EDGES_HEADER}{SEP}...'): {prompt[:80]!r}")
    vertices = [_parse_int(v, "prompt vertices") for v in lines[0][len(VERTICES_HEADER + SEP):].split(SEP)]
    edges = []
    for text in lines[1][len(EDGES_HEADER + SEP):].split(SEP):
        ends = text.split(EDGE_SEP)
        if len(ends) != 2:
            raise DataError(f"prompt edges: expected 'u{EDGE_SEP}v', got {text!r}")
        edges.append(undirected(_parse_int(ends[0], "prompt edges"), _parse_int(ends[1], "prompt edges")))
    return vertices, edges


def parse_vertex_sequence(response: str) -> list[int]:
    """Vertex numbers of a response; whitespace around each number is ignored, anything else fails."""
    return [_parse_int(v, "response") for v in response.strip().split(SEP)]


def is_hamiltonian_cycle(prompt: str, response: str) -> bool:
    """Whether ``response`` lists every vertex of the prompt's graph exactly once and each
    consecutive pair, wrap-around included, is an edge. Never raises: unparseable text is wrong."""
    try:
        vertices, edges = parse_prompt(prompt)
        order = parse_vertex_sequence(response)
    except (DataError, AttributeError, TypeError, ValueError):
        return False
    if len(order) != len(vertices) or sorted(order) != sorted(vertices) or len(set(vertices)) != len(vertices):
        return False
    edge_set = set(edges)
    return all(edge in edge_set for edge in cycle_edges(order))


# --- the data module -----------------------------------------------------------------------------


class HamiltonianCycleDataModule(PreferenceDataModule):
    """Generated graphs with planted Hamiltonian cycles; chosen = the cycle, rejected = a non-cycle.

    Eval sets: ``train_graphs`` (the training pairs themselves) and ``test_graphs`` (fresh
    graphs), both in distribution. (Not ``train``: that name is the training set's own in
    ``encoded_sets``.) The backbone must know ``<sep>`` and ``<edge_sep>`` as single tokens:
    set ``model.init_args.extra_tokens: ["<sep>", "<edge_sep>"]``.

    Args:
        num_vertices: vertices per graph (paper: 10).
        edge_prob: probability of each edge beside the planted cycle's (paper: 0.2).
        num_train: training graphs (paper: 1000).
        num_test: test graphs (paper: 200).
        data_seed: fixes every graph; train and test come from separate streams, so the test
            graphs do not change with ``num_train``.
        num_train_eval: how many of the training pairs (the first ones) ``train_graphs`` holds;
            null: all (the paper). A subset saves evaluation time on CPU.
    """

    def __init__(self, num_vertices: int = 10, edge_prob: float = 0.2, num_train: int = 1000, num_test: int = 200,
                 data_seed: int = 517, num_train_eval: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        if num_train < 1 or num_test < 1 or (num_train_eval is not None and num_train_eval < 1):
            raise DataError(f"HamiltonianCycleDataModule: num_train, num_test and num_train_eval must be positive "
                            f"(got {num_train}, {num_test}, {num_train_eval})")
        self.num_vertices, self.edge_prob = num_vertices, edge_prob
        self.num_train, self.num_test, self.data_seed = num_train, num_test, data_seed
        self.num_train_eval = num_train_eval

    @cached_property
    def instances(self) -> dict[str, list[HamiltonianInstance]]:
        """The generated graphs per split, kept so callbacks can reuse the raw prompts."""
        return {split: generate_instances(count, self.num_vertices, self.edge_prob, f"{self.data_seed}-{split}")
                for split, count in (("train", self.num_train), ("test", self.num_test))}

    def load_pairs(self) -> tuple[list[PreferencePair], dict[str, EvalSet]]:
        train = [instance.pair() for instance in self.instances["train"]]
        test = [instance.pair() for instance in self.instances["test"]]
        train_eval = train[:self.num_train_eval] if self.num_train_eval is not None else train
        return train, {"train_graphs": EvalSet(train_eval, "in_distribution"),
                       "test_graphs": EvalSet(test, "in_distribution")}

    def generation_prompts(self) -> dict[str, list[str]]:
        """Raw prompts per split, for generation checks (``GenerationCheck``)."""
        return {split: [format_prompt(i.num_vertices, i.edges) for i in instances]
                for split, instances in self.instances.items()}

    @staticmethod
    def verify(prompt: str, response: str) -> bool:
        return is_hamiltonian_cycle(prompt, response)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            check_single_tokens(self._reward_module().tokenizer, EXTRA_TOKENS)
        super().setup(stage)


def check_single_tokens(tokenizer, tokens: tuple[str, ...]) -> None:
    """Fail with the config line to add when the tokenizer splits a separator into pieces."""
    for token in tokens:
        ids = tokenizer(f"0{token}1", add_special_tokens=False)["input_ids"]
        if token not in tokenizer.convert_ids_to_tokens(ids):
            listed = ", ".join(f'"{t}"' for t in tokens)
            raise DataError(f"HamiltonianCycleDataModule: the tokenizer splits '{token}' into pieces; "
                            f"add `model.init_args.extra_tokens: [{listed}]` to the config")
