"""The zoo's tiny generative captioner: a LLaVA-style model trained on the synthetic world.

Why: token attribution, cross-modal attention statistics and interventions for generative VLMs
need a model whose ground truth is known. This one looks at a world scene and writes its
caption ("a blue square, a green triangle and a red cross", objects left to right), so every
generated colour and shape word names exactly one object with a known box.

Architecture: a stock ``LlavaForConditionalGeneration`` built from a tiny config, so it loads
like any LLaVA checkpoint (``AutoProcessor`` + ``LlavaForConditionalGeneration.from_pretrained``):

- vision tower: the zoo's ``tiny-clip`` vision transformer (96 px, 8 px patches: a 12 x 12 grid,
  plus CLS), copied from that checkpoint when the captioner is built and kept frozen (the LLaVA
  recipe: a tower that already grounds colours and shapes, see its model card);
- projector: LLaVA's 2-layer MLP on the tower's second-to-last layer ("-2"), CLS dropped ("default");
- language model: a 3-layer Llama with a word-level tokenizer (``<image>`` is a special token).

Inputs are built by the saved ``LlavaProcessor``: ``processor(images=img, text="<image> describe
the image")`` expands ``<image>`` to the 144 image tokens and prepends ``<s>``; the model then
generates the caption followed by ``</s>``. Training prompts are drawn from ``PROMPTS`` so that
prompt-paraphrase consistency can be measured.

Training: teacher forcing with the loss on the caption only, plus attention supervision
(``grounding_loss``): where the model predicts a colour or shape word, its decoder attention over
the image tokens is pulled onto the named object's cells. Only the projector and the language
model learn, from the frozen tower's features computed once, which keeps the build within a few
CPU-minutes.

``python -m workers.probes.zoo build --only tiny-llava`` (part of ``zoo build``, after the dual
encoders) or ``python -m workers.probes.zoo.captioner build [--out DIR]`` retrains it (deterministic
seeds; see ``TrainSpec``) on the ``tiny-clip`` checkpoint the zoo holds at that time and writes the
checkpoint, model card, ``training.json`` and ``SHA256SUMS``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.probes.zoo import file_sha256, world

if TYPE_CHECKING:
    import torch
    from numpy.typing import NDArray
    from PIL import Image
    from transformers import LlavaConfig, LlavaProcessor, PreTrainedTokenizerFast

#: a caption word that names one object: ``(batch row, position predicting the word, object box, scene size)``
Grounding = tuple[int, int, Sequence[float], int]

NAME = "tiny-llava"
#: The zoo dual encoder whose vision tower the captioner reuses (loaded at build time, so a
#: rebuild picks up whatever ``tiny-clip`` checkpoint the zoo holds then).
VISION_SOURCE = "tiny-clip"
#: Streams of training scenes (the zoo keeps training seeds below 1000; evaluation uses others).
TRAIN_SEED = 501
REPEATED_SHAPES_SEED = 502
#: Geometry of the committed checkpoint (the build takes it from the vision source's config; a
#: rebuilt tiny-clip with another patch size changes these in the new checkpoint's config).
IMAGE_SIZE = 96
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE
#: Prompt paraphrases seen in training (the first is the default).
PROMPTS: tuple[str, ...] = (
    "describe the image",
    "what is in the picture ?",
    "list the objects",
    "caption this image",
)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TrainSpec:
    """Everything that determines the trained weights (recorded in the model card)."""

    train_scenes: int = 6000
    steps: int = 1200
    #: optional second cosine cycle with a fresh optimizer ("warm restart"); 0 in the committed build
    restart_steps: int = 0
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 50
    seed: int = 0
    #: one thread, like the zoo's dual encoders: the build then fits a 2-core machine that also runs
    #: something else (measured build time in ``training.json``)
    torch_threads: int = 1
    eval_scenes: int = 64
    #: zoo checkpoint whose vision tower is copied in (``None``: a fresh 2-layer ViT, 12 px patches)
    vision_source: str | None = VISION_SOURCE
    #: vision layer the projector reads (LLaVA's -2: the last layer's patch outputs never fed the
    #: dual encoder's contrastive loss, only its CLS token did)
    vision_feature_layer: int = -2
    #: the copied vision tower stays frozen (its features are then computed once, not per step)
    freeze_vision: bool = True
    #: weight of the attention-supervision term (``grounding_loss``); 0 turns it off
    grounding_weight: float = 0.5
    #: share of training scenes drawn with repeated shapes (distinct colours: "a red cross and a
    #: blue cross"), so that two objects of one shape are not out of distribution
    repeated_shape_fraction: float = 0.25
    #: share of training images that get scattered object fragments (``add_fragments``)
    fragment_fraction: float = 0.4


def vocabulary() -> list[str]:
    words: list[str] = ["a", "and", ","]
    words += list(world.COLOURS) + list(world.SHAPES)
    for p in PROMPTS:
        for w in p.split():
            if w not in words:
                words.append(w)
    return list(SPECIAL_TOKENS) + words


def _vision_source_dir(name: str | os.PathLike) -> Path:
    """A zoo checkpoint name (checksums verified) or a directory."""
    from workers.probes.zoo import checkpoint_path

    return Path(name) if os.sep in str(name) or Path(name).is_dir() else checkpoint_path(str(name))


def build_tokenizer(extra_special: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """The word-level tokenizer over ``vocabulary()`` (``<s>`` prepended); ``extra_special``: a family's
    layout markers, appended to the vocabulary as special tokens (matched whole, never split)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*vocabulary(), *extra_special])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=512,
    )
    if extra_special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return tokenizer


