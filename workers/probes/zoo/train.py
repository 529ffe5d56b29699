"""Training the zoo's tiny dual encoders on the synthetic world.

The models are transformers' own ``CLIPModel`` and ``SiglipModel`` built from small configs,
with a word-level tokenizer and the stock image processors, so they save and load exactly like
any other Hugging Face checkpoint and exercise the same code paths an audited model would.

Objective: the text is a *single-object* prompt ("a red circle") naming one object present in
the image, because the grounding question the zoo validates is "where is the red circle?".
The loss (``contrastive_loss``) is a multi-positive InfoNCE with in-batch negatives: every true
(image, prompt) pair is a positive term, the other true pairs are masked out rather than pushed
apart (a batch often holds two images with a red circle), and ``extra_prompts`` (by default
every colour x shape prompt) join the text side as hard negatives, so an image with a red circle
and a blue square is also contrasted with "a red square" and "a blue circle". SigLIP's pairwise
sigmoid loss (``TrainConfig.loss="sigmoid"``) trains the zoo's SigLIP, as SigLIP is trained, so the
zoo exercises a pooling head that learned under it; it needs a logit bias initialised near the
prior log-odds of a true pair (``build_model``'s ``logit_bias``) to learn in the short CPU budget.

``train_dual_encoder`` is deliberately generic (scene sampler, caption function, positives
function, config), because the shortcut zoo reuses it with a watermark-biased world.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast, SiglipConfig, SiglipModel

from workers.probes.zoo import world

#: World stream the reference models are trained on (evaluation splits use other seeds).
TRAIN_SEED = 0

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
#: Special token ids. EOS must not be 2: transformers' CLIP text model treats
#: ``eos_token_id == 2`` as a legacy config and pools at ``argmax(input_ids)`` instead of at the
#: first EOS token.
SPECIAL_IDS = {PAD: 0, UNK: 1, BOS: 2, EOS: 3}
#: Words beyond the world's own, so paraphrased prompts ("a photo of a red circle.") and the
#: robustness probes' synonyms tokenise to known ids rather than ``<unk>`` (they are untrained).
EXTRA_WORDS = [
    "a", "an", "the", "and", ",", ".", "of", "with", "in", "on", "to", "is", "this", "there", "photo", "picture",
    "image", "shape", "object", "objects", "left", "right", "top", "bottom", "middle", "centre", "center", "next",
    "above", "below", "small", "large", "big", "star", "plus", "ring", "round", "box", "rectangle", "disk", "disc",
    "purple", "orange", "white", "black", "grey", "gray", "pink", "stamp", "watermark", "logo", "mark",
]
MAX_TEXT_LENGTH = 16


def vocabulary() -> list[str]:
    """Every token of the zoo tokenizer, in id order (specials first)."""
    words: list[str] = list(SPECIAL_IDS)
    for w in (*world.COLOURS, *world.SHAPES, *EXTRA_WORDS):
        if w not in words:
            words.append(w)
    return words


def word_level_tokenizer(words: Sequence[str], max_length: int) -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    """``(tokenizer, vocab)``: a minimal ``[BOS] ... [EOS]`` word-level tokenizer over ``words`` (ids:
    ``[PAD]`` 0, ``[UNK]`` 1, ``[BOS]`` 2, the words, then ``[EOS]``), for the random models that tests
    and benchmarks build from a config. The zoo's own models use ``build_tokenizer``."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2}
    for w in words:
        vocab[w] = len(vocab)
    vocab["[EOS]"] = len(vocab)
    tk = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", vocab["[EOS]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]", model_max_length=max_length)
    return fast, vocab


