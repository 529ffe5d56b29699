"""Attention flow (Abnar & Zuidema, ACL 2020) as an exact maximum flow.

The layered attention graph has a node per (layer ``l = 0..L``, token) and an edge from token
``j`` at layer ``l`` to token ``i`` at layer ``l + 1`` whose capacity is the residual-augmented,
row-normalised, head-averaged attention ``A_l[i, j]`` (the same matrices as ``rollout``). The
relevance of patch ``j`` is the maximum flow from input node ``(0, j)`` to the readout: the CLS
node of the last layer for CLIP; for SigLIP a sink fed by every last-layer token with the pooling
head's attention as capacity.

Why not networkx (``flow_reference`` below keeps it as the reference): its pure-Python
max-flow on ``L * T^2`` edges, repeated for every patch, takes minutes for a small ViT.
``scipy.sparse.csgraph.maximum_flow`` runs Dinic's algorithm in C but accepts only int32
capacities. So capacities are scaled by ``2^30`` and rounded *down*: the integer optimum divided
by the scale is then a feasible flow of the real graph, a lower bound. The integer residual graph
also yields a minimum cut, whose capacity under the *real* capacities is an upper bound. The
returned value is the midpoint and the bracket is checked for every patch: rounding down loses
less than 2^-30 per edge of the cut, so a bracket wider than that is a bug, and one wider than
``2 * tolerance`` (default 1e-6) is refused; each value is thus within ``tolerance`` of the exact
real-valued max flow. In practice the bracket is 1e-8 to 3e-7 wide (a cut of a 145-token, 3-layer
ViT crossed ~250 edges). (The sink's in-capacity sums to 1, so no flow exceeds 2^30: no overflow.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

from workers.probes.errors import ProbeInputError
from workers.probes.registry import register
from workers.probes.relevance import fuse_heads
from workers.probes.rollout import layer_matrices

if TYPE_CHECKING:
    from workers.probes.adapters.base import DualEncoderAdapter


SCALE = 2 ** 30
#: refuse above this many (edges x max-flow computations) per image: ~10 s on one CPU core.
#: A ViT-B/16 (12 layers, 197 tokens) needs 12 * 197^2 * 196 = 9e7 edge-visits per Dinic phase.
MAX_WORK = 60_000_000


class FlowTooLargeError(ProbeInputError):
    """The attention graph is too large for exact max-flow in reasonable time."""


def graph_size(num_layers: int, tokens: int, prefix: int) -> int:
    """Edges times the number of max-flow computations (one per patch)."""
    return num_layers * tokens * tokens * (tokens - prefix)


def _layered_edges(mats: np.ndarray, pool: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Edge list ``(rows, cols, capacities)``, node count and sink of the layered graph.
    ``mats`` ``[L, T, T]`` (row i = query token at the layer above), ``pool`` ``[T]`` or None."""
    n_layers, t, _ = mats.shape
    rows, cols, caps = [], [], []
    lower = np.arange(t)
    for layer in range(n_layers):
        i, j = np.nonzero(mats[layer] > 0)
        rows.append(layer * t + lower[j])  # from token j at this layer ...
        cols.append((layer + 1) * t + lower[i])  # ... to token i at the next one
        caps.append(mats[layer][i, j])
    n_nodes = (n_layers + 1) * t
    if pool is None:
        sink = n_layers * t  # CLS token of the last layer
    else:
        sink = n_nodes
        n_nodes += 1
        (k,) = np.nonzero(pool > 0)
        rows.append(n_layers * t + k)
        cols.append(np.full(len(k), sink))
        caps.append(pool[k])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(caps).astype(np.float64), n_nodes, sink