def build_processor(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE,
                    image_processor: Any = None) -> LlavaProcessor:
    """A ``LlavaProcessor`` with a word-level tokenizer and a CLIP image processor (the vision
    source's own when given, so pixels are normalised exactly as its tower was trained)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = build_tokenizer()
    if image_processor is None:
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which "default" drops
    )


def build_config(vocab_size: int, image_token_id: int, pad_id: int, bos_id: int, eos_id: int,
                 vision: Any = None, vision_feature_layer: int = -1) -> LlavaConfig:
    """The LLaVA config; ``vision`` a ``CLIPVisionConfig`` (default: a fresh 2-layer, 12 px-patch ViT)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if vision is None:
        vision = CLIPVisionConfig(
            hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            image_size=96, patch_size=12, projection_dim=64,
        )
    grid = vision.image_size // vision.patch_size
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        image_seq_length=grid * grid, vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config.pad_token_id = pad_id
    config.bos_token_id = bos_id
    config.eos_token_id = eos_id
    return config


def _encode_batch(processor: Any, scenes: Sequence[world.Scene], prompts: Sequence[str], n_image_tokens: int,
                  image_text: str | None = None, prefix_ids: Callable[[str], list[int]] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Grounding]]:
    """Token ids and label mask for teacher forcing: loss only on the caption and ``</s>``.

    Also returns ``grounding``: ``(row, position, box, scene size)`` for every caption word that
    names one object (a colour or shape word), ``position`` being the position whose output predicts it.
    ``image_text``: what stands for the image (default ``n_image_tokens`` ``<image>`` tokens; a family
    whose processor writes layout markers around them passes its expansion).
    ``prefix_ids``: the ids before the caption for a prompt (default: ``n_image_tokens`` image tokens
    and the prompt, LLaVA's layout).
    """
    import torch

    tok = processor.tokenizer
    image_tokens = "<image>" * n_image_tokens if image_text is None else image_text
    rows: list[list[int]] = []
    label_rows: list[list[int]] = []
    grounding: list[Grounding] = []
    for b, (scene, prompt) in enumerate(zip(scenes, prompts, strict=True)):
        prefix = prefix_ids(prompt) if prefix_ids is not None else tok(image_tokens + " " + prompt).input_ids
        words = tok(scene.caption, add_special_tokens=False).input_ids
        caption = words + [tok.eos_token_id]
        tokens = tok.convert_ids_to_tokens(words)
        for k, word in enumerate(tokens):
            if word != "a" or k + 2 >= len(tokens):
                continue  # each object is "a <colour> <shape>"; no two objects share both
            named = [o for o in scene.objects if (o.colour, o.shape) == (tokens[k + 1], tokens[k + 2])]
            if len(named) == 1:
                for w in (k + 1, k + 2):
                    grounding.append((b, len(prefix) + w - 1, named[0].box, scene.size))
        rows.append(prefix + caption)
        label_rows.append([-100] * len(prefix) + caption)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
    return ids, labels, mask, grounding


