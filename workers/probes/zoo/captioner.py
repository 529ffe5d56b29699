"""The zoo's tiny generative captioner: a LLaVA-style model trained on the synthetic world.

Why: token attribution, cross-modal attention statistics and interventions for generative VLMs
need a model whose ground truth is known. This one looks at a world scene and writes its
caption ("a blue square, a green triangle and a red cross", objects left to right), so every
generated colour and shape word names exactly one object with a known box.

Architecture: a stock ``LlavaForConditionalGeneration`` built from a tiny config, so it loads
like any LLaVA checkpoint (``AutoProcessor`` + ``LlavaForConditionalGeneration.from_pretrained``):

- vision tower: a 2-layer CLIP ViT, 96 px input, 12 px patches (an 8 x 8 grid, plus CLS);
- projector: LLaVA's 2-layer MLP; features from the last vision layer, CLS dropped ("default");
- language model: a 3-layer Llama with a word-level tokenizer (``<image>`` is a special token).

Inputs are built by the saved ``LlavaProcessor``: ``processor(images=img, text="<image> describe
the image")`` expands ``<image>`` to the 64 image tokens and prepends ``<s>``; the model then
generates the caption followed by ``</s>``. Training prompts are drawn from ``PROMPTS`` so that
prompt-paraphrase consistency can be measured.

``python -m workers.probes.zoo.captioner build [--out DIR]`` retrains it from scratch
(deterministic seeds; see ``TrainSpec``) and writes the checkpoint, model card and ``SHA256SUMS``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from workers.probes.zoo import world

NAME = "tiny-llava"
#: Stream of training scenes (the zoo keeps training seeds below 1000; evaluation uses others).
TRAIN_SEED = 501
IMAGE_SIZE = 96
PATCH_SIZE = 12
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
    steps: int = 1500
    #: optional second cosine cycle with a fresh optimizer ("warm restart"); 0 in the committed build
    restart_steps: int = 0
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    seed: int = 0
    torch_threads: int = 2
    eval_scenes: int = 64


def vocabulary() -> list[str]:
    words: list[str] = ["a", "and", ","]
    words += list(world.COLOURS) + list(world.SHAPES)
    for p in PROMPTS:
        for w in p.split():
            if w not in words:
                words.append(w)
    return list(SPECIAL_TOKENS) + words


def build_processor():
    """A ``LlavaProcessor`` with a word-level tokenizer and a CLIP image processor."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
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
        model_max_length=256,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which "default" drops
    )


