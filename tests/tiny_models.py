"""Tiny randomly initialised CLIP / SigLIP / BERT checkpoints saved with plain ``save_pretrained``.

They stand for "any checkpoint a provider hands us" (the zoo's trained models cover "a model with
known ground truth"). Word-level tokenizer over a small vocabulary, built offline.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["a", "an", "the", "photo", "of", "and", "red", "green", "blue", "yellow", "circle", "square", "triangle",
         "cross", "star", "cat", "dog", "left", "right", "top", "bottom"]


def _tokenizer(max_length: int):
    from workers.probes.zoo.train import word_level_tokenizer

    return word_level_tokenizer(WORDS, max_length)


def save_tiny_clip(directory: str | Path, *, image_size: int = 32, patch_size: int = 8, layers: int = 3,
                   hidden: int = 32, heads: int = 2, seed: int = 0, with_tokenizer: bool = True,
                   with_processor: bool = True) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = Path(directory)
    tok, vocab = _tokenizer(16)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=16,
                         eos_token_id=vocab["[EOS]"], bos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch_size),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(directory)
    if with_tokenizer:
        tok.save_pretrained(directory)
    if with_processor:
        CLIPImageProcessor(size={"shortest_edge": image_size},
                           crop_size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory


def save_tiny_siglip(directory: str | Path, *, image_size: int = 32, patch_size: int = 8, layers: int = 3,
                     hidden: int = 32, heads: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    directory = Path(directory)
    tok, vocab = _tokenizer(16)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=2, eos_token_id=vocab["[EOS]"]),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch_size))
    torch.manual_seed(seed)
    SiglipModel(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory


def save_tiny_bert(directory: str | Path) -> Path:
    """A text-only model: what a provider might upload by mistake."""
    import torch
    from transformers import BertConfig, BertModel

    directory = Path(directory)
    tok, vocab = _tokenizer(16)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def save_attending_clip(directory: str | Path, *, amplify: float = 4.0) -> Path:
    """A CLIP whose weights are set by hand so that we *know* where it looks and why.

    Images (fed as pixel values, 32 px, 4x4 patches of 8 px): a "red" object is a patch with
    channel 0 = 1, a "blue" object a patch with channel 2 = 1, background 0. Vision tower (2
    layers): the patch embedding copies a patch's mean red into hidden channel 0 and its mean blue
    into channel 2; the CLS token is channel 1. In head 0 the CLS query (channel 1) matches keys
    that are large for any object (channels 0 + 2), so the CLS token attends to the objects and
    copies their colour channels (identity values and output); head 1 has zero queries and keys
    (uniform attention). MLPs add nothing. The image embedding reads hidden channels 0 (red) and
    2 (blue). Text tower: the EOS token attends uniformly to the prompt, so the embedding of a
    prompt containing "red" points along "red" (channel 0), "blue" along channel 2.

    Hence for prompt "a red circle" the score rises with the red object's presence and falls with
    the blue one's: a faithful gradient method must point at the red patch, and attention-only
    methods (rollout, flow) at the objects.
    """
    import torch

    directory = Path(directory)
    save_tiny_clip(directory, layers=2, hidden=32, heads=2)
    from safetensors.torch import load_file, save_file

    w = load_file(directory / "model.safetensors")
    tok, vocab = _tokenizer(16)
    d = 32
    eye = torch.eye(d)

    def zero(prefix: str) -> None:
        for k in list(w):
            if k.startswith(prefix):
                w[k] = torch.zeros_like(w[k])

    for tower in ("vision_model", "text_model"):
        for layer in range(2):
            p = f"{tower}.encoder.layers.{layer}."
            zero(p + "mlp.fc2")
            zero(p + "self_attn")
            w[p + "self_attn.v_proj.weight"] = eye.clone()
            w[p + "self_attn.out_proj.weight"] = eye.clone()
            for ln in ("layer_norm1", "layer_norm2"):
                w[p + ln + ".weight"] = torch.ones(d)
                w[p + ln + ".bias"] = torch.zeros(d)
    # vision: patch embedding -> channel 0 (red), 2 (blue); CLS -> channel 1; no positions
    conv = torch.zeros_like(w["vision_model.embeddings.patch_embedding.weight"])  # [D, 3, 8, 8]
    conv[0, 0] = 1.0 / 64
    conv[2, 2] = 1.0 / 64
    w["vision_model.embeddings.patch_embedding.weight"] = conv
    w["vision_model.embeddings.class_embedding"] = eye[1] * 1.0
    zero("vision_model.embeddings.position_embedding")
    for ln in ("vision_model.pre_layrnorm", "vision_model.post_layernorm", "text_model.final_layer_norm"):
        w[ln + ".weight"] = torch.ones(d)
        w[ln + ".bias"] = torch.zeros(d)
    for layer in range(2):
        p = f"vision_model.encoder.layers.{layer}.self_attn."
        q = torch.zeros(d, d)
        q[0, 1] = amplify  # head 0's query: "I am the CLS token"
        k = torch.zeros(d, d)
        k[0, 0] = k[0, 2] = 1.0  # head 0's key: "I am an object"
        w[p + "q_proj.weight"], w[p + "k_proj.weight"] = q, k
    proj = torch.zeros_like(w["visual_projection.weight"])  # [16, D]
    proj[0, 0] = proj[1, 2] = 1.0
    w["visual_projection.weight"] = proj
    # text: "red" -> channel 0, "blue" -> channel 2, EOS -> channel 5 (ignored by the projection)
    emb = torch.zeros_like(w["text_model.embeddings.token_embedding.weight"])
    emb[vocab["red"], 0] = emb[vocab["blue"], 2] = 1.0
    emb[vocab["[EOS]"], 5] = 1.0
    w["text_model.embeddings.token_embedding.weight"] = emb
    zero("text_model.embeddings.position_embedding")
    tproj = torch.zeros_like(w["text_projection.weight"])
    tproj[0, 0] = tproj[1, 2] = 1.0
    w["text_projection.weight"] = tproj
    save_file(w, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def object_image(red: tuple[int, int] | None, blue: tuple[int, int] | None, *, image_size: int = 32,
                 patch: int = 8):
    """Pixel values ``[3, S, S]`` with a red and/or a blue object filling the given (row, col) patches."""
    import torch

    x = torch.zeros(3, image_size, image_size)
    for pos, channel in ((red, 0), (blue, 2)):
        if pos is not None:
            r, c = pos
            x[channel, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = 1.0
    return x


def point_blip2_at_red(model, amplify: float = 4.0) -> None:
    """Hand-set weights so that we *know* where a tiny BLIP-2 (``save_tiny_blip2`` defaults) looks.

    Vision tower: the patch embedding copies a patch's mean red (pixel channel 0) into hidden
    channel 0, the CLS token is channel 1, no position embeddings, and both layers add nothing
    (zero attention output and MLP), so after the final LayerNorm a red patch is a vector with a
    large channel 0 and every black patch is exactly zero. Q-Former cross-attention (every layer):
    every query's query vector is constant and keys copy the vision channels, so each head's
    score for a token is ``amplify * h[0]`` (resp. ``h[0]`` copied into head 1's first channel):
    all queries attend to the red patch; values read channel 0 only, so black patches carry
    nothing (value 0) and only the red patch's value can move the output.
    """
    import torch

    d = model.config.vision_config.hidden_size
    vision = model.vision_model
    conv = torch.zeros_like(vision.embeddings.patch_embedding.weight)  # [D, 3, p, p]
    conv[0, 0] = 1.0 / (conv.shape[-1] * conv.shape[-2])
    vision.embeddings.patch_embedding.weight.copy_(conv)
    vision.embeddings.patch_embedding.bias.zero_()
    vision.embeddings.class_embedding.copy_(torch.eye(d)[1].view(1, 1, d))
    vision.embeddings.position_embedding.zero_()
    for layer in vision.encoder.layers:
        for lin in (layer.self_attn.projection, layer.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
    vision.post_layernorm.weight.fill_(1.0)
    vision.post_layernorm.bias.zero_()
    hq = model.config.qformer_config.hidden_size
    head_dim = hq // model.config.qformer_config.num_attention_heads
    for layer in model.qformer.encoder.layer:
        if not layer.has_cross_attention:
            continue
        att = layer.crossattention.attention
        att.query.weight.zero_()
        att.query.bias.zero_()
        att.key.weight.zero_()
        att.key.bias.zero_()
        att.value.weight.zero_()
        att.value.bias.zero_()
        for h in range(hq // head_dim):
            att.query.bias[h * head_dim] = amplify
            att.key.weight[h * head_dim, 0] = 1.0
            att.value.weight[h * head_dim, 0] = 1.0


def save_tiny_blip2(directory: str | Path, *, image_size: int = 32, patch_size: int = 8, query_tokens: int = 4,
                    qformer_layers: int = 2, cross_attention_frequency: int = 1, hidden: int = 32, heads: int = 2,
                    seed: int = 0, edit=None, language_model: str = "opt") -> Path:
    """A tiny random ``Blip2ForConditionalGeneration`` (ViT 32 px / 8 px patches, 2-layer Q-Former, OPT
    decoder) with a ``Blip2Processor``: the zoo captioner's word-level tokenizer (``<image>`` special,
    BOS only) and a ``BlipImageProcessor`` resizing to a fixed ``image_size`` square. ``edit(model)``
    may set weights by hand before saving; ``language_model="t5"`` builds the encoder-decoder variant."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
        T5Config,
    )

    from workers.probes.zoo import captioner

    directory = Path(directory)
    tok = captioner.build_processor().tokenizer
    vocab = tok.get_vocab()
    # Blip2VisionConfig's default initializer_range is 1e-10 (pretrained towers are loaded, not
    # initialised), which leaves a random tower blind: two unrelated images differ by ~1e-6.
    vision = Blip2VisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                               num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                               initializer_range=0.02)
    qformer = Blip2QFormerConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=qformer_layers,
                                 num_attention_heads=heads, cross_attention_frequency=cross_attention_frequency,
                                 encoder_hidden_size=hidden, vocab_size=len(tok))
    text = OPTConfig(vocab_size=len(tok), hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=2,
                     num_attention_heads=heads, max_position_embeddings=128, word_embed_proj_dim=hidden,
                     pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"])
    if language_model == "t5":
        text = T5Config(vocab_size=len(tok), d_model=hidden, d_kv=hidden // heads, d_ff=2 * hidden, num_layers=1,
                        num_heads=heads, pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"],
                        decoder_start_token_id=vocab["<pad>"])
    cfg = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                      num_query_tokens=query_tokens, image_token_index=vocab["<image>"])
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(cfg)
    with torch.no_grad():  # BLIP-2 initialises the query tokens to zero: give each query its own identity
        model.query_tokens.normal_(0.0, 1.0)
        if edit is not None:
            edit(model)
    model.save_pretrained(directory)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=query_tokens)
    processor.save_pretrained(directory)
    return directory


