"""Tiny random-weight checkpoints of the any-resolution and dynamic-layout VLM families, saved with
transformers' own config, model, image processor and tokenizer classes (``save_pretrained``): what a
provider's download looks like, at a size the tests can run on two CPU cores.

The tokenizer is the zoo captioner's word-level one (``<image>`` special, BOS only).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: tiles of 16 px (4 x 4 patches of 4 px); the high-resolution canvases LLaVA-NeXT/OneVision choose from
TILE, PATCH = 16, 4
PINPOINTS = [[16, 32], [32, 16], [32, 32], [16, 48], [48, 16]]


def _tokenizer():
    from workers.probes.zoo import captioner

    return captioner.build_processor().tokenizer


def _text_config(tok, hidden: int = 32, heads: int = 2, layers: int = 2):
    from transformers import Qwen2Config

    vocab = tok.get_vocab()
    return Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
                       bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
                       tie_word_embeddings=False)


def _vision_config(hidden: int = 32, heads: int = 2, siglip: bool = False):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    config = SiglipVisionConfig if siglip else CLIPVisionConfig
    return config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=heads, image_size=TILE, patch_size=PATCH)


def _never_stop(model, tok) -> None:
    """A zero output row for the end of text: a random model then writes its full length (its logit, 0,
    stays below the best of the other random logits), so captions always have tokens to attribute."""
    import torch

    with torch.no_grad():
        model.get_output_embeddings().weight[tok.get_vocab()["</s>"]] = 0.0


def save_tiny_llava_next(directory: str | Path, *, onevision: bool = False, seed: int = 0) -> Path:
    """A tiny ``LlavaNextForConditionalGeneration`` (or ``LlavaOnevisionForConditionalGeneration``) with its
    image processor (PIL backend: no torchvision) and tokenizer saved beside it."""
    import torch
    import transformers as tf

    directory = Path(directory)
    tok = _tokenizer()
    # OneVision as released: a SigLIP tower (no CLS token) read in full; LLaVA-NeXT: CLIP, CLS dropped
    vision, text = _vision_config(siglip=onevision), _text_config(tok)
    image_token = tok.get_vocab()["<image>"]
    if onevision:
        cfg = tf.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                                      image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                                      vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
        model_cls, proc_cls = tf.LlavaOnevisionForConditionalGeneration, tf.LlavaOnevisionImageProcessorPil
        image_processor = proc_cls(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    else:
        cfg = tf.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                                 image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                                 vision_feature_select_strategy="default")
        model_cls, proc_cls = tf.LlavaNextForConditionalGeneration, tf.LlavaNextImageProcessorPil
        image_processor = proc_cls(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                   image_grid_pinpoints=PINPOINTS)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    _never_stop(model, tok)
    model.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def save_tiny_idefics3(directory: str | Path, *, seed: int = 0, smolvlm: bool = False) -> Path:
    """A tiny ``Idefics3ForConditionalGeneration`` (SigLIP tower on 16 px frames of 4 px patches, pixel
    shuffle 2: 4 tokens per frame) with its own ``Idefics3Processor`` (PIL image processor: images
    resized to a longest edge of 48 px, split into 16 px frames plus a global frame). ``smolvlm``: the
    same with SmolVLM's classes; its processor needs torchvision (video), so the image processor and
    tokenizer are saved on their own, as the image-only path reads them."""
    import torch
    import transformers as tf

    directory = Path(directory)
    tok = _tokenizer()
    specials = ["<fake_token_around_image>", "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7)
                                                               for j in range(1, 7)]
    tok.add_special_tokens({"additional_special_tokens": specials})
    text = _text_config(tok)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": TILE, "patch_size": PATCH}
    image_token = tok.convert_tokens_to_ids("<image>")
    if smolvlm:
        cfg = tf.SmolVLMConfig(vision_config=vision, text_config=text.to_dict(), scale_factor=2,
                               image_token_id=image_token)
        model_cls, ip_cls = tf.SmolVLMForConditionalGeneration, tf.SmolVLMImageProcessorPil
    else:
        cfg = tf.Idefics3Config(vision_config=vision, text_config=text.to_dict(), scale_factor=2,
                                image_token_id=image_token)
        model_cls, ip_cls = tf.Idefics3ForConditionalGeneration, tf.Idefics3ImageProcessorPil
    torch.manual_seed(seed)
    model = model_cls(cfg)
    _never_stop(model, tok)
    model.save_pretrained(directory)
    image_processor = ip_cls(size={"longest_edge": 3 * TILE}, max_image_size={"longest_edge": TILE})
    if smolvlm:
        image_processor.save_pretrained(directory)
        tok.save_pretrained(directory)
    else:
        tf.Idefics3Processor(image_processor=image_processor, tokenizer=tok,
                             image_seq_len=(TILE // PATCH // 2) ** 2).save_pretrained(directory)
    return directory


def save_tiny_gemma3(directory: str | Path, *, seed: int = 0) -> Path:
    """A tiny ``Gemma3ForConditionalGeneration`` (SigLIP on 16 px images of 4 px patches, pooled to 2 x 2
    soft tokens) with its ``Gemma3Processor`` (PIL image processor, word-level tokenizer with Gemma's
    ``<start_of_image>`` / ``<image_soft_token>`` / ``<end_of_image>``)."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from workers.probes.zoo import captioner

    directory = Path(directory)
    words = [w for w in captioner.vocabulary() if w != "<image>"]
    words += ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]
    vocab = {w: i for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>"})
    text = tf.Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                               sliding_window=64, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                               pad_token_id=vocab["<pad>"])
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=TILE, patch_size=PATCH)
    cfg = tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=vocab["<image_soft_token>"], boi_token_index=vocab["<start_of_image>"],
                          eoi_token_index=vocab["<end_of_image>"])
    torch.manual_seed(seed)
    model = tf.Gemma3ForConditionalGeneration(cfg)
    _never_stop(model, tok)
    model.save_pretrained(directory)
    image_processor = tf.Gemma3ImageProcessorPil(size={"height": TILE, "width": TILE})
    tf.Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4).save_pretrained(directory)
    return directory
