"""The zoo's tiny Idefics3 captioner: split frames plus a global frame, pixel-shuffled.

Why: Idefics3 (and SmolVLM) fold every 2 x 2 block of a frame's patches into one image token
(pixel shuffle) and cut a large image into frames plus a downscaled global frame, so an image
token's region depends on the image's layout. A captioner of that family trained on the synthetic
world, whose boxes are known, checks Loupe's token -> region map and its token attribution on it.

Architecture: a stock ``Idefics3ForConditionalGeneration`` from a tiny config with its
``Idefics3Processor``, so it loads like any Idefics3 checkpoint:

- vision tower: the vision transformer of the zoo's ``tiny-siglip`` (SigLIP's patch embedding,
  encoder and post-layernorm are exactly Idefics3's vision transformer), copied at build time and
  kept frozen; 96 px frames, 8 px patches;
- image processor: the stored scene is resized to a longest edge of 192 px and cut into 2 x 2
  frames of 96 px, followed by the global frame (the whole scene at 96 px); SigLIP's resampling
  and normalisation, so every frame is read as the tower was trained to read it;
- connector: pixel shuffle (scale 2: 6 x 6 tokens per frame) and Idefics3's linear projection;
- language model: a 3-layer Llama over the zoo captioner's word-level vocabulary plus Idefics3's
  layout markers (``<fake_token_around_image>``, ``<row_i_col_j>``, ``<global-img>``).

Training reuses the LLaVA captioner's recipe (``captioner``): teacher forcing on the caption, plus
attention supervision, here over every image token of every frame whose box (the adapter's own
token -> box map) lies mostly on the named object's cells. Features of the frozen tower are
computed once.

``python -m workers.probes.zoo build --only tiny-idefics3`` (after the dual encoders) or
``python -m workers.probes.zoo.idefics_captioner build [--out DIR]`` retrains it deterministically.
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

from workers.probes.zoo import captioner, file_sha256, world

if TYPE_CHECKING:
    import torch
    from numpy.typing import NDArray
    from transformers import Idefics3Processor

NAME = "tiny-idefics3"
VISION_SOURCE = "tiny-siglip"
#: Training streams (the LLaVA captioner's: the same scenes, so the two captioners are comparable).
TRAIN_SEED = captioner.TRAIN_SEED
REPEATED_SHAPES_SEED = captioner.REPEATED_SHAPES_SEED
#: The processor's canvas: the scene's longest edge is resized to this, then cut into frames of
#: the tower's size (192 / 96: 2 x 2 frames plus the global frame).
CANVAS = 192
SCALE_FACTOR = 2
#: Idefics3's layout markers (its processor looks up rows and columns up to 6).
MARKERS: tuple[str, ...] = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                            *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))


@dataclass
class TrainSpec:
    """Everything that determines the trained weights (recorded in the model card)."""

    train_scenes: int = 2500
    steps: int = 900
    batch_size: int = 24
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 50
    seed: int = 0
    torch_threads: int = 1
    eval_scenes: int = 64
    vision_source: str = VISION_SOURCE
    #: weight of the attention-supervision term (``captioner.grounding_loss``)
    grounding_weight: float = 0.5
    repeated_shape_fraction: float = 0.25
    #: a token shows the object when at least this share of its box lies on the object's cells
    token_share: float = 0.5


def build_processor(image_size: int, patch_size: int, image_processor_kwargs: dict[str, Any]) -> Idefics3Processor:
    """An ``Idefics3Processor``: the zoo's word-level tokenizer plus Idefics3's markers, and a PIL
    image processor that splits the scene into ``image_size`` frames of a ``CANVAS`` canvas
    (``image_processor_kwargs``: the vision source's resampling and normalisation)."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    tokenizer = captioner.build_tokenizer(MARKERS)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": CANVAS}, max_image_size={"longest_edge": image_size}, do_image_splitting=True,
        **image_processor_kwargs)
    per_frame = (image_size // patch_size // SCALE_FACTOR) ** 2
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=per_frame)


