"""The zoo's tiny Llama 3.2 Vision captioner: cross-attention fusion trained on the synthetic world.

Why: the ``mllama`` family reads the image through cross-attention layers of the decoder, not as
image tokens in its sequence, so Loupe attributes a generated word to the image by Chefer's
co-attention rule through those layers (``adapters/mllama.py``). Checking that rule needs a model
of this family whose ground truth is known: this one writes the world scene's caption ("a blue
square, a green triangle and a red cross", objects left to right), like the zoo's ``tiny-llava``.

Architecture: a stock ``MllamaForConditionalGeneration`` from a tiny config, loaded like any Llama
3.2 Vision checkpoint (``AutoProcessor`` + ``MllamaForConditionalGeneration.from_pretrained``):

- vision encoder: one 96 px tile of 8 px patches (12 x 12 patches + CLS). Its local layers are the
  zoo ``tiny-clip`` tower's, transplanted (``transplant_clip_tower``): ``MllamaVisionModel`` has no
  attention-projection biases, so the transplanted tower is distilled back onto tiny-clip's layer
  outputs for a few steps (``distil_tower``) and then frozen; one gated global layer, its gates at
  zero, passes the local layers' output through unchanged;
- projector: the family's linear map of the final and one intermediate vision layer (concatenated);
- language model: a ``TEXT_LAYERS``-layer Llama whose layers in ``CROSS_ATTENTION_LAYERS`` cross-attend to the
  vision tokens (they have no self-attention, as in the family), word-level tokenizer with
  ``<|image|>``, ``<|user|>`` and ``<|assistant|>`` special, and a chat template in the shape of
  Llama 3.2 Vision Instruct's (``<|user|><|image|> describe the image<|assistant|>``).

Training: teacher forcing on the caption after the chat-templated prompt, plus attention supervision
(``cross_grounding_loss``): where the model predicts a colour or shape word, the cross-attention
(mean over heads, every cross-attention layer) over the vision tokens is pulled onto the tokens
inside the named object, with each vision token's box taken from the adapter's own token -> box map,
so the supervision and Loupe's reading of the vision tokens agree.

``python -m workers.probes.zoo build --only tiny-mllama`` or ``python -m
workers.probes.zoo.mllama_captioner build [--out DIR]`` retrains it (deterministic seeds; see
``MllamaTrainSpec``) on the ``tiny-clip`` checkpoint the zoo holds at that time.
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
    from transformers import MllamaConfig, MllamaProcessor

NAME = "tiny-mllama"
VISION_SOURCE = captioner.VISION_SOURCE
IMAGE_TOKEN = "<|image|>"
SPECIAL_TOKENS = {"image_token": IMAGE_TOKEN, "user_turn": "<|user|>", "assistant_turn": "<|assistant|>"}
#: Decoder layers that cross-attend to the vision tokens (the others self-attend).
CROSS_ATTENTION_LAYERS = (1, 3)
TEXT_LAYERS = 5
#: One user turn holding the image and the prompt, then the assistant's turn: the shape of Llama 3.2
#: Vision Instruct's template, in this tokenizer's words.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|image|>{% else %} {{ item['text'] }}"
    "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@dataclass
class MllamaTrainSpec:
    """Everything that determines the trained weights (recorded in the model card)."""

    train_scenes: int = 6000
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 50
    seed: int = 0
    torch_threads: int = 1
    eval_scenes: int = 64
    vision_source: str = VISION_SOURCE
    #: steps of layer-output distillation onto the source tower after the transplant (0: none)
    distil_steps: int = 60
    distil_lr: float = 1e-4
    #: local vision layer whose output the projector reads beside the final one (0-based)
    intermediate_layer: int = 1
    grounding_weight: float = 0.5
    repeated_shape_fraction: float = 0.25
    fragment_fraction: float = 0.4


def build_tokenizer() -> Any:
    """The zoo captioner's words (its ``<image>`` replaced by ``SPECIAL_TOKENS``), word level."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [w for w in captioner.vocabulary() if w != "<image>"] + list(SPECIAL_TOKENS.values())
    vocab = {w: i for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=dict(SPECIAL_TOKENS), padding_side="left",
                                   model_max_length=512)