def build_tokenizer(*, model_input_names: Sequence[str] = ("input_ids", "attention_mask")) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that ``AutoTokenizer`` loads from the saved directory.

    Lower-cases, splits on whitespace and punctuation, wraps every text as ``<bos> ... <eos>``
    and pads with ``<pad>`` on the right. For SigLIP pass ``model_input_names=("input_ids",)``:
    like Google's SigLIP tokenizers it then returns no attention mask, because SigLIP's text
    tower is trained (and pools its last token) without one.
    """
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tk = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, SPECIAL_IDS[BOS]), (EOS, SPECIAL_IDS[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_TEXT_LENGTH,
        padding_side="right",
        model_input_names=list(model_input_names),
    )


@dataclass(frozen=True)
class ArchSpec:
    """Size of a tiny dual encoder (both towers)."""

    image_size: int = 112
    patch_size: int = 16
    vision_hidden: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    projection_dim: int = 64


def _text_config(spec: ArchSpec, vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=4 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=MAX_TEXT_LENGTH,
        pad_token_id=SPECIAL_IDS[PAD],
        bos_token_id=SPECIAL_IDS[BOS],
        eos_token_id=SPECIAL_IDS[EOS],
    )


def _vision_config(spec: ArchSpec) -> dict:
    return dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        num_channels=3,
    )


def tiny_clip_config(spec: ArchSpec = ArchSpec(), vocab_size: int | None = None) -> CLIPConfig:
    """A ViT CLIP with a CLS token: ``(image_size / patch_size)^2`` patches + 1 CLS."""
    return CLIPConfig(
        text_config=_text_config(spec, vocab_size or len(vocabulary())),
        vision_config=_vision_config(spec),
        projection_dim=spec.projection_dim,
    )


def tiny_siglip_config(spec: ArchSpec = ArchSpec(), vocab_size: int | None = None) -> SiglipConfig:
    """A SigLIP: no CLS token, attention-pooling head; text pooled at the last position.

    SigLIP has no projection on the image side, so the text head projects to the vision
    width (``projection_size = vision_hidden``).
    """
    text = _text_config(spec, vocab_size or len(vocabulary()))
    text["projection_size"] = spec.vision_hidden
    return SiglipConfig(text_config=text, vision_config=_vision_config(spec))


def build_image_processor(kind: str, image_size: int) -> Any:
    """The stock processor for ``kind`` ("clip" or "siglip"), resizing to ``image_size``.

    CLIP: shortest edge + centre crop, bicubic, OpenAI mean/std (the ``CLIPImageProcessor``
    defaults). SigLIP: plain resize, mean = std = 0.5 (the ``SiglipImageProcessor`` defaults).
    The PIL backends are used because torchvision is optional; the saved
    ``preprocessor_config.json`` names the ordinary ``CLIPImageProcessor`` /
    ``SiglipImageProcessor`` type, so ``AutoImageProcessor`` picks whichever backend is installed.
    """
    if kind == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    if kind == "siglip":
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    raise ValueError(f"unknown dual-encoder kind {kind!r}")


def build_model(kind: str, spec: ArchSpec = ArchSpec(), seed: int = 0, *,
                logit_bias: float = -10.0) -> CLIPModel | SiglipModel:
    """Freshly initialised tiny model (``kind`` "clip" or "siglip"), deterministic in ``seed``.

    ``logit_bias``: SigLIP's initial bias. The paper's -10 suits its batches of thousands of
    negatives per positive; with a few dozen texts per image the prior log-odds of a true pair are
    nearer -3, and Adam moves the bias by about the learning rate per step, so starting at -10
    spends thousands of steps on the bias alone before the towers get a useful signal."""
    torch.manual_seed(seed)
    if kind == "clip":
        return CLIPModel(tiny_clip_config(spec))
    if kind == "siglip":
        model = SiglipModel(tiny_siglip_config(spec))
        # The SigLIP paper's initialisation (t' = log 10, b negative): with many negatives per
        # positive, starting from a negative bias avoids a large initial loss.
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(logit_bias)
        return model
    raise ValueError(f"unknown dual-encoder kind {kind!r}")


# --- training ---------------------------------------------------------------------------------

SceneFn = Callable[[int], "world.Scene"]
CaptionFn = Callable[["world.Scene", np.random.Generator], str]
PositivesFn = Callable[["world.Scene"], set[str]]


def one_object_caption(scene: world.Scene, rng: np.random.Generator) -> str:
    """A uniformly random object of the scene, as ``"a red circle"``."""
    return scene.objects[int(rng.integers(len(scene.objects)))].prompt


def present_objects(scene: world.Scene) -> set[str]:
    """Every single-object prompt true for the scene."""
    return {o.prompt for o in scene.objects}


def prompt_grid(shapes: Sequence[str] = world.SHAPES, colours: Sequence[str] = world.COLOURS) -> list[str]:
    """Every ``"a <colour> <shape>"`` prompt of the world (16 by default)."""
    return [world.object_prompt(c, s) for c in colours for s in shapes]


@dataclass
class TrainConfig:
    """Hyper-parameters of ``train_dual_encoder`` (recorded in the model card)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    #: Scenes rendered once and sampled from (with a horizontal flip) during training.
    pool_size: int = 3000
    seed: int = 0
    #: torch intra-op threads; results are bit-identical for a fixed thread count on the same kind of
    #: CPU. Another instruction set rounds differently and the runs drift apart: the committed
    #: tiny-siglip, retrained on a 2-core AVX2 EPYC (twice, bit-identical there), differs from step ~60
    #: on (loss 2.6693 vs 2.6694) and ends at held-out object accuracy 0.784 vs 0.791.
    threads: int = 2
    #: Extra prompts on the text side of every batch (hard negatives); ``None`` = all objects.
    extra_prompts: list[str] | None = None
    flip: bool = True
    #: "infonce" (multi-positive, masked false negatives) or "sigmoid" (SigLIP's pairwise loss).
    loss: str = "infonce"