def initial_model(spec: TrainSpec) -> tuple[Any, Any, dict[str, str]]:
    """``(model, processor, source_info)``: a fresh captioner with the vision source's tower copied in
    and frozen."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3VisionConfig,
        LlamaConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    torch.manual_seed(spec.seed)
    src_dir = captioner._vision_source_dir(spec.vision_source)
    siglip = SiglipModel.from_pretrained(src_dir, use_safetensors=True)
    # Any: transformers types a sub-config as a dict, a config or None; a SigLIP checkpoint's is a config
    svc: Any = siglip.config.vision_config
    sip = SiglipImageProcessor.from_pretrained(src_dir)
    processor = build_processor(svc.image_size, svc.patch_size, {
        "resample": sip.resample, "image_mean": list(sip.image_mean), "image_std": list(sip.image_std)})
    tok = processor.tokenizer
    vision = Idefics3VisionConfig(
        hidden_size=svc.hidden_size, intermediate_size=svc.intermediate_size, num_hidden_layers=svc.num_hidden_layers,
        num_attention_heads=svc.num_attention_heads, num_channels=svc.num_channels, image_size=svc.image_size,
        patch_size=svc.patch_size, hidden_act=svc.hidden_act, layer_norm_eps=svc.layer_norm_eps)
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    # the top-level pad id is read from **kwargs (untyped), else it stays Idefics3's 128002
    pad: dict[str, Any] = {"pad_token_id": tok.pad_token_id}
    config = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=SCALE_FACTOR,
                            image_token_id=tok.convert_tokens_to_ids("<image>"), **pad)
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.eos_token_id
    model = Idefics3ForConditionalGeneration(config)
    state = {k: v for k, v in siglip.vision_model.state_dict().items() if not k.startswith("head.")}
    model.model.vision_model.load_state_dict(state)
    model.model.vision_model.requires_grad_(False)
    model.set_attn_implementation("eager")
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor, {"name": str(spec.vision_source), "sha256": file_sha256(src_dir / "model.safetensors")}


def _layout_adapter(model: Any, processor: Any) -> Any:
    from workers.probes.adapters.idefics3 import Idefics3Adapter

    return Idefics3Adapter(model, processor, "cpu")


def token_masker(model: Any, processor: Any, scene_size: int, share: float
                 ) -> tuple[str, Callable[[Sequence[float], int], NDArray[np.bool_]]]:
    """``(image_text, token_mask)`` for square scenes of ``scene_size`` px: the text the processor
    writes for the image, and ``token_mask(box, size)``: the image tokens (sequence order) at least
    ``share`` of whose box lies on the object's cells of Loupe's region grid (``captioner.object_cells``),
    with the token -> region map the probes use (``Idefics3Adapter.token_regions``)."""
    from PIL import Image

    adapter = _layout_adapter(model, processor)
    adapter.preprocess([Image.new("RGB", (scene_size, scene_size))])
    layout = adapter.current_layout()
    regions = adapter.token_regions(layout).numpy()  # [n_img, G]
    extras = dict(layout.extras)
    image_text = adapter.expanded_image(extras["rows"], extras["cols"])
    gh, _ = adapter.grid

    def token_mask(box: Sequence[float], size: int) -> NDArray[np.bool_]:
        cells = captioner.object_cells(box, (size, size), gh, 1)
        return np.asarray(regions @ cells >= share)

    return image_text, token_mask


def _frames(processor: Any, scenes: Sequence[world.Scene]) -> torch.Tensor:
    """``[n, frames, 3, M, M]`` pixel values of ``scenes`` (one layout: square scenes of one size)."""
    import torch

    return torch.cat([processor.image_processor([[s.image] for s in scenes[i:i + 250]],
                                                return_tensors="pt")["pixel_values"]
                      for i in range(0, len(scenes), 250)])


def _vision_features(model: Any, pixels: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The frozen tower's last hidden states ``[n, frames, patches, Dv]`` (before the connector)."""
    import torch

    n, f = pixels.shape[:2]
    flat = pixels.reshape(n * f, *pixels.shape[2:])
    out = []
    with torch.no_grad():
        for i in range(0, len(flat), batch):
            out.append(model.model.vision_model(pixel_values=flat[i:i + batch]).last_hidden_state)
    feats = torch.cat(out)
    return feats.reshape(n, f, *feats.shape[1:])