def build_processor(image_size: int = captioner.IMAGE_SIZE, image_mean: Sequence[float] = captioner.CLIP_MEAN,
                    image_std: Sequence[float] = captioner.CLIP_STD) -> MllamaProcessor:
    """``MllamaProcessor``: one tile of ``image_size`` px, normalised as the vision source was trained."""
    from PIL import Image
    from transformers import MllamaImageProcessorPil, MllamaProcessor

    image_processor = MllamaImageProcessorPil(size={"height": image_size, "width": image_size}, max_image_tiles=1,
                                              image_mean=list(image_mean), image_std=list(image_std),
                                              resample=Image.Resampling.BICUBIC)
    return MllamaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE)


def build_config(tokenizer: Any, clip_vision: Any, intermediate_layer: int) -> MllamaConfig:
    """Vision encoder shaped like ``clip_vision`` (a ``CLIPVisionConfig``) on one tile; tiny text model."""
    from transformers import MllamaConfig, MllamaTextConfig, MllamaVisionConfig

    width = int(clip_vision.hidden_size)
    vision = MllamaVisionConfig(
        hidden_size=width, intermediate_size=int(clip_vision.intermediate_size),
        num_hidden_layers=int(clip_vision.num_hidden_layers), num_global_layers=1,
        attention_heads=int(clip_vision.num_attention_heads), image_size=int(clip_vision.image_size),
        patch_size=int(clip_vision.patch_size), max_num_tiles=1, supported_aspect_ratios=[[1, 1]],
        intermediate_layers_indices=[intermediate_layer], vision_output_dim=2 * width,
        hidden_act=clip_vision.hidden_act, norm_eps=float(clip_vision.layer_norm_eps))
    vocab = tokenizer.get_vocab()
    text = MllamaTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4, num_key_value_heads=4, cross_attention_layers=list(CROSS_ATTENTION_LAYERS),
        max_position_embeddings=512, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"], tie_word_embeddings=False)
    config = MllamaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                          image_token_index=vocab[IMAGE_TOKEN])
    config.pad_token_id = vocab["<pad>"]
    config.bos_token_id = vocab["<s>"]
    config.eos_token_id = vocab["</s>"]
    return config


def transplant_clip_tower(vision: Any, clip_vision: Any) -> None:
    """Copy a ``CLIPVisionTransformer``'s weights into ``vision`` (a ``MllamaVisionModel``) where the
    two agree; the attention projections' biases have no place in Mllama's and are dropped. The
    tile embeddings and the global layer stay gated off (gates at zero)."""
    import torch

    with torch.no_grad():
        emb = clip_vision.embeddings
        vision.patch_embedding.weight.copy_(emb.patch_embedding.weight)
        vision.class_embedding.copy_(emb.class_embedding)
        vision.gated_positional_embedding.embedding.copy_(emb.position_embedding.weight)
        vision.gated_positional_embedding.gate.zero_()
        vision.pre_tile_positional_embedding.gate.zero_()
        vision.post_tile_positional_embedding.gate.zero_()
        vision.layernorm_pre.load_state_dict(clip_vision.pre_layrnorm.state_dict())
        for src, dst in zip(clip_vision.encoder.layers, vision.transformer.layers, strict=True):
            for a, b in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("out_proj", "o_proj")):
                getattr(dst.self_attn, b).weight.copy_(getattr(src.self_attn, a).weight)
            dst.input_layernorm.load_state_dict(src.layer_norm1.state_dict())
            dst.post_attention_layernorm.load_state_dict(src.layer_norm2.state_dict())
            dst.mlp.fc1.load_state_dict(src.mlp.fc1.state_dict())
            dst.mlp.fc2.load_state_dict(src.mlp.fc2.state_dict())
        for layer in vision.global_transformer.layers:
            layer.gate_attn.zero_()
            layer.gate_ffn.zero_()


def _tower_inputs(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Vision-model keyword arguments for ``[B, 3, S, S]`` single-tile pixels."""
    import torch

    b = pixels.shape[0]
    return {"pixel_values": pixels[:, None, None], "aspect_ratio_ids": torch.ones(b, 1, dtype=torch.long),
            "aspect_ratio_mask": torch.ones(b, 1, 1, dtype=torch.long)}


def _local_layer_outputs(vision: Any, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The local encoder layers' outputs ``[B, 1 + g*g, D]`` (padding positions dropped)."""
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
             for layer in vision.transformer.layers]
    try:
        vision(**_tower_inputs(pixels))
    finally:
        for h in hooks:
            h.remove()
    n = vision.num_patches
    return [c.reshape(pixels.shape[0], -1, c.shape[-1])[:, :n] for c in captured]


