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


#: Qwen's processor rounds the stored image to multiples of patch x merge (8 px here) with between 64 and
#: 1024 pixels, i.e. 1 to 16 merged tokens
QWEN_PATCH, QWEN_MERGE = 4, 2


def save_tiny_qwen_vl(directory: str | Path, *, version: str = "2.5", seed: int = 0) -> Path:
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` (``version`` "2.5") or ``Qwen3VLForConditionalGeneration``
    ("3": with deepstack features) on 4 px patches merged 2 x 2, with its PIL image processor (resized to
    multiples of 8 px, 64 to 1024 pixels) and a word-level tokenizer with Qwen's vision tokens, saved on
    their own: the family's ``AutoProcessor`` also builds a video processor (torchvision)."""
    import torch
    import transformers as tf

    directory = Path(directory)
    tok = _tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                          "<|video_pad|>"]})
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                     "<|video_pad|>", "<s>", "</s>", "<pad>")}
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": QWEN_PATCH,
              "spatial_merge_size": QWEN_MERGE, "temporal_patch_size": 2, "out_hidden_size": 32}
    tokens = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}
    if version == "3":
        text["head_dim"] = 16
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(num_position_embeddings=16, deepstack_visual_indexes=[0])
        cfg = tf.Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
        model_cls = tf.Qwen3VLForConditionalGeneration
    else:
        vision.update(window_size=2 * QWEN_PATCH * QWEN_MERGE, fullatt_block_indexes=[1])
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        model_cls = tf.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = model_cls(cfg)
    _never_stop(model, tok)
    model.save_pretrained(directory)
    factor = QWEN_PATCH * QWEN_MERGE
    tf.Qwen2VLImageProcessorPil(size={"shortest_edge": factor * factor, "longest_edge": 4 * factor * 4 * factor},
                                patch_size=QWEN_PATCH, merge_size=QWEN_MERGE,
                                temporal_patch_size=2).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def save_tiny_paligemma(directory: str | Path, *, seed: int = 0) -> Path:
    """A tiny ``PaliGemmaForConditionalGeneration`` (SigLIP on 16 px images of 4 px patches: 16 image tokens,
    a 3-layer Gemma: the fewest in which the prefix-LM's last prompt row reaches the output through the
    prompt's cached keys and values) with its own ``PaliGemmaProcessor`` (PIL image processor; the processor
    adds ``<image>`` and PaliGemma's location and segmentation tokens to the word-level tokenizer)."""
    import torch
    import transformers as tf

    directory = Path(directory)
    tok = _tokenizer()
    image_processor = tf.SiglipImageProcessorPil(size={"height": TILE, "width": TILE})
    image_processor.image_seq_length = (TILE // PATCH) ** 2
    processor = tf.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    vocab = tok.get_vocab()
    text = tf.GemmaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                          bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"])
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=TILE, patch_size=PATCH)
    cfg = tf.PaliGemmaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32,
                             hidden_size=32, vocab_size=len(tok), image_token_index=processor.image_token_id)
    torch.manual_seed(seed)
    model = tf.PaliGemmaForConditionalGeneration(cfg)
    _never_stop(model, tok)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _word_tokenizer(specials: dict[str, str]):
    """The zoo captioner's words (without its ``<image>``) plus ``specials`` (attribute name -> token), as a
    ``PreTrainedTokenizerFast`` whose extra special tokens are those attributes (``tok.image_token`` ...)."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from workers.probes.zoo import captioner

    words = [w for w in captioner.vocabulary() if w != "<image>"] + list(dict.fromkeys(specials.values()))
    vocab = {w: i for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return tf.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>", extra_special_tokens=specials)


def save_tiny_internvl(directory: str | Path, *, seed: int = 0) -> Path:
    """A tiny ``InternVLForConditionalGeneration`` (InternViT on 16 px tiles of 4 px patches, pixel shuffle 0.5:
    4 tokens per tile) with its ``GotOcr2ImageProcessorPil`` (up to 6 tiles plus a thumbnail) and a word-level
    tokenizer carrying InternVL's ``<img>`` / ``<IMG_CONTEXT>`` / ``</img>``. Its ``AutoProcessor`` also builds
    a video processor (torchvision), so the image processor, tokenizer and ``processor_config.json`` are
    saved the way ``InternVLProcessor.save_pretrained`` writes them."""
    import json

    import torch
    import transformers as tf

    directory = Path(directory)
    tok = _word_tokenizer({"start_image_token": "<img>", "end_image_token": "</img>",
                           "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    text = _text_config(tok)
    vision = tf.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=TILE, patch_size=PATCH)
    cfg = tf.InternVLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4,
                            downsample_ratio=0.5)
    torch.manual_seed(seed)
    model = tf.InternVLForConditionalGeneration(cfg)
    _never_stop(model, tok)
    model.save_pretrained(directory)
    tf.GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                                max_patches=6).save_pretrained(directory)
    tok.save_pretrained(directory)
    (directory / "processor_config.json").write_text(json.dumps({"processor_class": "InternVLProcessor",
                                                                 "image_seq_length": 4}), encoding="utf-8")
    return directory


def save_tiny_mistral3(directory: str | Path, *, seed: int = 0) -> Path:
    """A tiny ``Mistral3ForConditionalGeneration`` (Pixtral tower with 4 px patches, images up to 32 px on
    their longest edge, patch merger 2: one token per 8 px square) with its ``PixtralImageProcessorPil`` and
    a word-level tokenizer carrying ``[IMG]`` / ``[IMG_BREAK]`` / ``[IMG_END]``. ``PixtralProcessor`` needs
    torchvision, so the image processor, tokenizer and ``processor_config.json`` are saved as
    ``PixtralProcessor.save_pretrained`` writes them."""
    import json

    import torch
    import transformers as tf

    directory = Path(directory)
    tok = _word_tokenizer({"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]",
                           "image_end_token": "[IMG_END]"})
    vocab = tok.get_vocab()
    text = tf.MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                            sliding_window=None, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                            pad_token_id=vocab["<pad>"], tie_word_embeddings=False)
    vision = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    head_dim=16, image_size=2 * TILE, patch_size=PATCH)
    cfg = tf.Mistral3Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                            image_token_index=vocab["[IMG]"], spatial_merge_size=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = tf.Mistral3ForConditionalGeneration(cfg)
    _never_stop(model, tok)
    model.save_pretrained(directory)
    tf.PixtralImageProcessorPil(size={"longest_edge": 2 * TILE},
                                patch_size={"height": PATCH, "width": PATCH}).save_pretrained(directory)
    tok.save_pretrained(directory)
    (directory / "processor_config.json").write_text(json.dumps({
        "processor_class": "PixtralProcessor", "patch_size": PATCH, "spatial_merge_size": 2, "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}), encoding="utf-8")
    return directory


def save_tiny_mllama(directory: str | Path, *, seed: int = 0) -> Path:
    """A tiny ``MllamaForConditionalGeneration`` (Llama 3.2 Vision: a tiled vision encoder on 16 px tiles of
    4 px patches, up to 4 tiles; a 3-layer decoder whose middle layer cross-attends to the vision tokens) with
    its ``MllamaProcessor`` (PIL image processor, word-level tokenizer with ``<|image|>``, a chat template). A
    fresh model's cross-attention gates are zero (the image has no effect); they are opened here as training
    does."""
    import torch
    import transformers as tf

    directory = Path(directory)
    tok = _word_tokenizer({"image_token": "<|image|>", "user_turn": "<|user|>", "assistant_turn": "<|assistant|>"})
    vocab = tok.get_vocab()
    text = tf.MllamaTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=2, num_key_value_heads=2, cross_attention_layers=[1],
                               max_position_embeddings=512, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                               pad_token_id=vocab["<pad>"])
    vision = tf.MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                   attention_heads=2, image_size=TILE, patch_size=PATCH, max_num_tiles=4,
                                   vision_output_dim=64, intermediate_layers_indices=[1],
                                   supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1],
                                                            [4, 1]])
    cfg = tf.MllamaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                          image_token_index=vocab["<|image|>"])
    torch.manual_seed(seed)
    model = tf.MllamaForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate", ".gate")):
                param.fill_(1.0)
    _never_stop(model, tok)
    model.save_pretrained(directory)
    image_processor = tf.MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=4)
    tf.MllamaProcessor(image_processor=image_processor, tokenizer=tok,
                       chat_template=MLLAMA_CHAT_TEMPLATE).save_pretrained(directory)
    return directory


#: A chat template shaped like Llama 3.2 Vision Instruct's (BOS, user turn with the image first, assistant turn
#: opened), in the tiny tokenizer's words.
MLLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|image|>{% else %} {{ item['text'] }}"
    "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