def _train(model: Any, processor: Any, scenes: Sequence[world.Scene], feats: torch.Tensor, spec: TrainSpec,
           image_text: str, token_mask: Callable[[Sequence[float], int], NDArray[np.bool_]],
           log: Callable[[str], None], started: float) -> list[float]:
    """AdamW with a cosine schedule on the connector and the language model."""
    import torch

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr)
    image_id = model.config.image_token_id
    vc = model.config.vision_config
    rng = np.random.default_rng(spec.seed)
    losses: list[float] = []
    g_losses: list[float] = []

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return spec.lr * (step + 1) / spec.warmup
        t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return spec.lr * 0.5 * (1 + math.cos(math.pi * t))

    model.train()
    for step in range(spec.steps):
        idx = rng.choice(len(scenes), spec.batch_size, replace=False)
        prompts = [captioner.PROMPTS[int(k)] for k in rng.integers(0, len(captioner.PROMPTS), spec.batch_size)]
        ids, labels, mask, grounding = captioner._encode_batch(processor, [scenes[i] for i in idx], prompts, 0,
                                                               image_text=image_text)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        image = model.model.connector(feats[torch.as_tensor(idx)].flatten(0, 1))  # [B * frames, tokens, D]
        emb = model.get_input_embeddings()(ids)
        emb = emb.masked_scatter((ids == image_id)[..., None], image.reshape(-1, image.shape[-1]).to(emb.dtype))
        out = model(inputs_embeds=emb, attention_mask=mask, labels=labels, output_attentions=True)
        g_loss = captioner.grounding_loss(out.attentions, ids, image_id, grounding, vc.image_size, vc.patch_size,
                                          token_mask=token_mask)
        loss = out.loss + spec.grounding_weight * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        opt.step()
        losses.append(out.loss.item())
        g_losses.append(g_loss.item())
        if step % 50 == 0 or step == spec.steps - 1:
            log(f"  step {step:5d}  loss {np.mean(losses[-50:]):.4f}  grounding {np.mean(g_losses[-50:]):.4f}"
                f"  ({time.time() - started:.0f}s)")
    return losses