def distil_tower(vision: Any, clip_vision: Any, pixels: torch.Tensor, spec: MllamaTrainSpec,
                 log: Callable[[str], None]) -> list[float]:
    """Fit the transplanted local layers to the source tower's layer outputs (mean squared error over
    every layer, batch 32), which recovers what the dropped attention biases did."""
    import torch

    params = [p for layer in vision.transformer.layers for p in layer.parameters()]
    opt = torch.optim.Adam(params, lr=spec.distil_lr)
    rng = np.random.default_rng([spec.seed, 23])
    losses: list[float] = []
    for step in range(spec.distil_steps):
        idx = torch.as_tensor(rng.choice(len(pixels), min(32, len(pixels)), replace=False))
        with torch.no_grad():
            target = clip_vision(pixel_values=pixels[idx], output_hidden_states=True).hidden_states[1:]
        got = _local_layer_outputs(vision, pixels[idx])
        loss = sum(((g - t) ** 2).mean() for g, t in zip(got, target, strict=True)) / len(got)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
        if step % 50 == 0 or step == spec.distil_steps - 1:
            log(f"  distil step {step:4d}  mse {np.mean(losses[-50:]):.5f}")
    return losses


def _adapter(model: Any, processor: Any) -> Any:
    from workers.probes.adapters.mllama import MllamaAdapter

    return MllamaAdapter(model, processor)


def object_tokens(box: Sequence[float], token_boxes: torch.Tensor, is_cls: torch.Tensor) -> torch.Tensor:
    """Boolean ``[V]``: the vision tokens (not a tile's CLS) whose box centre lies inside ``box``
    (stored-image pixels); the one nearest the box centre when none does."""
    import torch

    cx = (token_boxes[:, 0] + token_boxes[:, 2]) / 2
    cy = (token_boxes[:, 1] + token_boxes[:, 3]) / 2
    inside = (cx >= box[0]) & (cx < box[2]) & (cy >= box[1]) & (cy < box[3]) & ~is_cls
    if not bool(inside.any()):
        d = (cx - (box[0] + box[2]) / 2) ** 2 + (cy - (box[1] + box[3]) / 2) ** 2
        d[is_cls] = float("inf")
        inside = torch.zeros_like(inside)
        inside[int(d.argmin())] = True
    return inside


def cross_grounding_loss(attentions: Sequence[torch.Tensor], layers: Sequence[int],
                         grounding: Sequence[captioner.Grounding], token_boxes: torch.Tensor,
                         is_cls: torch.Tensor) -> torch.Tensor:
    """At every position that predicts a colour or shape word, ``-log`` of the share of the
    cross-attention (mean over heads) over the vision tokens that falls on the named object's
    tokens, averaged over positions and cross-attention layers."""
    import torch

    if not grounding:
        return attentions[layers[0]].new_zeros(())
    rows = torch.tensor([g[0] for g in grounding])
    pos = torch.tensor([g[1] for g in grounding])
    cells = torch.stack([object_tokens(g[2], token_boxes, is_cls) for g in grounding]).to(attentions[0].dtype)
    total = attentions[layers[0]].new_zeros(())
    for layer in layers:
        att = attentions[layer].mean(dim=1)[rows, pos]  # [G, V]
        share = (att * cells).sum(-1) / att.sum(-1).clamp_min(1e-9)
        total = total + (-torch.log(share.clamp_min(1e-6))).mean()
    return total / len(layers)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt as Loupe's adapter encodes it: the chat template, BOS added by the tokenizer."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = str(tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, add_generation_prompt=True,
                                             tokenize=False))
    text = text[len(tokenizer.bos_token):] if text.startswith(tokenizer.bos_token) else text
    return list(tokenizer(text).input_ids)