def save_tiny_siglip2(directory: str | Path, *, patch_size: int = 8, max_num_patches: int = 16, layers: int = 2,
                      hidden: int = 32, heads: int = 2, seed: int = 0) -> Path:
    """A tiny NaFlex ``Siglip2Model`` (8 px patches, at most 16 per image: a 4 x 4 square) with its PIL
    image processor and a word-level tokenizer."""
    import torch
    from transformers import Siglip2Config, Siglip2ImageProcessorPil, Siglip2Model

    directory = Path(directory)
    tok, vocab = _tokenizer(16)
    cfg = Siglip2Config(
        # one more: transformers loads this directory with ``Siglip2Tokenizer``, which adds ``<mask>``
        text_config=dict(vocab_size=len(vocab) + 1, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=2, eos_token_id=vocab["[EOS]"]),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, patch_size=patch_size, num_patches=max_num_patches))
    torch.manual_seed(seed)
    Siglip2Model(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    Siglip2ImageProcessorPil(patch_size=patch_size, max_num_patches=max_num_patches).save_pretrained(directory)
    return directory


def write_shapes(root: Path, n: int = 4) -> Path:
    """A grounding dataset of ``n`` 64 px images, each a red circle with its box, prompt "a red circle"."""
    import json

    from PIL import Image, ImageDraw

    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        image = Image.new("RGB", (64, 64), (230, 230, 230))
        box = [4 + 8 * i, 8, 28 + 8 * i, 32]
        ImageDraw.Draw(image).ellipse(box, fill=(220, 20, 20))
        image.save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "prompt": "a red circle", "boxes": [box]}))
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
