"""Testing with Concept Activation Vectors (TCAV, Kim et al. 2018), with corrected significance.

Question answered: "does the model's score for a text *target* depend on a *concept* (given as a
folder of example images) at a given vision layer, more than it depends on a random direction?"

Pipeline (one call of ``run_tcav``):

1. Activations of every image (concepts, random pool) at every chosen layer, pooled to one
   vector per image (the CLS token, or the mean of the patch tokens). Computed **once** and reused
   by every run.
2. ``R`` concept-vs-random CAVs per concept (the concept's examples against random set ``B_r``),
   and the same ``R`` runs for each of ``K`` *random concepts* (random folders drawn from the random
   pool, against random sets outside them): ``K x R`` random-vs-random CAVs. A CAV is the normal of
   an L2-regularised logistic regression; its accuracy is measured on a held-out third of the
   examples. **All CAVs of a layer are fitted together** as one batched problem (Newton steps in
   torch, on the GPU where present).
3. The gradient of the image-text similarity with respect to the layer's pooled activation, for
   every target input: **one backward pass per batch of target inputs** gives every layer at once.
   TCAV score of a CAV = share of target inputs whose directional derivative along the CAV is
   positive; magnitude = positive derivative mass over total absolute derivative mass (captum's
   definition, so scores are comparable).
4. The concept's TCAV score (mean over its runs) against the random concepts' scores: two-sided
   t-test (see ``compare_to_null`` for why folder against folder), Cohen's d, a 95% confidence
   interval of the difference, and **Holm-Bonferroni correction across every concept x layer
   tested** (neither captum nor the original tcav library corrects for multiple comparisons).

A concept whose CAVs reach a mean held-out accuracy below ``MIN_CAV_ACCURACY`` is *unreliable*:
the CAV does not separate the concept from random images, so its direction means little. It is
still tested and reported (with ``reliable: false``) but never called significant.

Concept localisation (``concept_heatmaps``): each patch token's features projected onto the CAV,
as a ``[gh, gw]`` map of where the concept sits in an image.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from workers.probes.adapters.base import DualEncoderAdapter
from workers.probes.errors import ProbeInputError
from workers.probes.kinds import BatchSize, DatasetArg, Flag, KindParams, Metric, Seed, probe_kind
from workers.probes.suite import Finding, ProbeResult, Progress, no_progress

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: A CAV whose mean held-out accuracy is below this is reported as unreliable.
MIN_CAV_ACCURACY = 0.7
#: Fewest images a concept folder may hold (a third is held out to measure CAV accuracy).
MIN_CONCEPT_IMAGES = 10
#: Fewest images in ``random/``: two disjoint random sets of ``MIN_CONCEPT_IMAGES`` each.
MIN_RANDOM_IMAGES = 2 * MIN_CONCEPT_IMAGES
#: Fewest target inputs: a TCAV score is a share of them.
MIN_TARGET_IMAGES = 4
#: Fewest random runs for a t-test that means something (Kim et al. use many; we default to 20).
MIN_RANDOM_RUNS = 5
DEFAULT_RANDOM_RUNS = 20
#: Random concepts (random folders, each with its own runs) forming the null distribution.
DEFAULT_NULL_CONCEPTS = 20
MIN_NULL_CONCEPTS = 10
#: What the significance test compares between the concept and the random concepts:
#: "derivative" (default): the mean cosine directional derivative (``mean_cosine_derivative``);
#: "tcav_score": the TCAV score itself (Kim et al.). The TCAV score is a share of signs: when the
#: target inputs' gradients point the same way (usual for inputs of one class) it is 0 or 1 for
#: almost every CAV, random folders included (measured sd 0.3 across random folders on the zoo),
#: and a test on it cannot tell a concept from a lucky random folder. The derivative keeps the
#: size of the effect; the TCAV score is still reported as the effect's headline.
STATISTICS = ("derivative", "tcav_score")
DEFAULT_STATISTIC: Final = "derivative"
DEFAULT_ALPHA = 0.05
#: Upper bound on the examples per set (per side of one CAV): more costs time, adds little.
MAX_SET_SIZE = 50
RANDOM_FOLDER = "random"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
POOLINGS = ("cls", "mean")


# --- inputs ------------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (sorted, so runs are reproducible)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_images(paths: Sequence[Path]) -> list[Image.Image]:
    """Decode images as RGB; an unreadable one is a ``ProbeInputError`` naming the file."""
    from workers.probes.datasets import open_image

    return [open_image(Path(p), decode=True) for p in paths]


def load_image_folder(folder: str | Path, *, minimum: int, what: str) -> list[Path]:
    """The images in ``folder``, refusing a missing folder or one with fewer than ``minimum``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ProbeInputError(f"{what} folder not found: {folder}")
    paths = list_images(folder)
    if len(paths) < minimum:
        raise ProbeInputError(
            f"{what} folder {folder} holds {len(paths)} image(s); at least {minimum} are needed "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return paths


def load_concepts_dir(concepts_dir: str | Path,
                      concepts: Sequence[str] | None = None) -> tuple[dict[str, list[Path]], list[Path]]:
    """``DIR/<concept>/*.png`` for each concept and ``DIR/random/*.png``.

    Returns ``({concept: paths}, random_paths)``; ``concepts`` restricts which folders are used.
    """
    root = Path(concepts_dir)
    if not root.is_dir():
        raise ProbeInputError(f"concepts folder not found: {root}")
    random_paths = load_image_folder(root / RANDOM_FOLDER, minimum=MIN_RANDOM_IMAGES, what="random counterexamples")
    names = sorted(p.name for p in root.iterdir()
                   if p.is_dir() and p.name != RANDOM_FOLDER and not p.name.startswith("."))
    if concepts is not None:
        missing = [c for c in concepts if c not in names]
        if missing:
            raise ProbeInputError(f"concept folder(s) not found in {root}: {', '.join(missing)}; "
                                  f"available: {', '.join(names) or 'none'}")
        names = list(concepts)
    if not names:
        raise ProbeInputError(f"{root} holds no concept folder (one folder per concept, next to {RANDOM_FOLDER}/)")
    found = {n: load_image_folder(root / n, minimum=MIN_CONCEPT_IMAGES, what=f"concept {n!r}") for n in names}
    return found, random_paths


def resolve_layers(spec: str | Sequence[int] | None, num_layers: int) -> list[int]:
    """``"auto"`` -> about four layers spread over the tower (every few layers, always the last);
    ``"3,5"`` or ``[3, 5]`` -> those layers. Layer ``l`` is the output of transformer block ``l``
    (1..L); 0 is the patch embeddings, which no concept question is about."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        step = max(1, math.ceil(num_layers / 4))
        layers = list(range(num_layers, 0, -step))[::-1]
        return layers
    if isinstance(spec, str):
        try:
            layers = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ProbeInputError(f"--layers must be 'auto' or comma-separated integers, got {spec!r}") from None
    else:
        layers = [int(v) for v in spec]
    if not layers:
        raise ProbeInputError("no layer given")
    bad = [layer for layer in layers if not 1 <= layer <= num_layers]
    if bad:
        raise ProbeInputError(f"layer(s) {', '.join(map(str, bad))} do not exist: this vision tower has layers "
                              f"1..{num_layers}")
    return sorted(set(layers))


# --- activations and gradients --------------------------------------------------------------


def _pool(hidden: torch.Tensor, pooling: str, prefix: int) -> torch.Tensor:
    """``[B, T, D]`` -> ``[B, D]``."""
    if pooling == "cls":
        return hidden[:, 0]
    return hidden[:, prefix:].mean(dim=1)


def check_pooling(adapter: DualEncoderAdapter, pooling: str) -> str:
    if pooling == "auto":
        return "cls" if adapter.num_prefix_tokens > 0 else "mean"
    if pooling not in POOLINGS:
        raise ProbeInputError(f"pooling must be one of {', '.join(POOLINGS)} or auto, got {pooling!r}")
    if pooling == "cls" and adapter.num_prefix_tokens == 0:
        raise ProbeInputError(f"this {adapter.architecture or 'model'} has no CLS token; use --pooling mean")
    return pooling


def _batches(images: Sequence[Image.Image], batch_size: int) -> Iterator[Sequence[Image.Image]]:
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


@torch.no_grad()
def pooled_activations(adapter: DualEncoderAdapter, images: Sequence[Image.Image], layers: Sequence[int], *,
                       pooling: str = "cls", batch_size: int = 32) -> dict[int, torch.Tensor]:
    """``{layer: [N, D]}`` float32 pooled activations of ``images`` (on the adapter's device)."""
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for batch in _batches(images, batch_size):
        features = adapter.vision_features(adapter.preprocess(batch), list(layers))
        for layer in layers:
            chunks[layer].append(_pool(features[layer].float(), pooling, adapter.num_prefix_tokens))
    return {layer: torch.cat(parts) for layer, parts in chunks.items()}


def target_gradients(adapter: DualEncoderAdapter, images: Sequence[Image.Image], target: str, layers: Sequence[int],
                     *, pooling: str = "cls", batch_size: int = 32) -> dict[int, torch.Tensor]:
    """``{layer: [M, D]}``: gradient of the similarity of each image with ``target`` w.r.t. the
    layer's pooled activation. One forward and one backward per batch serve every layer.

    For mean pooling, moving the pooled activation by ``v`` means moving every patch token by ``v``,
    so the gradient is the sum of the patch tokens' gradients.
    """
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    prefix = adapter.num_prefix_tokens
    for batch in _batches(images, batch_size):
        pixel_values = adapter.preprocess(batch)
        with torch.enable_grad():
            trace = adapter.trace(pixel_values, [target] * len(batch))
            hidden = [trace.hidden_states[layer] for layer in layers]
            grads = torch.autograd.grad(trace.score.float().sum(), hidden, allow_unused=True)
        for layer, h, g in zip(layers, hidden, grads, strict=True):
            if g is None:
                g = torch.zeros_like(h)
            g = g.float()
            chunks[layer].append(g[:, 0] if pooling == "cls" else g[:, prefix:].sum(dim=1))
    return {layer: torch.cat(parts).detach() for layer, parts in chunks.items()}


# --- batched linear CAVs ----------------------------------------------------------------------


@dataclass
class CAVs:
    """``R`` concept activation vectors of one layer, fitted together."""

    vectors: torch.Tensor  # [R, D] unit vectors in the activation space, pointing to the positives
    bias: torch.Tensor  # [R]
    accuracy: torch.Tensor  # [R] held-out accuracy


def ridge_logistic(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, *, l2: float = 1e-2,
                   max_iter: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``sum_i weights_i * logloss(y_i, x_i . w + b) + l2 / 2 * ||w||^2`` for ``R``
    problems at once. ``x [R, N, D]``, ``y, weights [R, N]`` -> ``(w [R, D], b [R])``.

    (sklearn's ``LogisticRegression(C=1/l2)`` with ``sample_weight=weights`` solves the same
    problem one at a time; the tests check we agree.)
    """
    R, N, D = x.shape
    dtype, device = x.dtype, x.device
    if D > N:
        # Exact reduction: the ridge solution lies in the row space of x. With x^T = Q T (reduced
        # QR, Q [R, D, N] orthonormal), w = Q beta gives ||w|| = ||beta|| and x w = T^T beta.
        # (QR rather than SVD: batched SVD on the CPU was 25x slower here.)
        q_, t_ = torch.linalg.qr(x.transpose(1, 2))
        vh = q_.transpose(1, 2)  # [R, N, D]
        f = t_.transpose(1, 2)  # [R, N, N]
    else:
        vh = None
        f = x
    q = f.shape[2]
    a = torch.cat([f, torch.ones(R, N, 1, dtype=dtype, device=device)], dim=2)  # bias column
    ridge = torch.full((q + 1,), l2, dtype=dtype, device=device)
    ridge[-1] = 0.0  # the bias is not penalised
    theta = torch.zeros(R, q + 1, dtype=dtype, device=device)
    c, y_train = weights.to(dtype), y.to(dtype)

    def loss_of(t: torch.Tensor) -> torch.Tensor:
        logits = torch.einsum("rnq,rq->rn", a, t)
        ll = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_train, reduction="none")
        return (ll * c).sum(dim=1) + 0.5 * (ridge * t * t).sum(dim=1)

    loss = loss_of(theta)
    eye = torch.eye(q + 1, dtype=dtype, device=device) * 1e-10
    for _ in range(max_iter):
        p = torch.sigmoid(torch.einsum("rnq,rq->rn", a, theta))
        grad = torch.einsum("rnq,rn->rq", a, c * (p - y_train)) + ridge * theta
        # bmm, not a three-operand einsum (which materialises an [R, N, q, q] intermediate)
        hess = torch.bmm((a * (c * p * (1 - p))[..., None]).transpose(1, 2), a) + torch.diag(ridge) + eye
        step = torch.linalg.solve(hess, grad[..., None])[..., 0]
        # Newton with backtracking per problem: halve the step where the loss did not decrease.
        t = torch.ones(R, 1, dtype=dtype, device=device)
        for _ in range(30):
            candidate = theta - t * step
            new_loss = loss_of(candidate)
            worse = new_loss > loss + 1e-12
            if not worse.any():
                break
            t = torch.where(worse[:, None], t / 2, t)
        theta = torch.where(worse[:, None], theta, candidate)
        loss = torch.where(worse, loss, new_loss)
        if (t * step).abs().max() < 1e-10:
            break
    beta, b = theta[:, :q], theta[:, q]
    w = beta if vh is None else torch.einsum("rq,rqd->rd", beta, vh)
    return w, b


def fit_cavs(positives: torch.Tensor, negatives: torch.Tensor, *, generator: torch.Generator | None = None,
             heldout: float = 1 / 3, l2: float = 1e-2, max_iter: int = 50) -> CAVs:
    """Fit ``R`` L2-regularised logistic regressions positives-vs-negatives at once.

    ``positives``: ``[R, n, D]``, ``negatives``: ``[R, m, D]`` (run ``r`` is one problem). Each run's
    examples are split at random into a training part and a held-out part (``heldout`` of each
    class, at least one). Features are standardised per run on the training part, so one ``l2``
    suits every layer; the returned vectors are mapped back to the raw activation space.

    Why hand-written: sklearn fits one problem at a time on the CPU. Here the ``R`` problems are
    solved together by batched Newton steps. With more dimensions than training examples (the
    usual case: ``D`` in the hundreds, a few dozen images) the ridge solution lies in the span of
    the examples, so each problem is first reduced exactly to ``N`` coordinates by a batched SVD
    and Newton works on ``[R, N+1, N+1]`` systems, on whatever device the activations are on.
    """
    R, n, D = positives.shape
    m = negatives.shape[1]
    device = positives.device
    n_test, m_test = max(1, round(n * heldout)), max(1, round(m * heldout))
    if n - n_test < 1 or m - m_test < 1:
        raise ProbeInputError(f"too few examples to fit and test a CAV ({n} positives, {m} negatives)")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    perm_p = torch.argsort(torch.rand(R, n, generator=generator, device=gen_device), dim=1).to(device)
    perm_n = torch.argsort(torch.rand(R, m, generator=generator, device=gen_device), dim=1).to(device)
    pos = torch.gather(positives, 1, perm_p[..., None].expand(R, n, D))
    neg = torch.gather(negatives, 1, perm_n[..., None].expand(R, m, D))
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    x_train = torch.cat([pos[:, n_test:], neg[:, m_test:]], dim=1).to(dtype)
    y_train = torch.cat([torch.ones(R, n - n_test), torch.zeros(R, m - m_test)], dim=1).to(device, dtype)
    x_test = torch.cat([pos[:, :n_test], neg[:, :m_test]], dim=1).to(dtype)
    y_test = torch.cat([torch.ones(R, n_test), torch.zeros(R, m_test)], dim=1).to(device, dtype)

    mu = x_train.mean(dim=1, keepdim=True)
    sigma = x_train.std(dim=1, keepdim=True).clamp_min(1e-6)
    z_train = (x_train - mu) / sigma
    z_test = (x_test - mu) / sigma
    # Class-balanced weights: a concept set and a random set may differ in size.
    n_pos, n_neg = y_train.sum(dim=1, keepdim=True), (1 - y_train).sum(dim=1, keepdim=True)
    weights = torch.where(y_train > 0, 0.5 / n_pos, 0.5 / n_neg)  # [R, N], sums to 1 per run
    w, b = ridge_logistic(z_train, y_train, weights, l2=l2, max_iter=max_iter)
    predictions = (torch.einsum("rnd,rd->rn", z_test, w) + b[:, None]) > 0
    accuracy = (predictions == (y_test > 0)).to(dtype).mean(dim=1)
    raw = w / sigma[:, 0]  # w . (x - mu) / sigma  ==  (w / sigma) . x + const
    vectors = raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-12)
    bias = b - (w * mu[:, 0] / sigma[:, 0]).sum(dim=1)
    return CAVs(vectors=vectors.float(), bias=bias.float(), accuracy=accuracy.float())


def tcav_scores(gradients: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``gradients [M, D]``, ``vectors [R, D]`` -> (TCAV score ``[R]``, magnitude ``[R]``).

    Score: share of the ``M`` inputs whose directional derivative along the CAV is positive.
    Magnitude: positive derivative mass / total absolute derivative mass (captum's definition).
    """
    derivatives = vectors.float() @ gradients.float().T  # [R, M]
    scores = (derivatives > 0).float().mean(dim=1)
    magnitude = (derivatives.clamp_min(0).sum(dim=1) / derivatives.abs().sum(dim=1).clamp_min(1e-12))
    return scores, magnitude


def mean_cosine_derivative(gradients: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``[R]``: mean over the inputs of ``cos(gradient, CAV)``, the directional derivative along the
    unit CAV per unit of gradient norm (so no single input dominates). The TCAV score is the
    share of these that are positive; this keeps how far from zero they are."""
    unit = gradients.float() / gradients.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (vectors.float() @ unit.T).mean(dim=1)


# --- statistics ------------------------------------------------------------------------------


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down; same as R's ``p.adjust(p, "holm")``).

    Written out because neither scipy nor the standard library has it: sort ascending, multiply
    the k-th smallest by ``m - k + 1``, carry the running maximum, cap at 1.
    """
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


@dataclass
class Comparison:
    p_value: float
    t_statistic: float
    cohens_d: float
    ci_low: float  # 95% CI of mean(concept) - mean(random)
    ci_high: float


# --- the whole test -------------------------------------------------------------------------


@dataclass
class ConceptLayerResult:
    concept: str
    layer: int
    tcav_score: float  # mean over the concept-vs-random runs
    tcav_score_std: float
    magnitude: float
    random_score: float  # mean over the random-vs-random runs
    random_score_std: float
    p_value: float
    p_adjusted: float
    significant: bool
    cav_accuracy: float  # mean held-out accuracy of the concept CAVs
    reliable: bool
    cohens_d: float
    ci_low: float
    ci_high: float
    runs: int
    scores: list[float] = field(default_factory=list)
    random_scores: list[float] = field(default_factory=list)
    derivative: float = 0.0  # mean cosine directional derivative of the concept CAVs
    random_derivative: float | None = None  # mean over random concepts (when it is the tested statistic)

    def public(self) -> dict[str, Any]:
        """The CLI's result fields (the public contract) plus the supporting statistics."""
        out = asdict(self)
        for key in ("tcav_score", "tcav_score_std", "magnitude", "random_score", "random_score_std", "cav_accuracy",
                    "cohens_d", "ci_low", "ci_high"):
            out[key] = _finite(out[key])
        out["scores"] = [round(s, 6) for s in self.scores]
        out["random_scores"] = [round(s, 6) for s in self.random_scores]
        return out


def _finite(value: float) -> float | None:
    value = float(value)
    if math.isnan(value):
        return None
    if math.isinf(value):
        return math.copysign(1e300, value)
    return round(value, 6)


@dataclass
class TCAVReport:
    target: str
    layers: list[int]
    pooling: str
    random_runs: int
    null_concepts: int
    statistic: str
    set_size: int
    alpha: float
    results: list[ConceptLayerResult]
    cavs: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # mean unit CAV per concept x layer
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "layers": self.layers,
            "pooling": self.pooling,
            "random_runs": self.random_runs,
            "null_concepts": self.null_concepts,
            "statistic": self.statistic,
            "test": f"two-sided t-test of the concept's {self.statistic} against {self.null_concepts} random "
                    "concepts' (prediction interval), Holm-corrected over every concept x layer",
            "set_size": self.set_size,
            "alpha": self.alpha,
            "correction": "holm",
            "min_cav_accuracy": MIN_CAV_ACCURACY,
            "results": [r.public() for r in self.results],
        }


@dataclass
class RunPlan:
    """Which images go into which CAV (indices into the concept folders and the random pool).

    ``k`` examples per side. Concept ``c``, run ``r``: positives ``concept[c][r]`` (a draw from its
    folder) against ``concept_negatives[r]`` (a draw from the random pool). Random concept ``j``
    (a random folder ``F_j`` of ``folder_size`` pool images), run ``r``: positives
    ``null_positives[j, r]`` (a draw from ``F_j``) against ``null_negatives[j, r]`` (a draw from
    the pool outside ``F_j``).
    """

    concept: dict[str, torch.Tensor]  # [R, k]
    concept_negatives: torch.Tensor  # [R, k]
    null_positives: torch.Tensor  # [K, R, k]
    null_negatives: torch.Tensor  # [K, R, k]
    k: int
    folder_size: int


def plan_runs(concept_sizes: dict[str, int], n_random: int, runs: int, null_concepts: int, *, seed: int = 0,
              max_set_size: int = MAX_SET_SIZE) -> RunPlan:
    """Draw every set. ``k = min(smallest concept, n_random // 2, max_set_size)`` so all CAVs of a
    layer have the same shape and batch together; random concept folders have the size of the
    largest concept folder (at most ``n_random - k``, so their negatives stay outside them)."""
    k = min(min(concept_sizes.values()), n_random // 2, max_set_size)
    folder_size = max(k, min(max(concept_sizes.values()), n_random - k))
    g = torch.Generator().manual_seed(seed)
    concept = {name: torch.stack([torch.randperm(size, generator=g)[:k] for _ in range(runs)])
               for name, size in concept_sizes.items()}
    concept_negatives = torch.stack([torch.randperm(n_random, generator=g)[:k] for _ in range(runs)])
    null_pos, null_neg = [], []
    for _ in range(null_concepts):
        perm = torch.randperm(n_random, generator=g)
        folder, rest = perm[:folder_size], perm[folder_size:]
        null_pos.append(torch.stack([folder[torch.randperm(folder_size, generator=g)[:k]] for _ in range(runs)]))
        null_neg.append(torch.stack([rest[torch.randperm(len(rest), generator=g)[:k]] for _ in range(runs)]))
    return RunPlan(concept, concept_negatives, torch.stack(null_pos), torch.stack(null_neg), k, folder_size)


def compare_to_null(concept_runs: np.ndarray, null_means: np.ndarray, confidence: float = 0.95) -> Comparison:
    """Is the concept's TCAV score (mean over its runs) extreme among random concepts' scores?

    Two-sided t-test of one new observation against ``K`` null observations (the prediction
    interval test): ``t = (x - mean) / (sd * sqrt(1 + 1/K))`` with ``K - 1`` degrees of freedom.
    Why not Welch's test of concept runs against random-vs-random runs, as Kim et al. and captum
    do: every concept run reuses the *same* concept folder, so the runs share that folder's
    idiosyncrasies and their spread understates how much a score varies between folders; with
    random folders that test calls ~50% of random concepts significant (measured on the zoo).
    Comparing folder-level scores with folder-level scores keeps the error rate at alpha.
    Cohen's d: ``(x - mean) / sd``; the CI is for the concept's score minus the null mean.
    """
    from scipy import stats

    x = float(np.mean(concept_runs))
    null_means = np.asarray(null_means, float)
    k = len(null_means)
    mean, sd = float(null_means.mean()), float(null_means.std(ddof=1))
    diff = x - mean
    if sd == 0:
        p = 1.0 if diff == 0 else 0.0
        inf = math.copysign(math.inf, diff) if diff else 0.0
        return Comparison(p, inf, inf, diff, diff)
    scale = sd * math.sqrt(1 + 1 / k)
    t = diff / scale
    p = float(2 * stats.t.sf(abs(t), df=k - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=k - 1)) * scale
    return Comparison(p, t, diff / sd, diff - half, diff + half)


def concept_tests(concept_acts: dict[str, dict[int, torch.Tensor]], random_acts: dict[int, torch.Tensor],
                  gradients: dict[int, torch.Tensor], layers: Sequence[int], *, runs: int = DEFAULT_RANDOM_RUNS,
                  null_concepts: int = DEFAULT_NULL_CONCEPTS, alpha: float = DEFAULT_ALPHA, seed: int = 0,
                  min_accuracy: float = MIN_CAV_ACCURACY, statistic: str = DEFAULT_STATISTIC,
                  progress: Progress = no_progress
                  ) -> tuple[list[ConceptLayerResult], dict[tuple[str, int], torch.Tensor], int]:
    """The statistical part of TCAV on precomputed activations and gradients.

    ``concept_acts[name][layer]``: ``[n_c, D]``; ``random_acts[layer]``: ``[n_random, D]``;
    ``gradients[layer]``: ``[M, D]``. Returns results (Holm-adjusted across every concept x layer),
    the mean unit CAV per (concept, layer), and the set size used.
    """
    if runs < MIN_RANDOM_RUNS:
        raise ProbeInputError(f"--random-runs must be at least {MIN_RANDOM_RUNS}, got {runs}")
    if statistic not in STATISTICS:
        raise ProbeInputError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    if null_concepts < MIN_NULL_CONCEPTS:
        raise ProbeInputError(f"null_concepts must be at least {MIN_NULL_CONCEPTS}, got {null_concepts}")
    names = list(concept_acts)
    n_random = next(iter(random_acts.values())).shape[0]
    plan = plan_runs({n: next(iter(a.values())).shape[0] for n, a in concept_acts.items()}, n_random, runs,
                     null_concepts, seed=seed)
    K = null_concepts
    raw: list[dict[str, Any]] = []
    mean_cavs: dict[tuple[str, int], torch.Tensor] = {}
    for li, layer in enumerate(layers):
        pool = random_acts[layer]
        device = pool.device
        # One batch per layer: K*R random-vs-random problems, then R per concept.
        positives = [pool[plan.null_positives.flatten(0, 1).to(device)]]
        negatives = [pool[plan.null_negatives.flatten(0, 1).to(device)]]
        for n in names:
            positives.append(concept_acts[n][layer][plan.concept[n].to(device)])
            negatives.append(pool[plan.concept_negatives.to(device)])
        g = torch.Generator().manual_seed(seed * 1000 + layer)
        cavs = fit_cavs(torch.cat(positives), torch.cat(negatives), generator=g)
        scores_t, magnitude_t = tcav_scores(gradients[layer].to(device), cavs.vectors)
        derivative = mean_cosine_derivative(gradients[layer].to(device), cavs.vectors).cpu().numpy()
        scores, magnitude, accuracy = scores_t.cpu().numpy(), magnitude_t.cpu().numpy(), cavs.accuracy.cpu().numpy()
        tested = derivative if statistic == "derivative" else scores
        null_means = scores[:K * runs].reshape(K, runs).mean(axis=1)
        null_tested = tested[:K * runs].reshape(K, runs).mean(axis=1)
        for ci, name in enumerate(names):
            sl = slice(K * runs + ci * runs, K * runs + (ci + 1) * runs)
            cmp = compare_to_null(tested[sl], null_tested)
            mean_vector = cavs.vectors[sl].mean(dim=0)
            mean_cavs[(name, layer)] = (mean_vector / mean_vector.norm().clamp_min(1e-12)).cpu()
            raw.append(dict(concept=name, layer=layer, tcav_score=float(scores[sl].mean()),
                            tcav_score_std=float(scores[sl].std(ddof=1)), magnitude=float(magnitude[sl].mean()),
                            random_score=float(null_means.mean()), random_score_std=float(null_means.std(ddof=1)),
                            p_value=cmp.p_value, cav_accuracy=float(accuracy[sl].mean()), cohens_d=cmp.cohens_d,
                            ci_low=cmp.ci_low, ci_high=cmp.ci_high, runs=runs, scores=scores[sl].tolist(),
                            random_scores=null_means.tolist(), derivative=float(derivative[sl].mean()),
                            random_derivative=float(null_tested.mean()) if statistic == "derivative" else None))
        progress((li + 1) / len(layers), f"CAVs for layer {layer}")
    adjusted = holm([r["p_value"] for r in raw])
    results = []
    for r, p_adj in zip(raw, adjusted, strict=True):
        reliable = r["cav_accuracy"] >= min_accuracy
        results.append(ConceptLayerResult(p_adjusted=p_adj, significant=bool(reliable and p_adj < alpha),
                                          reliable=bool(reliable), **r))
    return results, mean_cavs, plan.k


def false_positive_rate(random_acts: dict[int, torch.Tensor], concept_pool_acts: dict[int, torch.Tensor],
                        gradients: dict[int, torch.Tensor], layers: Sequence[int], *, trials: int = 100,
                        concept_size: int = MIN_CONCEPT_IMAGES, runs: int = DEFAULT_RANDOM_RUNS,
                        null_concepts: int = DEFAULT_NULL_CONCEPTS, alpha: float = DEFAULT_ALPHA,
                        seed: int = 0) -> dict[str, float]:
    """Calibration check: how often a *random* concept comes out significant.

    Each trial draws ``concept_size`` images from ``concept_pool_acts`` (random images, disjoint
    from the random folder ``random_acts``) as a "concept" folder and tests it at every layer,
    Holm-corrected across the layers as a real audit would. All trials share the activations,
    gradients and the null (computed once) and their CAVs are fitted in one batch per layer.
    Returns the share of trials with any significant layer (the family-wise error rate the
    correction controls), counted on the p-values alone (the reliability gate could only lower
    it), and the share of single tests.
    """
    n = next(iter(concept_pool_acts.values())).shape[0]
    if n < concept_size:
        raise ProbeInputError(f"a concept pool of {n} images is too small for concepts of {concept_size}")
    g = torch.Generator().manual_seed(seed)
    folders = [torch.randperm(n, generator=g)[:concept_size] for _ in range(trials)]
    concept_acts = {f"trial-{t}": {layer: concept_pool_acts[layer][idx] for layer in layers}
                    for t, idx in enumerate(folders)}
    results, _, _ = concept_tests(concept_acts, random_acts, gradients, layers, runs=runs,
                                  null_concepts=null_concepts, alpha=alpha, seed=seed)
    family_errors = single_errors = 0
    for t in range(trials):
        p = [r.p_value for r in results if r.concept == f"trial-{t}"]
        hits = [q < alpha for q in holm(p)]
        family_errors += any(hits)
        single_errors += sum(hits)
    return {"trials": trials, "family_wise_error_rate": family_errors / trials,
            "per_test_rate": single_errors / (trials * len(layers)), "alpha": alpha}


def run_tcav(adapter: DualEncoderAdapter, target: str, inputs: Sequence[Image.Image],
             concepts: Mapping[str, Sequence[Image.Image]], random_images: Sequence[Image.Image], *,
             layers: str | Sequence[int] | None = "auto", runs: int = DEFAULT_RANDOM_RUNS,
             null_concepts: int = DEFAULT_NULL_CONCEPTS, pooling: str = "auto", alpha: float = DEFAULT_ALPHA,
             statistic: str = DEFAULT_STATISTIC, seed: int = 0, batch_size: int = 32,
             progress: Progress = no_progress) -> TCAVReport:
    """TCAV for one text ``target`` over every concept x layer (see the module docstring)."""
    import time

    if not target or not target.strip():
        raise ProbeInputError("the target text is empty")
    if len(inputs) < MIN_TARGET_IMAGES:
        raise ProbeInputError(f"{len(inputs)} target input image(s); at least {MIN_TARGET_IMAGES} are needed")
    for name, images in concepts.items():
        if len(images) < MIN_CONCEPT_IMAGES:
            raise ProbeInputError(f"concept {name!r} has {len(images)} image(s); at least {MIN_CONCEPT_IMAGES} "
                                  "are needed")
    if len(random_images) < MIN_RANDOM_IMAGES:
        raise ProbeInputError(f"{len(random_images)} random image(s); at least {MIN_RANDOM_IMAGES} are needed")
    layer_list = resolve_layers(layers, adapter.num_layers)
    pooling = check_pooling(adapter, pooling)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    progress(0.0, "activations")
    concept_acts = {name: pooled_activations(adapter, images, layer_list, pooling=pooling, batch_size=batch_size)
                    for name, images in concepts.items()}
    random_acts = pooled_activations(adapter, random_images, layer_list, pooling=pooling, batch_size=batch_size)
    seconds["activations"] = time.perf_counter() - t0
    progress(0.4, "gradients")
    t0 = time.perf_counter()
    gradients = target_gradients(adapter, inputs, target, layer_list, pooling=pooling, batch_size=batch_size)
    seconds["gradients"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results, cavs, k = concept_tests(concept_acts, random_acts, gradients, layer_list, runs=runs,
                                     null_concepts=null_concepts, alpha=alpha, statistic=statistic,
                                     seed=seed, progress=lambda f, phase: progress(0.6 + 0.4 * f, phase))
    seconds["cavs_and_tests"] = time.perf_counter() - t0
    return TCAVReport(target=target, layers=layer_list, pooling=pooling, random_runs=runs, null_concepts=null_concepts,
                      statistic=statistic, set_size=k, alpha=alpha,
                      results=results, cavs=cavs, seconds=seconds)


# --- concept localisation ------------------------------------------------------------------


@torch.no_grad()
def concept_heatmaps(adapter: DualEncoderAdapter, images: Sequence[Image.Image], cav: torch.Tensor, layer: int,
                     *, batch_size: int = 32) -> torch.Tensor:
    """``[B, gh, gw]``: each patch token's features at ``layer`` projected onto the unit ``cav``,
    centred on the image's mean projection (positive = more concept-like than the image's average)."""
    gh, gw = adapter.grid
    prefix = adapter.num_prefix_tokens
    maps = []
    for batch in _batches(images, batch_size):
        hidden = adapter.vision_features(adapter.preprocess(batch), [layer])[layer].float()
        projection = hidden[:, prefix:] @ cav.to(hidden.device).float()
        projection = projection - projection.mean(dim=1, keepdim=True)
        maps.append(projection.reshape(len(batch), gh, gw).cpu())
    return torch.cat(maps)


# --- figures ---------------------------------------------------------------------------------


def figure_bars(report: TCAVReport) -> Figure:
    """TCAV scores per concept and layer with one-standard-deviation error bars, the random
    baseline, ``*`` on significant results (after Holm) and hatching on unreliable CAVs."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    concepts = sorted({r.concept for r in report.results})
    layers = report.layers
    # Constrained layout with the legend outside the axes: it can never cover a bar or a star.
    fig = Figure(figsize=(max(6.0, 1.6 * len(concepts) * len(layers) / 2 + 2), 4.4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / (len(layers) + 1)
    by_key = {(r.concept, r.layer): r for r in report.results}
    for li, layer in enumerate(layers):
        xs, ys, es = [], [], []
        for ci, concept in enumerate(concepts):
            r = by_key[(concept, layer)]
            xs.append(ci + li * width)
            ys.append(r.tcav_score)
            es.append(r.tcav_score_std)
        bars = ax.bar(xs, ys, width, yerr=es, capsize=3, label=f"layer {layer}", color=f"C{li}")
        for x, bar, concept in zip(xs, bars, concepts, strict=True):
            r = by_key[(concept, layer)]
            if not r.reliable:
                bar.set_hatch("//")
                bar.set_alpha(0.5)
            if r.significant:
                ax.text(x, min(1.02, r.tcav_score + r.tcav_score_std + 0.02), "*", ha="center", fontsize=14)
    r0 = {r.layer: r for r in report.results}
    rx = [ci + len(layers) * width for ci in range(len(concepts))]
    mean_random = float(np.mean([r.random_score for r in r0.values()]))
    std_random = float(np.mean([r.random_score_std for r in r0.values()]))
    ax.bar(rx, [mean_random] * len(concepts), width, yerr=[std_random] * len(concepts), capsize=3, color="0.7",
           label="random (mean over layers)")
    ax.axhline(0.5, color="0.5", lw=0.8, ls=":")
    ax.set_xticks([ci + len(layers) * width / 2 for ci in range(len(concepts))], concepts)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("TCAV score")
    fig.suptitle(f"TCAV for {report.target!r} (* significant after Holm, hatched = unreliable CAV)", fontsize=9)
    fig.legend(fontsize=8, loc="outside lower center", ncol=min(len(layers) + 1, 5), frameon=False)
    from workers.probes.captions import describe

    return describe(fig, f"Concept influence (TCAV score) on {report.target!r}",
                    columns="one concept each, one bar per layer tested, then the random concepts' mean",
                    axes="y, TCAV score (0.5 = no influence; error bars one standard deviation)",
                    marks="* significant after Holm correction; hatched bars are unreliable concept directions")


def figure_localisation(images: Sequence[Image.Image], heatmaps: torch.Tensor, title: str) -> Figure:
    """Concept localisation overlays: the heatmap (upsampled) over each image."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from workers.probes.figures import describe, draw_overlay, relevance_colourbar

    n = len(images)
    fig = Figure(figsize=(1.9 * n + 1.0, 2.7), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, image, heat in zip(axes, images, heatmaps, strict=True):
        draw_overlay(ax, image, heat)  # the shared overlay style (figures.draw_overlay says why)
    relevance_colourbar(fig, list(axes), fraction=0.04, pad=0.02, label="concept-likeness\n(min-max scaled)")
    fig.suptitle(title, fontsize=9)
    return describe(fig, f"Where the concept sits: {title}",
                    columns="one image each, concept examples first, then target inputs, in grey",
                    colour="how much more concept-like each region's features are than the image's average "
                           "(projection on the concept's direction), min-max scaled per image (colour bar on the "
                           "right)")


# --- entry points shared by the CLI and the pipeline ------------------------------------------


def tcav_from_folders(adapter: DualEncoderAdapter, *, inputs_dir: str | Path, concepts_dir: str | Path, target: str,
                      concepts: Sequence[str] | None = None, layers: str | Sequence[int] | None = "auto",
                      runs: int = DEFAULT_RANDOM_RUNS, null_concepts: int = DEFAULT_NULL_CONCEPTS,
                      pooling: str = "auto", alpha: float = DEFAULT_ALPHA, statistic: str = DEFAULT_STATISTIC,
                      seed: int = 0, batch_size: int = 32, progress: Progress = no_progress,
                      localisation_images: int = 4) -> tuple[TCAVReport, dict[str, Any]]:
    """Load the folders, run TCAV, and draw the figures. Returns ``(report, figures)``."""
    input_paths = load_image_folder(inputs_dir, minimum=MIN_TARGET_IMAGES, what="target inputs")
    concept_paths, random_paths = load_concepts_dir(concepts_dir, concepts)
    # Validate the layers before decoding anything: a typo should fail fast.
    resolve_layers(layers, adapter.num_layers)
    inputs = load_images(input_paths)
    concept_images = {name: load_images(paths) for name, paths in concept_paths.items()}
    random_images = load_images(random_paths)
    report = run_tcav(adapter, target, inputs, concept_images, random_images, layers=layers, runs=runs,
                      null_concepts=null_concepts, pooling=pooling, statistic=statistic, alpha=alpha, seed=seed,
                      batch_size=batch_size, progress=progress)
    figures: dict[str, Any] = {"tcav_bars": figure_bars(report)}
    for name, images in concept_images.items():
        best = max((r for r in report.results if r.concept == name), key=lambda r: (r.reliable, r.cav_accuracy))
        shown = list(images[:localisation_images // 2]) + list(inputs[:localisation_images - localisation_images // 2])
        heat = concept_heatmaps(adapter, shown, report.cavs[(name, best.layer)], best.layer)
        figures[f"localisation_{_safe(name)}"] = figure_localisation(
            shown, heat, f"where {name!r} sits (layer {best.layer}): concept examples, then target inputs")
    return report, figures


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60] or "concept"


def findings_for(report: TCAVReport) -> list[Finding]:
    findings = []
    for r in report.results:
        if r.significant:
            direction = "raises" if r.tcav_score > r.random_score else "lowers"
            findings.append(Finding("medium", f"concept {r.concept!r} {direction} the score for {report.target!r} "
                                              f"at layer {r.layer}",
                                    f"TCAV {r.tcav_score:.2f} vs random {r.random_score:.2f}, "
                                    f"p_adj={r.p_adjusted:.2g}, d={r.cohens_d:.2f}, CAV accuracy {r.cav_accuracy:.2f}"))
        elif not r.reliable:
            findings.append(Finding("info", f"CAV for {r.concept!r} at layer {r.layer} is unreliable",
                                    f"held-out accuracy {r.cav_accuracy:.2f} < {MIN_CAV_ACCURACY}: the concept is not "
                                    "linearly separable from random images there; its TCAV score is not evidence"))
    return findings


class TcavParams(KindParams):
    inputs: str = Field(min_length=1, description="folder of target images (e.g. images of the class)")
    target: str = Field(min_length=1, description="the text whose score is tested, e.g. 'a red circle'")
    concepts: Annotated[list[str] | None, Flag(name="--concept")] = Field(
        None, min_length=1, description="concept folders to test (default: every folder but random/)")
    layers: str | list[int] = Field("auto", description="'auto' (every few layers) or the layers, e.g. [2, 4] or '2,4'")
    random_runs: int = Field(DEFAULT_RANDOM_RUNS, ge=2, le=500,
                             description="concept-vs-random and random-vs-random CAVs per concept and layer")
    null_concepts: int = Field(DEFAULT_NULL_CONCEPTS, ge=1, le=500,
                               description="random concepts (each with random_runs CAVs) forming the null")
    statistic: Literal["derivative", "tcav_score"] = Field(
        DEFAULT_STATISTIC, description="what the test compares with random concepts: the mean cosine directional "
                                       "derivative or the TCAV score itself")
    pooling: Literal["auto", "cls", "mean"] = Field("auto", description="activation per image: CLS token or "
                                                                        "mean of patch tokens (auto: CLS where there "
                                                                        "is one)")
    alpha: float = Field(DEFAULT_ALPHA, gt=0, lt=1, description="family-wise error rate after Holm")
    seed: Seed = 0
    batch_size: BatchSize = 32


def _cli_text(result: ProbeResult, params: TcavParams) -> str:
    lines = [result.summary]
    for r in result.metrics["results"]:
        mark = "*" if r["significant"] else (" " if r["reliable"] else "?")
        lines.append(f"{mark} {r['concept']:<20} layer {r['layer']:>2}  TCAV {r['tcav_score']:.2f} "
                     f"(random {r['random_score']:.2f})  p_adj {r['p_adjusted']:.3g}  CAV acc {r['cav_accuracy']:.2f}")
    lines.append("* significant after Holm correction; ? unreliable CAV (held-out accuracy < 0.7)")
    return "\n".join(lines)


@probe_kind(
    "tcav", title="Concept tests (TCAV)", section="bias", params=TcavParams,
    help="concept activation vector tests with corrected significance", present=_cli_text,
    dataset=DatasetArg(flag="--concepts", required=True,
                       help="folder with one sub-folder per concept and random/"),
    glossary={
        "tcav_score": Metric("TCAV score", "share of target inputs whose score rises along the concept's direction"),
        "random_score": Metric("TCAV score of random concepts", "the same for random image sets: the null"),
        "p_adjusted": Metric("Corrected p-value", "p-value after Holm correction for the concepts and layers tested"),
        "significant": Metric("Significant", "the concept's effect differs from random concepts after correction"),
        "cav_accuracy": Metric("CAV accuracy", "held-out accuracy of the concept-vs-random classifier; below 0.7 the "
                                               "concept direction is not evidence"),
        "cohens_d": Metric("Cohen's d", "effect size of the concept against random concepts"),
    })
def tcav_kind(model_dir: str, dataset_dir: str | None, params: TcavParams, *, device: str = "cpu",
              progress: Progress = no_progress) -> ProbeResult:
    """``dataset_dir``: the concepts folder (one folder per concept and ``random/``)."""
    from workers.probes import suite

    if not dataset_dir:
        raise ProbeInputError("tcav needs a concepts folder (one folder per concept and random/)")
    adapter = suite.load_model(model_dir, device, family="dual_encoder")
    report, figures = tcav_from_folders(
        adapter, inputs_dir=params.inputs, concepts_dir=dataset_dir, target=params.target,
        concepts=params.concepts, layers=params.layers, runs=params.random_runs,
        null_concepts=params.null_concepts, pooling=params.pooling, statistic=params.statistic,
        alpha=params.alpha, seed=params.seed, batch_size=params.batch_size, progress=progress)
    significant = [r for r in report.results if r.significant]
    summary = (f"TCAV for {report.target!r}: {len(report.results)} concept x layer test(s), "
               f"{len(significant)} significant after Holm correction (alpha {report.alpha}).")
    return ProbeResult(kind="tcav", metrics=report.as_dict(), summary=summary, figures=figures,
                       findings=findings_for(report), seed=params.seed)