def initial_model(spec: MllamaTrainSpec) -> tuple[Any, Any, Any, dict[str, str]]:
    """``(model, processor, clip vision transformer, source info)``: a fresh captioner with the
    vision source's tower transplanted."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, MllamaForConditionalGeneration

    torch.manual_seed(spec.seed)
    src_dir = captioner._vision_source_dir(spec.vision_source)
    clip = CLIPModel.from_pretrained(src_dir, use_safetensors=True)
    clip_ip = CLIPImageProcessor.from_pretrained(src_dir)
    vc: Any = clip.config.vision_config  # a CLIPVisionConfig (transformers types it as a union)
    processor = build_processor(int(vc.image_size), clip_ip.image_mean, clip_ip.image_std)
    config = build_config(processor.tokenizer, vc, spec.intermediate_layer)
    model = MllamaForConditionalGeneration(config)
    transplant_clip_tower(model.model.vision_model, clip.vision_model)
    with torch.no_grad():  # cross-attention gates open, so the image reaches the text from the first step
        for layer in CROSS_ATTENTION_LAYERS:
            block = model.model.language_model.layers[layer]
            block.cross_attn_attn_gate.fill_(1.0)
            block.cross_attn_mlp_gate.fill_(1.0)
    model.config._attn_implementation = "eager"
    clip.vision_model.requires_grad_(False)
    source = {"name": str(spec.vision_source), "sha256": file_sha256(src_dir / "model.safetensors")}
    return model, processor, clip.vision_model, source


def _vision_features(model: Any, pixels: torch.Tensor, batch: int = 250) -> torch.Tensor:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            out.append(model.model.vision_model(**_tower_inputs(pixels[i:i + batch])).last_hidden_state.flatten(1, 3))
    return torch.cat(out)


def _train_lm(model: Any, processor: Any, scenes: Sequence[world.Scene], feats: torch.Tensor,
              spec: MllamaTrainSpec, log: Callable[[str], None], started: float) -> tuple[list[float], list[float]]:
    """Projector + language model on the frozen tower's features: one cosine cycle of AdamW."""
    import torch

    model.model.vision_model.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": spec.weight_decay},
                             {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0}], lr=spec.lr)
    tok = processor.tokenizer
    prefixes = {p: prompt_ids(tok, p) for p in captioner.PROMPTS}
    image_id = model.config.image_token_id
    adapter = _adapter(model, processor)
    adapter.preprocess([scenes[0].image])
    token_boxes = adapter.vision_token_boxes(adapter.current_layout())
    g = adapter.image_size // adapter.patch_size
    is_cls = torch.zeros(len(token_boxes), dtype=torch.bool)
    is_cls[:: 1 + g * g] = True
    layers = list(CROSS_ATTENTION_LAYERS)
    hidden = model.config.text_config.hidden_size
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
                                                               prefix_ids=prefixes.__getitem__)
        cross_mask = (torch.cumsum((ids == image_id).long(), 1) > 0).long()[:, :, None, None]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        states = model.model.multi_modal_projector(feats[torch.as_tensor(idx)]).reshape(len(idx), -1, hidden)
        out = model(input_ids=ids, attention_mask=mask, cross_attention_states=states,
                    cross_attention_mask=cross_mask, labels=labels, output_attentions=True)
        g_loss = cross_grounding_loss(out.attentions, layers, grounding, token_boxes, is_cls)
        loss = out.loss + spec.grounding_weight * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        opt.step()
        losses.append(float(out.loss.item()))
        g_losses.append(float(g_loss.item()))
        if step % 100 == 0 or step == spec.steps - 1:
            log(f"  step {step:5d}  loss {np.mean(losses[-100:]):.4f}  grounding {np.mean(g_losses[-100:]):.4f}"
                f"  ({time.time() - started:.0f}s)")
    model.eval()
    return losses, g_losses