def max_flows(mats: np.ndarray, pool: np.ndarray | None, sources: Sequence[int], *,
              tolerance: float = 1e-6) -> np.ndarray:
    """Exact (certified to ``tolerance``) max flow from each input token in ``sources`` to the readout."""
    rows, cols, caps, n, sink = _layered_edges(mats, pool)
    scaled = np.floor(caps * SCALE).astype(np.int64)
    if scaled.max(initial=0) >= 2 ** 31:
        raise ProbeInputError("attention capacities above 1: not probabilities")
    keep = scaled > 0
    integer = sp.csr_array((scaled[keep].astype(np.int32), (rows[keep], cols[keep])), shape=(n, n))
    # scipy returns the flow on the graph plus its reverse edges, always in the same sparsity
    # pattern; align the capacities to it once so each residual graph is a vector subtraction.
    r, c = integer.nonzero()
    symmetric = sp.csr_array((np.concatenate([integer[r, c], np.zeros(len(r), np.int32)]),
                              (np.concatenate([r, c]), np.concatenate([c, r]))), shape=(n, n))
    symmetric.sort_indices()
    out = np.empty(len(sources))
    for k, source in enumerate(sources):
        result = maximum_flow(integer, source, sink, method="dinic")
        lower = result.flow_value / SCALE
        # minimum cut = nodes reachable from the source in the residual graph
        f = result.flow
        if np.array_equal(f.indptr, symmetric.indptr) and np.array_equal(f.indices, symmetric.indices):
            residual = sp.csr_array((symmetric.data - f.data, f.indices, f.indptr), shape=(n, n))
        else:  # a different scipy layout: the general (slower) sparse subtraction
            residual = sp.csr_array(integer - f)
        residual.data[residual.data < 0] = 0
        residual.eliminate_zeros()
        reach = np.zeros(n, dtype=bool)
        reach[breadth_first_order(residual, source, directed=True, return_predecessors=False)] = True
        cut = reach[rows] & ~reach[cols]
        upper = float(caps[cut].sum())
        if not lower - 1e-12 <= upper <= lower + int(cut.sum()) / SCALE + 1e-12:
            raise RuntimeError(f"attention flow not certified: {lower} <= flow <= {upper}")
        if upper - lower > 2 * tolerance:
            raise RuntimeError(f"attention flow bracket {upper - lower:.2e} is wider than 2 x tolerance ({tolerance})")
        out[k] = 0.5 * (lower + upper)
    return out


def flow_reference(mats: np.ndarray, pool: np.ndarray | None, sources: Sequence[int]) -> np.ndarray:
    """The straightforward networkx implementation (float capacities), kept as the reference the
    tests and the benchmark compare against."""
    import networkx as nx

    n_layers, t, _ = mats.shape
    graph = nx.DiGraph()
    for layer in range(n_layers):
        for i in range(t):
            for j in range(t):
                if mats[layer, i, j] > 0:
                    graph.add_edge((layer, j), (layer + 1, i), capacity=float(mats[layer, i, j]))
    if pool is None:
        sink: tuple[int, int] | str = (n_layers, 0)
    else:
        sink = "readout"
        for j in range(t):
            if pool[j] > 0:
                graph.add_edge((n_layers, j), sink, capacity=float(pool[j]))
    return np.array([nx.maximum_flow_value(graph, (0, s), sink) for s in sources])


def flow_inputs(adapter: DualEncoderAdapter, pixel_values: torch.Tensor, *,
                start_layer: int = 0) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per image: the ``[L, T, T]`` layer matrices and the pooling row (None for CLS readout)."""
    attentions, pool = adapter.attentions(pixel_values)
    mats = torch.stack(layer_matrices(attentions[start_layer:], keep_columns=adapter.num_prefix_tokens), dim=1)
    pool = None if pool is None else fuse_heads(pool.float())
    return [(mats[b].double().cpu().numpy(), None if pool is None else pool[b].double().cpu().numpy())
            for b in range(mats.shape[0])]


@register("flow")
def flow(adapter: DualEncoderAdapter, pixel_values: torch.Tensor, prompts: Sequence[str], *, start_layer: int = 0,
         max_work: int = MAX_WORK) -> torch.Tensor:
    """Attention flow ``[B, gh, gw]``. Like rollout it ignores the prompt. Refuses
    (``FlowTooLargeError``) when layers x tokens^2 x patches exceeds ``max_work``."""
    adapter.pair_prompts(pixel_values, prompts)
    prefix = adapter.num_prefix_tokens
    tokens = prefix + adapter.grid[0] * adapter.grid[1]
    work = graph_size(adapter.num_layers - start_layer, tokens, prefix)
    if work > max_work:
        raise FlowTooLargeError(
            f"attention flow on {adapter.num_layers - start_layer} layers x {tokens} tokens needs ~{work:.1e} "
            f"edge-visits per image (limit {max_work:.1e}); use rollout, a later start_layer, or raise max_work")
    sources = list(range(prefix, tokens))
    maps = [torch.from_numpy(max_flows(mats, pool, sources)).float()
            for mats, pool in flow_inputs(adapter, pixel_values, start_layer=start_layer)]
    return torch.stack(maps).reshape(-1, *adapter.grid)
