"""Tiny randomly initialised CLIP / SigLIP / BERT checkpoints saved with plain ``save_pretrained``.

They stand for "any checkpoint a provider hands us" (the zoo's trained models cover "a model with
known ground truth"). Word-level tokenizer over a small vocabulary, built offline.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("a an the photo of and red green blue yellow circle square triangle cross star cat dog "
         "left right top bottom").split()


def _tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    vocab["[EOS]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", vocab["[EOS]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]", model_max_length=max_length)
    return fast, vocab


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