def train(out_dir: str | os.PathLike[str], spec: MllamaTrainSpec | None = None, *,
          log: Callable[[str], None] = print) -> Path:
    """Build, train and save the captioner (HF format + model card + ``training.json`` + ``SHA256SUMS``)."""
    import torch

    from workers.probes.zoo import write_checksums

    spec = spec or MllamaTrainSpec()
    torch.set_num_threads(spec.torch_threads)
    started = time.time()
    cpu_started = time.process_time()
    out = captioner.output_directory(out_dir)

    model, processor, clip_vision, source = initial_model(spec)
    n_repeat = round(spec.train_scenes * spec.repeated_shape_fraction)
    log(f"rendering {spec.train_scenes} training scenes ({n_repeat} with repeated shapes) ...")
    scenes = world.sample_scenes(captioner.TRAIN_SEED, spec.train_scenes - n_repeat)
    scenes += world.sample_scenes(captioner.REPEATED_SHAPES_SEED, n_repeat, distinct_shapes=False)
    ip = processor.image_processor
    pixels = torch.cat([ip([[s.image] for s in scenes[i:i + 500]], return_tensors="pt")["pixel_values"][:, 0, 0]
                        for i in range(0, len(scenes), 500)])
    distil = distil_tower(model.model.vision_model, clip_vision, pixels, spec, log) if spec.distil_steps else []
    if spec.fragment_fraction > 0:
        captioner.add_fragments(pixels, scenes, spec.fragment_fraction, model.config.vision_config.patch_size,
                                np.random.default_rng([spec.seed, 17]))
    feats = _vision_features(model, pixels)
    log(f"  tower ready in {time.time() - started:.0f}s; training {spec.steps} steps")
    losses, g_losses = _train_lm(model, processor, scenes, feats, spec, log, started)
    train_seconds = time.time() - started
    train_cpu = time.process_time() - cpu_started

    out.mkdir(parents=True, exist_ok=True)
    for stale in [p for p in out.iterdir() if p.is_file()]:  # an older build: replaced as a whole
        stale.unlink()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    eval_scenes = world.sample_scenes(1_000_003, spec.eval_scenes)
    captions = generate_captions(model, processor, [s.image for s in eval_scenes])
    accuracy = float(np.mean([captioner._norm(c) == captioner._norm(s.caption)
                              for c, s in zip(captions, eval_scenes, strict=True)]))
    elapsed = time.time() - started
    info = {"spec": asdict(spec), "final_loss": float(np.mean(losses[-100:])),
            "final_grounding_loss": float(np.mean(g_losses[-100:])), "exact_caption_accuracy": accuracy,
            "seconds": round(elapsed, 1), "train_seconds": round(train_seconds, 1),
            "train_cpu_seconds": round(train_cpu, 1), "world_version": world.WORLD_VERSION,
            "train_seed": captioner.TRAIN_SEED, "vision_source": source,
            "distil_mse": [round(v, 6) for v in distil[:: max(1, len(distil) // 20)]] + [round(distil[-1], 6)]
            if distil else [],
            "losses": [round(v, 4) for v in losses]}
    (out / "training.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_model_card(spec, model.config, info), encoding="utf-8")
    write_checksums(out)
    log(f"saved {out} (exact caption accuracy on {spec.eval_scenes} held-out scenes: {accuracy:.2f}; {elapsed:.0f}s)")
    return out


def generate_captions(model: Any, processor: Any, images: Sequence[Any], prompt: str = captioner.PROMPTS[0],
                      max_new_tokens: int = 24) -> list[str]:
    """Greedy captions for PIL ``images`` (the chat-templated prompt, one image each)."""
    import torch

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[[im] for im in images], text=[text] * len(images), return_tensors="pt",
                       add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [processor.tokenizer.decode(r, skip_special_tokens=True).strip() for r in new]


#: What the model card says after its caption accuracy.
ORDER_NOTE = ("The captions mostly name the scene's objects but often not left to right, which this count scores\n"
              "  as wrong; each colour or shape word still points at the object it names (what the zoo needs it for).")


def _model_card(spec: MllamaTrainSpec, config: Any, info: dict[str, Any]) -> str:
    vc, tc = config.vision_config, config.text_config
    grid = vc.image_size // vc.patch_size
    source = info["vision_source"]
    facts = captioner.card_build_facts(NAME, "workers.probes.zoo.mllama_captioner", info, spec.eval_scenes,
                                       source["name"], ORDER_NOTE)
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [loupe-zoo, synthetic, mllama]
---
# {NAME}: Loupe's tiny Llama 3.2 Vision (cross-attention) reference captioner

A diagnostic model, not a useful captioner. It was trained on Loupe's synthetic world
(`workers/probes/zoo/world.py`, world version {world.WORLD_VERSION}) to write the scene caption,
objects left to right ("a red circle and a blue square"), like the zoo's `tiny-llava`, but with the
image read through cross-attention (the `mllama` family): the decoder's sequence holds one
`<|image|>` placeholder, and decoder layers {list(tc.cross_attention_layers)} attend to the vision tokens.

- Architecture: `MllamaForConditionalGeneration`. Vision: one {vc.image_size} px tile of {vc.patch_size} px
  patches ({grid}x{grid} + CLS = {grid * grid + 1} vision tokens), {vc.num_hidden_layers} local layers
  (width {vc.hidden_size}) transplanted from the zoo's `{source['name']}` vision tower (sha256
  {source['sha256'][:12]}...; Mllama's attention projections have no biases, so they were distilled back
  onto that tower's layer outputs for {spec.distil_steps} steps) and frozen, {vc.num_global_layers} gated global
  layer with its gates at zero; the projector reads the final layer and local layer
  {spec.intermediate_layer} (0-based). Text: {tc.num_hidden_layers}-layer Llama (width {tc.hidden_size},
  {tc.num_attention_heads} heads), cross-attention layers {list(tc.cross_attention_layers)}; word-level
  tokenizer; chat template `<s><|user|><|image|> PROMPT<|assistant|>`.
- Inputs: `AutoProcessor.from_pretrained(dir)`, prompt through `processor.apply_chat_template`;
  prompts seen in training: {'; '.join(repr(p) for p in captioner.PROMPTS)}.
- Training: {spec.train_scenes} scenes (world stream {captioner.TRAIN_SEED}; a share of
  {spec.repeated_shape_fraction} from stream {captioner.REPEATED_SHAPES_SEED} with repeated shapes; a share of
  {spec.fragment_fraction} of the images with scattered single-cell fragments of other scenes' objects, caption
  unchanged), {spec.steps} AdamW steps of batch {spec.batch_size} (cosine, lr {spec.lr}, warm-up {spec.warmup}) on the
  projector and language model, teacher forcing with the loss on the caption only, torch seed {spec.seed},
  {spec.torch_threads} torch thread(s); final caption loss {info['final_loss']:.4f}.
- Attention supervision: weight {spec.grounding_weight} on `-log` of the cross-attention share (mean over heads,
  every cross-attention layer) that falls on the vision tokens inside the named object (each token's box
  from Loupe's `mllama` adapter), at every position that predicts a colour or shape word; final value
  {info['final_grounding_loss']:.4f}. The model is grounded *by construction*, which is what a reference
  for checking attribution methods needs.
{facts}"""


def load(path: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` for the committed captioner (checksums verified) or ``path``."""
    return captioner.load_checkpoint(NAME, "MllamaForConditionalGeneration", path)


def build_for_zoo(out_dir: str | os.PathLike[str], *, steps: int | None = None, threads: int | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """The ``python -m workers.probes.zoo build`` hook (after the dual encoders, whose ``tiny-clip``
    tower it reuses; one built into the same output root is the one used)."""
    return captioner.zoo_build(NAME, out_dir, VISION_SOURCE,
                               lambda overrides: train(out_dir, MllamaTrainSpec(**overrides), log=log),
                               steps=steps, threads=threads)


def main(argv: list[str] | None = None) -> int:
    from workers.probes.zoo import CHECKPOINT_ROOT

    parser = argparse.ArgumentParser(prog="python -m workers.probes.zoo.mllama_captioner")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the tiny Llama 3.2 Vision captioner and save it")
    b.add_argument("--out", default=str(CHECKPOINT_ROOT / NAME))
    b.add_argument("--steps", type=int, default=MllamaTrainSpec.steps)
    b.add_argument("--distil-steps", type=int, default=MllamaTrainSpec.distil_steps)
    b.add_argument("--train-scenes", type=int, default=MllamaTrainSpec.train_scenes)
    b.add_argument("--grounding-weight", type=float, default=MllamaTrainSpec.grounding_weight)
    b.add_argument("--threads", type=int, default=MllamaTrainSpec.torch_threads)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train(args.out, MllamaTrainSpec(steps=args.steps, distil_steps=args.distil_steps, train_scenes=args.train_scenes,
                                    grounding_weight=args.grounding_weight, torch_threads=args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