@dataclass
class TrainResult:
    model: CLIPModel | SiglipModel
    losses: list[float]
    seconds: float
    cpu_seconds: float
    config: TrainConfig = field(default_factory=TrainConfig)


def _render_pool(
    scene_fn: SceneFn, n: int, image_processor: Any, progress: bool
) -> tuple[list[world.Scene], torch.Tensor]:
    """Render ``n`` scenes and resize them once; returns uint8 ``[n, 3, S, S]``."""
    scenes: list[world.Scene] = []
    chunks: list[torch.Tensor] = []
    batch: list[Image.Image] = []
    for i in tqdm(range(n), desc="render scenes", disable=not progress, leave=False):
        scene = scene_fn(i)
        scenes.append(scene)
        batch.append(scene.image)
        if len(batch) == 256 or i == n - 1:
            out = image_processor(images=batch, do_rescale=False, do_normalize=False, return_tensors="pt")
            chunks.append(out["pixel_values"].round().clamp(0, 255).to(torch.uint8))
            batch = []
    return scenes, torch.cat(chunks)


def _normaliser(image_processor: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    scale = float(image_processor.rescale_factor)
    return lambda u8: (u8.float() * scale - mean) / std


def _tokenise(tokenizer: Any, texts: list[str], siglip: bool, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    if siglip:
        # SigLIP pools the *last* position, which is <eos> or <pad> depending on how callers pad
        # (Google pads to max_length). Training on a random pad length makes the embedding the
        # same whichever padding an adapter uses.
        longest = max(len(tokenizer(t)["input_ids"]) for t in texts)
        length = int(rng.integers(longest, MAX_TEXT_LENGTH + 1))
        enc = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"]}
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """Loss for image x prompt ``logits [B, P]`` with ``positives [B, P]`` marking true pairs.

    CLIP: multi-positive InfoNCE in both directions. Every true pair (i, j) is one term: a
    softmax over row i (image -> prompts) and one over column j (prompt -> images), in which the
    *other* true pairs are masked out, since they are not negatives. Using every object of an
    image (not only the sampled caption) triples the signal per image in multi-object scenes.
    SigLIP: the pairwise sigmoid loss, summed over prompts and averaged over images.
    """
    if sigmoid:
        signs = positives.float() * 2 - 1
        return -F.logsigmoid(signs * logits).sum(dim=1).mean()
    neg_inf = torch.finfo(logits.dtype).min
    rows, cols = positives.nonzero(as_tuple=True)
    # For pair k = (rows[k], cols[k]): mask the other positives of its row / column.
    row_logits = logits[rows].masked_fill(positives[rows], neg_inf)
    row_logits[torch.arange(len(rows)), cols] = logits[rows, cols]
    col_logits = logits[:, cols].T.masked_fill(positives[:, cols].T, neg_inf)
    col_logits[torch.arange(len(rows)), rows] = logits[rows, cols]
    return (F.cross_entropy(row_logits, cols) + F.cross_entropy(col_logits, rows)) / 2


def train_dual_encoder(
    model: CLIPModel | SiglipModel,
    tokenizer: Any,
    image_processor: Any,
    scene_fn: SceneFn,
    *,
    caption_fn: CaptionFn = one_object_caption,
    positives_fn: PositivesFn = present_objects,
    config: TrainConfig | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place on scenes from ``scene_fn`` and return it with its loss curve.

    - ``scene_fn(i)`` returns training scene ``i`` (e.g. ``lambda i: world.scene_at(0, i)``);
      ``config.pool_size`` of them are rendered once and resampled (with horizontal flips).
    - ``caption_fn(scene, rng)`` picks the training text for a scene (default: one present
      object, "a red circle").
    - ``positives_fn(scene)`` is the set of texts that are true for the scene; true pairs other
      than the sampled one are never used as negatives.

    Deterministic for a given ``config.seed`` and ``config.threads`` (one process; the thread
    count changes the order of float reductions).
    """
    cfg = config or TrainConfig()
    siglip = isinstance(model, SiglipModel)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 101])
    t0, c0 = time.perf_counter(), time.process_time()

    scenes, pool = _render_pool(scene_fn, cfg.pool_size, image_processor, progress)
    true_sets = [positives_fn(s) for s in scenes]
    normalise = _normaliser(image_processor)
    extra = list(prompt_grid() if cfg.extra_prompts is None else cfg.extra_prompts)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=f"train {type(model).__name__}", disable=not progress)
    for _step in bar:
        idx = rng.choice(len(scenes), size=cfg.batch_size, replace=False)
        pixels = pool[torch.as_tensor(idx)]
        if cfg.flip:
            flip = torch.as_tensor(rng.random(cfg.batch_size) < 0.5)
            pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        captions = [caption_fn(scenes[i], rng) for i in idx]
        texts = list(dict.fromkeys([*captions, *extra]))
        col = {t: j for j, t in enumerate(texts)}
        positives = torch.tensor([[t in true_sets[i] for t in texts] for i in idx])
        positives[torch.arange(len(idx)), torch.tensor([col[c] for c in captions])] = True

        out = model(pixel_values=normalise(pixels), **_tokenise(tokenizer, texts, siglip, rng))
        loss = contrastive_loss(out.logits_per_image, positives, cfg.loss == "sigmoid")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if _step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    model.eval()
    return TrainResult(
        model=model,
        losses=losses,
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.process_time() - c0,
        config=cfg,
    )


# --- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def score_matrix(model: Any, tokenizer: Any, image_processor: Any, images: Sequence[Image.Image],
                 prompts: Sequence[str]) -> torch.Tensor:
    """Image x prompt logits ``[N, P]`` through the *saved* preprocessing path (processor
    normalisation, tokenizer padding to ``max_length`` as SigLIP callers do)."""
    siglip = isinstance(model, SiglipModel)
    enc = tokenizer(list(prompts), padding="max_length" if siglip else True, truncation=True, return_tensors="pt")
    text = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
    rows = []
    for i in range(0, len(images), 64):
        px = image_processor(images=list(images[i : i + 64]), return_tensors="pt")["pixel_values"]
        rows.append(model(pixel_values=px, **text).logits_per_image)
    return torch.cat(rows)


def zero_shot_accuracy(model: Any, tokenizer: Any, image_processor: Any,
                       scenes: Sequence[world.Scene]) -> dict[str, float]:
    """Zero-shot quality on scenes, against every colour x shape prompt of the world.

    - ``object_accuracy``: for each object in each image, its prompt outscores every prompt
      of an object *not* in the image (including colour/shape swaps of present objects);
      chance is about ``1 / (16 - n_objects + 1)``.
    - ``top1_present``: the image's best prompt names an object that is present
      (chance = n_objects / 16).
    - ``binding_accuracy``: for each object, its prompt outscores the prompts that keep its
      colour or its shape but swap the other attribute and name no present object.
    """
    prompts = prompt_grid()
    logits = score_matrix(model, tokenizer, image_processor, [s.image for s in scenes], prompts)
    obj_hits = obj_n = top_hits = bind_hits = bind_n = 0
    for s, row in zip(scenes, logits, strict=True):
        present = {o.prompt for o in s.objects}
        absent = [j for j, p in enumerate(prompts) if p not in present]
        top_hits += prompts[int(row.argmax())] in present
        for o in s.objects:
            j = prompts.index(o.prompt)
            obj_hits += bool(row[j] > row[absent].max())
            obj_n += 1
            swaps = [
                k
                for k, p in enumerate(prompts)
                if p not in present and (p.split()[1] == o.colour) != (p.split()[2] == o.shape)
            ]
            if swaps:
                bind_hits += bool(row[j] > row[swaps].max())
                bind_n += 1
    return {
        "object_accuracy": obj_hits / obj_n,
        "top1_present": top_hits / len(scenes),
        "binding_accuracy": bind_hits / max(1, bind_n),
        "n_images": len(scenes),
        "n_objects": obj_n,
    }


def config_dict(cfg: TrainConfig, spec: ArchSpec) -> dict:
    return {"train": asdict(cfg), "architecture": asdict(spec)}