def build_config(vocab_size: int, image_token_id: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        image_seq_length=GRID * GRID, vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.pad_token_id = pad_id
    config.bos_token_id = bos_id
    config.eos_token_id = eos_id
    return config


def _encode_batch(processor, scenes: Sequence[world.Scene], prompts: Sequence[str]):
    """Token ids and label mask for teacher forcing: loss only on the caption and ``</s>``."""
    import torch

    tok = processor.tokenizer
    image_tokens = "<image>" * (GRID * GRID)
    rows, label_rows = [], []
    for scene, prompt in zip(scenes, prompts, strict=True):
        prefix = tok(image_tokens + " " + prompt).input_ids
        caption = tok(scene.caption, add_special_tokens=False).input_ids + [tok.eos_token_id]
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
    return ids, labels, mask


def _train_cycle(model, processor, scenes, pixels, spec: TrainSpec, steps: int, rng, losses: list[float], log,
                 started: float) -> None:
    """One cosine learning-rate cycle with a fresh AdamW."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr)

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return spec.lr * (step + 1) / spec.warmup
        t = (step - spec.warmup) / max(1, steps - spec.warmup)
        return spec.lr * 0.5 * (1 + math.cos(math.pi * t))

    model.train()
    for step in range(steps):
        idx = rng.choice(len(scenes), spec.batch_size, replace=False)
        prompts = [PROMPTS[int(k)] for k in rng.integers(0, len(PROMPTS), spec.batch_size)]
        ids, labels, mask = _encode_batch(processor, [scenes[i] for i in idx], prompts)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels[torch.as_tensor(idx)], labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step:5d}  loss {np.mean(losses[-100:]):.4f}  ({time.time() - started:.0f}s)")


def train(out_dir: str | os.PathLike, spec: TrainSpec | None = None, *, log=print,
          resume: str | os.PathLike | None = None) -> Path:
    """Train the captioner from scratch and save it (HF format + model card + SHA256SUMS).

    ``resume``: a checkpoint saved at the end of the first cycle; only the restart cycle runs.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    from workers.probes.zoo import write_checksums

    spec = spec or TrainSpec()
    torch.set_num_threads(spec.torch_threads)
    torch.manual_seed(spec.seed)
    started = time.time()

    processor = build_processor()
    tok = processor.tokenizer
    config = build_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, tok.bos_token_id,
                          tok.eos_token_id)
    if resume is not None:  # continue from a checkpoint saved at the end of cycle 1
        model = LlavaForConditionalGeneration.from_pretrained(resume, use_safetensors=True, attn_implementation="eager")
    else:
        model = LlavaForConditionalGeneration(config)
    model.config._attn_implementation = "eager"

    log(f"rendering {spec.train_scenes} training scenes ...")
    scenes = world.sample_scenes(TRAIN_SEED, spec.train_scenes)
    pixels = torch.cat(
        [processor.image_processor([s.image for s in scenes[i:i + 500]], return_tensors="pt")["pixel_values"]
         for i in range(0, len(scenes), 500)]
    )
    cycles = [spec.steps] + ([spec.restart_steps] if spec.restart_steps else [])
    log(f"  done in {time.time() - started:.0f}s; training {' + '.join(map(str, cycles))} steps")
    losses: list[float] = []
    for cycle, steps in enumerate(cycles):
        if resume is not None and cycle == 0:
            continue
        rng = np.random.default_rng(spec.seed if cycle == 0 else [spec.seed, cycle])
        _train_cycle(model, processor, scenes, pixels, spec, steps, rng, losses, log, started)
    model.eval()
    model.eval()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = [p for p in out.iterdir() if p.is_file()]
    if existing and not (out / "config.json").is_file():
        raise FileExistsError(f"{out} is not empty and holds no checkpoint; refusing to overwrite it")
    for stale in existing:  # an older build of this checkpoint: replaced as a whole
        stale.unlink()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    accuracy = caption_accuracy(model, processor, world.sample_scenes(1_000_003, spec.eval_scenes))
    elapsed = time.time() - started
    (out / "README.md").write_text(_model_card(spec, float(np.mean(losses[-100:])), accuracy, elapsed), encoding="utf-8")
    (out / "training.json").write_text(json.dumps(
        {"spec": asdict(spec), "final_loss": float(np.mean(losses[-100:])), "exact_caption_accuracy": accuracy,
         "seconds": round(elapsed, 1), "world_version": world.WORLD_VERSION, "train_seed": TRAIN_SEED},
        indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_checksums(out)
    log(f"saved {out} (exact caption accuracy on {spec.eval_scenes} held-out scenes: {accuracy:.2f}; {elapsed:.0f}s)")
    return out


def generate_captions(model, processor, images, prompt: str = PROMPTS[0], max_new_tokens: int = 24) -> list[str]:
    """Greedy captions for PIL ``images`` (a batch)."""
    import torch

    texts = ["<image> " + prompt] * len(images)
    inputs = processor(images=list(images), text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [processor.tokenizer.decode(r, skip_special_tokens=True).strip() for r in new]


def caption_accuracy(model, processor, scenes: Sequence[world.Scene]) -> float:
    caps = generate_captions(model, processor, [s.image for s in scenes])
    return float(np.mean([_norm(c) == _norm(s.caption) for c, s in zip(caps, scenes, strict=True)]))


def _norm(text: str) -> str:
    return " ".join(text.replace(",", " , ").split())


def _model_card(spec: TrainSpec, loss: float, accuracy: float, seconds: float) -> str:
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [loupe-zoo, synthetic, llava]
---
# {NAME}: Loupe's tiny LLaVA-style reference captioner

A diagnostic model, not a useful captioner. It was trained from scratch on Loupe's synthetic world
(`workers/probes/zoo/world.py`, world version {world.WORLD_VERSION}: 2-4 flat shapes, each a different
shape in {', '.join(world.SHAPES)} and a different colour in {', '.join(world.COLOURS)}) to write the
scene caption, objects left to right ("a red circle and a blue square"). Because every object's box
is known, token attributions and interventions on this model can be checked against ground truth.

- Architecture: `LlavaForConditionalGeneration`; CLIP vision tower (2 layers, width 64, {IMAGE_SIZE} px,
  {PATCH_SIZE} px patches = {GRID}x{GRID} grid + CLS), LLaVA MLP projector, Llama language model
  (3 layers, width 128, 4 heads), word-level tokenizer ({len(vocabulary())} tokens, `<image>` special).
- Inputs: `AutoProcessor.from_pretrained(dir)(images=img, text="<image> describe the image")`;
  prompts seen in training: {'; '.join(repr(p) for p in PROMPTS)}.
- Training: {spec.train_scenes} scenes of world stream {TRAIN_SEED}, {spec.steps} + {spec.restart_steps} AdamW
  steps of batch {spec.batch_size} (two cosine cycles, lr {spec.lr}, fresh optimizer at the restart), torch
  seed {spec.seed}; final training loss {loss:.4f}; {seconds:.0f} s for the run that saved this card
  (a shared, heavily loaded CPU).
- Exact-caption accuracy on {spec.eval_scenes} held-out scenes (stream 1000003): {accuracy:.2f}.
- Reproduce: `python -m workers.probes.zoo.captioner build`. Files are listed in `SHA256SUMS`.
- Weights are safetensors; no custom code.
"""


def load(path: str | os.PathLike | None = None):
    """``(model, processor)`` for the committed captioner (checksums verified) or ``path``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from workers.probes.zoo import checkpoint_path

    directory = Path(path) if path is not None else checkpoint_path(NAME)
    model = LlavaForConditionalGeneration.from_pretrained(directory, use_safetensors=True,
                                                          attn_implementation="eager")
    model.eval()
    return model, AutoProcessor.from_pretrained(directory)


def main(argv: list[str] | None = None) -> int:
    from workers.probes.zoo import CHECKPOINT_ROOT

    parser = argparse.ArgumentParser(prog="python -m workers.probes.zoo.captioner")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the tiny captioner from scratch and save it")
    b.add_argument("--out", default=str(CHECKPOINT_ROOT / NAME))
    b.add_argument("--steps", type=int, default=TrainSpec.steps)
    b.add_argument("--restart-steps", type=int, default=TrainSpec.restart_steps,
                   help="steps of a second cosine cycle (default 0: none)")
    b.add_argument("--resume", default=None, help="a checkpoint saved after the first cycle: run only the restart")
    b.add_argument("--threads", type=int, default=TrainSpec.torch_threads,
                   help="torch threads (1 is faster than 2 on a CPU shared with other jobs)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train(args.out, TrainSpec(steps=args.steps, restart_steps=args.restart_steps, torch_threads=args.threads),
          resume=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