def object_cells(box: Sequence[float], size: tuple[int, int], image_size: int, patch_size: int) -> NDArray[np.bool_]:
    """Boolean ``[grid * grid]`` mask of the vision cells whose centre lies inside ``box`` (pixels
    of a stored image of ``size`` (w, h), square: the processor only rescales it); the cell
    nearest the box centre when no centre falls inside."""
    grid = image_size // patch_size
    w, h = size
    centres = (np.arange(grid) + 0.5) * patch_size
    cx, cy = centres * w / image_size, centres * h / image_size
    inside = ((cy[:, None] >= box[1]) & (cy[:, None] < box[3]) & (cx[None, :] >= box[0]) & (cx[None, :] < box[2]))
    if not inside.any():
        r = int(np.argmin(np.abs(cy - (box[1] + box[3]) / 2)))
        c = int(np.argmin(np.abs(cx - (box[0] + box[2]) / 2)))
        inside[r, c] = True
    return inside.reshape(-1)


def grounding_loss(attentions: Sequence[torch.Tensor], ids: torch.Tensor, image_id: int, grounding: Sequence[Grounding],
                   image_size: int, patch_size: int,
                   token_mask: Callable[[Sequence[float], int], NDArray[np.bool_]] | None = None) -> torch.Tensor:
    """Attention supervision (as in grounded captioning, e.g. Zhou et al., CVPR 2020): at every
    position that predicts a colour or shape word, the decoder's attention over the image tokens
    (mean over heads, every layer) should fall on the named object's cells. ``-log`` of that
    share, averaged over positions and layers. The attention to text tokens is left free.
    ``token_mask(box, scene size)``: the image tokens that show the object, for a family whose image
    tokens are not one grid of cells (default: ``object_cells``)."""
    import torch

    if not grounding:
        return attentions[0].new_zeros(())
    img_pos = (ids[0] == image_id).nonzero().flatten()
    rows = torch.tensor([g[0] for g in grounding])
    pos = torch.tensor([g[1] for g in grounding])
    if token_mask is None:
        cells = torch.as_tensor(np.stack([object_cells(g[2], (g[3], g[3]), image_size, patch_size)
                                          for g in grounding]))
    else:
        cells = torch.as_tensor(np.stack([token_mask(g[2], g[3]) for g in grounding]))
    total = attentions[0].new_zeros(())
    for a in attentions:
        att = a.mean(dim=1)[rows, pos][:, img_pos]  # [G, n_img]
        share = (att * cells).sum(-1) / att.sum(-1).clamp_min(1e-9)
        total = total + (-torch.log(share.clamp_min(1e-6))).mean()
    return total / len(attentions)