def train(out_dir: str | os.PathLike[str], spec: TrainSpec | None = None, *,
          log: Callable[[str], None] = print) -> Path:
    """Train the captioner (connector + language model on the frozen tower) and save it (HF format +
    model card + ``training.json`` + ``SHA256SUMS``)."""
    import torch

    from workers.probes.zoo import write_checksums

    spec = spec or TrainSpec()
    torch.set_num_threads(spec.torch_threads)
    started = time.time()
    cpu_started = time.process_time()
    out = captioner.output_directory(out_dir)

    model, processor, source = initial_model(spec)
    n_repeat = round(spec.train_scenes * spec.repeated_shape_fraction)
    log(f"rendering {spec.train_scenes} training scenes ({n_repeat} with repeated shapes) ...")
    scenes = world.sample_scenes(TRAIN_SEED, spec.train_scenes - n_repeat)
    scenes += world.sample_scenes(REPEATED_SHAPES_SEED, n_repeat, distinct_shapes=False)
    if len({s.size for s in scenes}) != 1:
        raise ValueError("the training scenes must share one size (one frame layout)")
    image_text, token_mask = token_masker(model, processor, scenes[0].size, spec.token_share)
    feats = _vision_features(model, _frames(processor, scenes))
    log(f"  frozen features {tuple(feats.shape)} in {time.time() - started:.0f}s; training {spec.steps} steps")
    losses = _train(model, processor, scenes, feats, spec, image_text, token_mask, log, started)
    model.eval()
    train_seconds = time.time() - started
    train_cpu = time.process_time() - cpu_started

    out.mkdir(parents=True, exist_ok=True)
    for stale in [p for p in out.iterdir() if p.is_file()]:  # an older build: replaced as a whole
        stale.unlink()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    accuracy = captioner.caption_accuracy(model, processor, world.sample_scenes(1_000_003, spec.eval_scenes))
    elapsed = time.time() - started
    n_img = image_text.count(processor.image_token)
    info = {"spec": asdict(spec), "final_loss": float(np.mean(losses[-50:])), "exact_caption_accuracy": accuracy,
            "seconds": round(elapsed, 1), "train_seconds": round(train_seconds, 1),
            "train_cpu_seconds": round(train_cpu, 1), "world_version": world.WORLD_VERSION,
            "train_seed": TRAIN_SEED, "vision_source": source, "image_tokens": n_img,
            "frames": int(feats.shape[1]), "losses": [round(v, 4) for v in losses]}
    (out / "training.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_model_card(spec, model.config, info), encoding="utf-8")
    write_checksums(out)
    log(f"saved {out} (exact caption accuracy on {spec.eval_scenes} held-out scenes: {accuracy:.2f}; {elapsed:.0f}s)")
    return out


def _model_card(spec: TrainSpec, config: Any, info: dict[str, Any]) -> str:
    vc, tc = config.vision_config, config.text_config
    grid = vc.image_size // vc.patch_size
    per_frame = (grid // config.scale_factor) ** 2
    source = info["vision_source"]
    facts = captioner.card_build_facts(NAME, "workers.probes.zoo.idefics_captioner", info, spec.eval_scenes,
                                       source["name"])
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [loupe-zoo, synthetic, idefics3]
---
# {NAME}: Loupe's tiny Idefics3 reference captioner

A diagnostic model, not a useful captioner. It was trained on Loupe's synthetic world
(`workers/probes/zoo/world.py`, world version {world.WORLD_VERSION}) to write the scene caption, objects
left to right ("a red circle and a blue square"), like the zoo's `{captioner.NAME}`, but with Idefics3's
image layout: the scene is cut into frames plus a global frame and each frame's patches are pixel-shuffled,
so an image token's region depends on the layout. Because every object's box is known, token attributions
on this model check Loupe's token -> region map for this family against ground truth.

- Architecture: `Idefics3ForConditionalGeneration`; vision: the vision transformer of the zoo's
  `{source['name']}` (SigLIP, {vc.num_hidden_layers} layers, width {vc.hidden_size}, {vc.image_size} px frames,
  {vc.patch_size} px patches = {grid}x{grid} per frame; copied at build time, sha256 {source['sha256'][:12]}...,
  frozen); connector: pixel shuffle (scale {config.scale_factor}: {per_frame} tokens per frame) and a linear
  projection; Llama language model ({tc.num_hidden_layers} layers, width {tc.hidden_size},
  {tc.num_attention_heads} heads), word-level tokenizer with Idefics3's layout markers.
- Inputs: `AutoProcessor.from_pretrained(dir)(images=img, text="<image> describe the image")`. The
  `Idefics3Processor` resizes the scene to a longest edge of {CANVAS} px and cuts it into {info['frames'] - 1}
  frames of {vc.image_size} px plus the global frame: {info['image_tokens']} image tokens between the layout markers.
  Prompts seen in training: {'; '.join(repr(p) for p in captioner.PROMPTS)}.
- Training (only the connector and the language model learn, from the frozen tower's features
  computed once): {spec.train_scenes} scenes (world stream {TRAIN_SEED}; a share of
  {spec.repeated_shape_fraction} from stream {REPEATED_SHAPES_SEED} with repeated shapes), {spec.steps} AdamW
  steps of batch {spec.batch_size} (cosine, lr {spec.lr}, warm-up {spec.warmup}), teacher forcing with the loss
  on the caption only, torch seed {spec.seed}, {spec.torch_threads} torch thread(s); final caption loss
  {info['final_loss']:.4f}.
- Attention supervision: weight {spec.grounding_weight} on `-log` of the decoder attention share (mean over
  heads, every layer, over the image tokens of every frame) that falls on the tokens showing the named
  object (at least {spec.token_share} of the token's box on the object's cells, by the same token -> region
  map the probes use), at every position that predicts a colour or shape word. The model is grounded by
  construction, so raw attention is a strong baseline on it.
{facts}"""


def load(path: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` for the committed captioner (checksums verified) or ``path``."""
    return captioner.load_checkpoint(NAME, "Idefics3ForConditionalGeneration", path)


def build_for_zoo(out_dir: str | os.PathLike[str], *, steps: int | None = None, threads: int | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """The ``python -m workers.probes.zoo build`` hook (after the dual encoders: it reuses
    ``tiny-siglip``'s tower, the one built into the same output root when there is one)."""
    return captioner.zoo_build(NAME, out_dir, VISION_SOURCE,
                               lambda overrides: train(out_dir, TrainSpec(**overrides), log=log),
                               steps=steps, threads=threads)


def main(argv: list[str] | None = None) -> int:
    from workers.probes.zoo import CHECKPOINT_ROOT

    parser = argparse.ArgumentParser(prog="python -m workers.probes.zoo.idefics_captioner")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the tiny Idefics3 captioner (on tiny-siglip's tower) and save it")
    b.add_argument("--out", default=str(CHECKPOINT_ROOT / NAME))
    b.add_argument("--steps", type=int, default=TrainSpec.steps)
    b.add_argument("--train-scenes", type=int, default=TrainSpec.train_scenes)
    b.add_argument("--grounding-weight", type=float, default=TrainSpec.grounding_weight)
    b.add_argument("--threads", type=int, default=TrainSpec.torch_threads)
    b.add_argument("--vision-source", default=TrainSpec.vision_source)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train(args.out, TrainSpec(steps=args.steps, train_scenes=args.train_scenes, torch_threads=args.threads,
                              grounding_weight=args.grounding_weight, vision_source=args.vision_source),
          log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