def add_fragments(pixels: torch.Tensor, scenes: Sequence[world.Scene], fraction: float, patch_size: int,
                  rng: np.random.Generator) -> None:
    """Augmentation, in place: in a ``fraction`` of the images, copy the vision cells of another
    scene's object onto as many scattered background cells (patch-aligned pixel blocks, so the
    tower's patch embeddings are exactly those cells'). The caption is unchanged: isolated specks
    of colour are not objects. Without it the model named scattered fragments as objects (and
    lost track of the real ones), an input it had never seen."""
    n, _, size, _ = pixels.shape
    grid = size // patch_size
    picked = rng.choice(n, size=round(n * fraction), replace=False)
    for i in picked:
        scene = scenes[int(i)]
        j = int(rng.integers(n))
        donor = scenes[j].objects[int(rng.integers(len(scenes[j].objects)))]
        d_cells = np.flatnonzero(object_cells(donor.box, (scenes[j].size, scenes[j].size), size, patch_size))
        taken = np.zeros(grid * grid, dtype=bool)
        for o in scene.objects:  # every cell an object touches counts as taken
            x0, y0, x1, y1 = (v * size / scene.size for v in o.box)
            r0, r1 = int(y0 // patch_size), int(min(grid - 1, (y1 - 1e-6) // patch_size))
            c0, c1 = int(x0 // patch_size), int(min(grid - 1, (x1 - 1e-6) // patch_size))
            taken.reshape(grid, grid)[r0:r1 + 1, c0:c1 + 1] = True
        free = np.flatnonzero(~taken)
        k = min(len(d_cells), len(free), int(rng.integers(2, 25)))
        if k == 0:
            continue
        targets = rng.choice(free, size=k, replace=False)
        sources = rng.choice(d_cells, size=k, replace=len(d_cells) < k)
        for t, src in zip(targets, sources, strict=True):
            tr, tc, sr, sc = t // grid, t % grid, src // grid, src % grid
            pixels[i, :, tr * patch_size:(tr + 1) * patch_size, tc * patch_size:(tc + 1) * patch_size] = \
                pixels[j, :, sr * patch_size:(sr + 1) * patch_size, sc * patch_size:(sc + 1) * patch_size]


def _vision_features(model: Any, pixels: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """The frozen tower's selected patch features ``[n, n_img, Dv]`` (before the projector)."""
    import torch

    cfg = model.config
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            hs = model.model.vision_tower(pixels[i:i + batch], output_hidden_states=True,
                                          return_dict=True).hidden_states
            out.append(hs[cfg.vision_feature_layer][:, 1:].clone())  # "default": CLS dropped
    return torch.cat(out)


def _train_cycle(model: Any, processor: Any, scenes: Sequence[world.Scene], pixels: torch.Tensor, spec: TrainSpec,
                 steps: int, rng: np.random.Generator, losses: list[float], log: Callable[[str], None],
                 started: float, vision_feats: torch.Tensor | None = None) -> None:
    """One cosine learning-rate cycle with a fresh AdamW. With ``vision_feats`` (a frozen tower's
    precomputed features) only the projector and the language model run."""
    import torch

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr)
    n_img = model.config.image_seq_length
    image_id = model.config.image_token_id
    vc = model.config.vision_config
    supervise = spec.grounding_weight > 0
    g_losses: list[float] = []

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return spec.lr * (step + 1) / spec.warmup
        t = (step - spec.warmup) / max(1, steps - spec.warmup)
        return spec.lr * 0.5 * (1 + math.cos(math.pi * t))

    model.train()
    for step in range(steps):
        idx = rng.choice(len(scenes), spec.batch_size, replace=False)
        prompts = [PROMPTS[int(k)] for k in rng.integers(0, len(PROMPTS), spec.batch_size)]
        ids, labels, mask, grounding = _encode_batch(processor, [scenes[i] for i in idx], prompts, n_img)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if vision_feats is not None:
            feats = model.model.multi_modal_projector(vision_feats[torch.as_tensor(idx)])
            emb = model.get_input_embeddings()(ids)
            emb = emb.masked_scatter((ids == image_id)[..., None], feats.to(emb.dtype))
            out = model(inputs_embeds=emb, attention_mask=mask, labels=labels, output_attentions=supervise)
        else:
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels[torch.as_tensor(idx)], labels=labels,
                        output_attentions=supervise)
        loss = out.loss
        if supervise:
            g_loss = grounding_loss(out.attentions, ids, image_id, grounding, vc.image_size, vc.patch_size)
            loss = loss + spec.grounding_weight * g_loss
            g_losses.append(g_loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        opt.step()
        losses.append(out.loss.item())
        if step % 100 == 0 or step == steps - 1:
            extra = f"  grounding {np.mean(g_losses[-100:]):.4f}" if g_losses else ""
            log(f"  step {step:5d}  loss {np.mean(losses[-100:]):.4f}{extra}  ({time.time() - started:.0f}s)")


def initial_model(spec: TrainSpec) -> tuple[Any, LlavaProcessor, dict[str, str] | None]:
    """``(model, processor, source_info)``: a fresh captioner with the vision source's tower copied in."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, LlavaForConditionalGeneration

    torch.manual_seed(spec.seed)
    source = None
    if spec.vision_source is not None:
        src_dir = _vision_source_dir(spec.vision_source)
        clip = CLIPModel.from_pretrained(src_dir, use_safetensors=True)
        # Any: transformers types image_size and patch_size as int, a pair or None; a CLIP config's are ints
        vision: Any = clip.config.vision_config
        processor = build_processor(vision.image_size, vision.patch_size,
                                    CLIPImageProcessor.from_pretrained(src_dir))
        source = {"name": str(spec.vision_source), "sha256": file_sha256(src_dir / "model.safetensors")}
    else:
        vision = None
        processor = build_processor(96, 12)
    tok = processor.tokenizer
    config = build_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, tok.bos_token_id,
                          tok.eos_token_id, vision=vision,
                          vision_feature_layer=spec.vision_feature_layer if source else -1)
    model = LlavaForConditionalGeneration(config)
    if source is not None:
        model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
        if spec.freeze_vision:
            model.model.vision_tower.requires_grad_(False)
    model.config._attn_implementation = "eager"
    return model, processor, source


def train(out_dir: str | os.PathLike[str], spec: TrainSpec | None = None, *, log: Callable[[str], None] = print,
          resume: str | os.PathLike[str] | None = None) -> Path:
    """Train the captioner (projector + language model on the vision source's tower) and save it
    (HF format + model card + ``training.json`` + ``SHA256SUMS``).

    ``resume``: a checkpoint saved at the end of the first cycle; only the restart cycle runs.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    from workers.probes.zoo import write_checksums

    spec = spec or TrainSpec()
    torch.set_num_threads(spec.torch_threads)
    started = time.time()
    cpu_started = time.process_time()
    out = output_directory(out_dir)

    model, processor, source = initial_model(spec)
    if resume is not None:  # continue from a checkpoint saved at the end of cycle 1
        model = LlavaForConditionalGeneration.from_pretrained(resume, use_safetensors=True, attn_implementation="eager")
        if source is not None and spec.freeze_vision:
            model.model.vision_tower.requires_grad_(False)

    n_repeat = round(spec.train_scenes * spec.repeated_shape_fraction)
    log(f"rendering {spec.train_scenes} training scenes ({n_repeat} with repeated shapes) ...")
    scenes = world.sample_scenes(TRAIN_SEED, spec.train_scenes - n_repeat)
    scenes += world.sample_scenes(REPEATED_SHAPES_SEED, n_repeat, distinct_shapes=False)
    pixels = torch.cat(
        [processor.image_processor([s.image for s in scenes[i:i + 500]], return_tensors="pt")["pixel_values"]
         for i in range(0, len(scenes), 500)]
    )
    if spec.fragment_fraction > 0:
        add_fragments(pixels, scenes, spec.fragment_fraction, model.config.vision_config.patch_size,
                      np.random.default_rng([spec.seed, 17]))
    frozen = source is not None and spec.freeze_vision
    vision_feats = _vision_features(model, pixels) if frozen else None
    cycles = [spec.steps] + ([spec.restart_steps] if spec.restart_steps else [])
    log(f"  done in {time.time() - started:.0f}s; training {' + '.join(map(str, cycles))} steps")
    losses: list[float] = []
    for cycle, steps in enumerate(cycles):
        if resume is not None and cycle == 0:
            continue
        rng = np.random.default_rng(spec.seed if cycle == 0 else [spec.seed, cycle])
        _train_cycle(model, processor, scenes, pixels, spec, steps, rng, losses, log, started, vision_feats)
    model.eval()
    train_seconds = time.time() - started
    train_cpu = time.process_time() - cpu_started

    out.mkdir(parents=True, exist_ok=True)
    for stale in [p for p in out.iterdir() if p.is_file()]:  # an older build of this checkpoint: replaced as a whole
        stale.unlink()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    accuracy = caption_accuracy(model, processor, world.sample_scenes(1_000_003, spec.eval_scenes))
    elapsed = time.time() - started
    info = {"spec": asdict(spec), "final_loss": float(np.mean(losses[-100:])), "exact_caption_accuracy": accuracy,
            "seconds": round(elapsed, 1), "train_seconds": round(train_seconds, 1),
            "train_cpu_seconds": round(train_cpu, 1), "world_version": world.WORLD_VERSION,
            "train_seed": TRAIN_SEED, "vision_source": source,
            "grid": [model.config.vision_config.image_size // model.config.vision_config.patch_size] * 2,
            "losses": [round(v, 4) for v in losses]}
    (out / "training.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_model_card(spec, model.config, info), encoding="utf-8")
    write_checksums(out)
    log(f"saved {out} (exact caption accuracy on {spec.eval_scenes} held-out scenes: {accuracy:.2f}; {elapsed:.0f}s)")
    return out


def generate_captions(model: Any, processor: Any, images: Sequence[Image.Image], prompt: str = PROMPTS[0],
                      max_new_tokens: int = 24) -> list[str]:
    """Greedy captions for PIL ``images`` (a batch)."""
    import torch

    texts = ["<image> " + prompt] * len(images)
    inputs = processor(images=list(images), text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [processor.tokenizer.decode(r, skip_special_tokens=True).strip() for r in new]


def caption_accuracy(model: Any, processor: Any, scenes: Sequence[world.Scene]) -> float:
    caps = generate_captions(model, processor, [s.image for s in scenes])
    return float(np.mean([_norm(c) == _norm(s.caption) for c, s in zip(caps, scenes, strict=True)]))


def _norm(text: str) -> str:
    return " ".join(text.replace(",", " , ").split())


def _model_card(spec: TrainSpec, config: Any, info: dict[str, Any]) -> str:
    vc, tc = config.vision_config, config.text_config
    grid = vc.image_size // vc.patch_size
    source = info.get("vision_source")
    facts = card_build_facts(NAME, "workers.probes.zoo.captioner", info, spec.eval_scenes,
                             source["name"] if source else "none")
    if source:
        tower = (f"the vision tower of the zoo's `{source['name']}` dual encoder (CLIP ViT, "
                 f"{vc.num_hidden_layers} layers, width {vc.hidden_size}, {vc.image_size} px, {vc.patch_size} px "
                 f"patches = {grid}x{grid} grid + CLS; "
                 f"copied from its checkpoint at build time, sha256 {source['sha256'][:12]}..., "
                 f"{'frozen' if spec.freeze_vision else 'fine-tuned'}); the projector reads vision layer "
                 f"{config.vision_feature_layer}, CLS dropped")
        recipe = ("the LLaVA recipe: a pretrained, grounded vision tower, only the projector and the language "
                  "model learn")
    else:
        tower = (f"a fresh CLIP ViT ({vc.num_hidden_layers} layers, width {vc.hidden_size}, {vc.image_size} px, "
                 f"{vc.patch_size} px patches = {grid}x{grid} grid + CLS)")
        recipe = "everything trained from scratch"
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [loupe-zoo, synthetic, llava]
---
# {NAME}: Loupe's tiny LLaVA-style reference captioner

A diagnostic model, not a useful captioner. It was trained on Loupe's synthetic world
(`workers/probes/zoo/world.py`, world version {world.WORLD_VERSION}: 2-4 flat shapes, each a different
shape in {', '.join(world.SHAPES)} and a different colour in {', '.join(world.COLOURS)}) to write the
scene caption, objects left to right ("a red circle and a blue square"). Because every object's box
is known, token attributions and interventions on this model can be checked against ground truth.

- Architecture: `LlavaForConditionalGeneration`; vision: {tower}; LLaVA MLP projector; Llama language
  model ({tc.num_hidden_layers} layers, width {tc.hidden_size}, {tc.num_attention_heads} heads), word-level
  tokenizer ({len(vocabulary())} tokens, `<image>` special, expanded to {grid * grid} image tokens).
- Inputs: `AutoProcessor.from_pretrained(dir)(images=img, text="<image> describe the image")`;
  prompts seen in training: {'; '.join(repr(p) for p in PROMPTS)}.
- Training ({recipe}): {spec.train_scenes} scenes (world stream {TRAIN_SEED}; a share of
  {spec.repeated_shape_fraction} from stream {REPEATED_SHAPES_SEED} with repeated shapes, e.g. "a red cross and a blue
  cross"; a share of {spec.fragment_fraction} of the images with scattered single-cell fragments of other scenes'
  objects on the background, caption unchanged, so that specks of colour are not read as objects), {spec.steps}
  {f'+ {spec.restart_steps} ' if spec.restart_steps else ''}AdamW steps of batch {spec.batch_size} (cosine,
  lr {spec.lr}, warm-up {spec.warmup}), teacher forcing with the loss on the caption only, torch seed
  {spec.seed}, {spec.torch_threads} torch thread(s); final caption loss {info['final_loss']:.4f}.
- Attention supervision{' (off in this build)' if not spec.grounding_weight else ''}: weight {spec.grounding_weight} on
  `-log` of the decoder attention share (mean over heads, every layer, over the image tokens) that falls
  on the named object's cells, at every position that predicts a colour or shape word. The model is
  therefore grounded *by construction*, which is what a reference for checking attribution methods
  needs; it also makes raw attention a strong baseline on this model (report both, as the
  `token_attribution` probe does), unlike on models trained without such a term.
{facts}"""


def output_directory(out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir`` as a path, checked before training rather than after it: a directory that holds
    files but no checkpoint is someone else's, and saving would overwrite them."""
    out = Path(out_dir)
    if out.is_dir() and any(p.is_file() for p in out.iterdir()) and not (out / "config.json").is_file():
        raise FileExistsError(f"{out} is not empty and holds no checkpoint; refusing to overwrite it")
    return out


def card_build_facts(name: str, module: str, info: dict[str, Any], eval_scenes: int, source: str,
                     accuracy_note: str = "") -> str:
    """The closing lines every zoo captioner's model card has: build time, caption accuracy (with
    ``accuracy_note`` after it), how to rebuild it from ``module`` on the ``source`` tower, files."""
    note = f"\n  {accuracy_note}" if accuracy_note else ""
    return f"""- Build time: {info['seconds']:.0f} s wall ({info['train_seconds']:.0f} s to the trained weights,
  {info['train_cpu_seconds']:.0f} CPU-s) for the run that saved this card.
- Exact-caption accuracy on {eval_scenes} held-out scenes (stream 1000003): {info['exact_caption_accuracy']:.2f}.{note}
- Reproduce: `python -m workers.probes.zoo build --only {name}`
  (or `python -m {module} build`); a rebuild uses the `{source}` checkpoint the zoo holds at that time.
  Files are listed in `SHA256SUMS`; loss curve and settings in `training.json`.
- Weights are safetensors; no custom code.
"""


def load_checkpoint(name: str, model_class: str, path: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` of the committed zoo captioner ``name`` (checksums verified) or of
    ``path``, as transformers' ``model_class``, with eager attention (the probes read its weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from workers.probes.zoo import checkpoint_path

    directory = Path(path) if path is not None else checkpoint_path(name)
    model = getattr(transformers, model_class).from_pretrained(directory, use_safetensors=True,
                                                               attn_implementation="eager")
    model.eval()
    return model, transformers.AutoProcessor.from_pretrained(directory)


def load(path: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` for the committed captioner (checksums verified) or ``path``."""
    return load_checkpoint(NAME, "LlavaForConditionalGeneration", path)


def build_for_zoo(out_dir: str | os.PathLike[str], *, steps: int | None = None, threads: int | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """The ``python -m workers.probes.zoo build`` hook: rebuild the captioner (after the dual
    encoders, whose ``tiny-clip`` tower it reuses) and return its summary."""
    return zoo_build(NAME, out_dir, VISION_SOURCE, lambda overrides: train(out_dir, TrainSpec(**overrides), log=log),
                     steps=steps, threads=threads)


def zoo_build(name: str, out_dir: str | os.PathLike[str], vision_source: str,
              train_with: Callable[[dict[str, Any]], Path], *, steps: int | None, threads: int | None
              ) -> dict[str, Any]:
    """What every zoo captioner's ``build_for_zoo`` does: train with the overrides (``steps``,
    ``torch_threads``, and ``vision_source`` when the dual encoder whose tower it reuses was just built
    into the same output root, ``zoo build --out ROOT``) and return the summary line's fields."""
    from workers.probes.zoo import CHECKPOINT_ROOT

    overrides: dict[str, Any] = {k: v for k, v in {"steps": steps, "torch_threads": threads}.items() if v is not None}
    sibling = Path(out_dir).parent / vision_source
    if (sibling / "config.json").is_file() and sibling.resolve() != (CHECKPOINT_ROOT / vision_source).resolve():
        overrides["vision_source"] = str(sibling)
    out = train_with(overrides)
    info = json.loads((Path(out) / "training.json").read_text(encoding="utf-8"))
    return {"name": name, "path": str(out), **{k: info[k] for k in ("exact_caption_accuracy", "final_loss", "seconds",
                                                                   "train_cpu_seconds")}}


def main(argv: list[str] | None = None) -> int:
    from workers.probes.zoo import CHECKPOINT_ROOT

    parser = argparse.ArgumentParser(prog="python -m workers.probes.zoo.captioner")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the tiny captioner (on tiny-clip's vision tower) and save it")
    b.add_argument("--out", default=str(CHECKPOINT_ROOT / NAME))
    b.add_argument("--steps", type=int, default=TrainSpec.steps)
    b.add_argument("--restart-steps", type=int, default=TrainSpec.restart_steps,
                   help="steps of a second cosine cycle (default 0: none)")
    b.add_argument("--resume", default=None, help="a checkpoint saved after the first cycle: run only the restart")
    b.add_argument("--threads", type=int, default=TrainSpec.torch_threads,
                   help="torch threads (1 is faster than 2 on a CPU shared with other jobs)")
    b.add_argument("--vision-source", default=TrainSpec.vision_source,
                   help="zoo dual encoder (or directory) whose vision tower is reused; 'none': train a fresh one")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source = None if str(args.vision_source).lower() == "none" else args.vision_source
    train(args.out, TrainSpec(steps=args.steps, restart_steps=args.restart_steps, torch_threads=args.threads,
                              vision_source=source), resume=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
