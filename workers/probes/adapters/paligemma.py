"""PaliGemma (SigLIP patches as image tokens, a prefix-LM over image and prompt) behind ``FusionAdapter``.

The image processor squashes the stored image to ``S x S``; the SigLIP tower reads ``S/p x S/p`` patches
(no CLS token) and a linear projector maps each patch to one image token, in row-major order: image token
``j`` *is* grid cell ``j`` (``patch_aligned``), as in LLaVA. The processor writes the prompt as
``<image> * n``, BOS, the prompt, ``"\\n"``.

What differs from LLaVA: the whole prompt (image tokens and text) is a prefix that attends to itself in
both directions; generated tokens attend causally. transformers builds that mask only from
``token_type_ids`` (0 for the prefix) on a call that starts at position 0. So:

- ``causal_lm`` is a thin wrapper that passes the token types of the sequence ``embed`` last built (the
  prompt ``encode`` made is the prefix, any rows after it are generated text) to every call that starts
  at position 0;
- generation and ``trace_targets`` run the WHOLE prompt in their first call (the base class stops one row
  short, which a prefix-LM's earlier rows would miss: they attend to the last prompt row), then re-run
  the last prompt row with the explained rows over the prompt's cached keys and values (the same numbers:
  the last row attends to the whole prompt either way). Relevance through that split is
  ``token_attribution.split_relevance_rows`` with a prefix one row longer (see there); a test checks it
  equals the one-pass rule.

Supported: loading (its ``AutoProcessor`` needs no torchvision), captioning, ``attribute`` /
``token_attribution`` (``chefer``, ``chefer_full``, ``raw``, and the perturbation methods on the patch
grid), attention statistics, head ablation over the decoder and the vision tower, feature swap at the
patch embedding and the projector.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from workers.probes.adapters.base import Encoded, FusionAdapter, TargetTrace, autocast_forward
from workers.probes.errors import ProbeInputError, UnsupportedModelError


class _PrefixLM(torch.nn.Module):
    """``PaliGemmaForConditionalGeneration`` called with the token types of the current sequence."""

    def __init__(self, model: torch.nn.Module, adapter: PaliGemmaAdapter):
        super().__init__()
        self.model: Any = model
        self._adapter = [adapter]  # a list: not a registered submodule

    @property
    def config(self) -> Any:
        return self.model.config

    def get_input_embeddings(self) -> Any:
        return self.model.get_input_embeddings()

    def forward(self, inputs_embeds: torch.Tensor, cache: Any = None, **kwargs: Any) -> Any:
        keyword = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        kwargs[keyword] = cache
        start = cache.get_seq_length() if cache is not None else 0
        if start == 0:
            kwargs["token_type_ids"] = self._adapter[0].types_for(inputs_embeds.shape[1]).expand(
                inputs_embeds.shape[0], -1)
        return self.model(inputs_embeds=inputs_embeds, **kwargs)


class PaliGemmaAdapter(FusionAdapter):
    architecture = "paligemma"
    hf_class = "PaliGemmaForConditionalGeneration"
    model_types = ("paligemma",)
    family = "PaliGemma"
    num_prefix_tokens = 0  # SigLIP: no CLS token
    _prompt: torch.Tensor | None = None  # [1, P] ids of the prompt ``encode`` last built (the prefix)
    _prefix_len: int = 0  # prompt rows of the sequence ``embed`` last built

    def __init__(self, model: torch.nn.Module, processor: Any, device: str | torch.device = "cpu"):
        if not hasattr(processor, "image_seq_length"):
            raise UnsupportedModelError("the directory's processor is not a PaliGemmaProcessor (no image_seq_length)")
        self.setup(model, processor, device)
        self.n_image_tokens = self.grid[0] * self.grid[1]
        if int(processor.image_seq_length) != self.n_image_tokens:
            raise UnsupportedModelError(f"PaliGemma: the processor writes {processor.image_seq_length} image tokens, "
                                        f"the vision tower makes {self.n_image_tokens}; they don't belong together")
        self.image_token_string = str(processor.image_token)
        self._lm = _PrefixLM(model, self)

    @property
    def causal_lm(self) -> torch.nn.Module:
        return self._lm

    @property
    def hf(self) -> Any:
        """The transformers model (untyped: its submodules are read by name)."""
        return self.model

    # --- inputs --------------------------------------------------------------------------

    def encode(self, prompt: str) -> Encoded:
        """``<image> * n``, BOS, the prompt, a newline: as ``PaliGemmaProcessor`` writes it."""
        mark = self.image_token_string
        text = prompt.replace(mark, "").strip()
        if mark in prompt and not prompt.lstrip().startswith(mark):
            raise ProbeInputError(f"PaliGemma reads the image before the prompt; put {mark} first, got {prompt!r}")
        tok: Any = self.tokenizer
        ids = tok(f"{mark * self.n_image_tokens}{tok.bos_token}{text}\n", add_special_tokens=False).input_ids
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = (input_ids[0] == self.image_token_id).nonzero().flatten()
        if len(positions) != self.n_image_tokens:
            raise ProbeInputError(f"the prompt {prompt!r} does not encode to {self.n_image_tokens} image tokens")
        self._prompt = input_ids
        return Encoded(input_ids=input_ids, image_positions=positions)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        # the next language-model calls run over this sequence: its prompt is the bidirectional prefix
        prompt = self._prompt
        p = prompt.shape[1] if prompt is not None else 0
        same = (prompt is not None and input_ids.shape[1] >= p
                and bool((input_ids[:, :p] == prompt.to(input_ids.device)).all()))
        self._prefix_len = p if same else input_ids.shape[1]
        return super().embed(input_ids, image_features)

    def types_for(self, n: int) -> torch.Tensor:
        """``[1, n]`` token types of the first ``n`` rows: 0 for the prompt (the prefix), 1 after it."""
        return (torch.arange(n, device=self.device) >= self._prefix_len).long()[None]

    @autocast_forward
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.hf.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output

    # --- running -------------------------------------------------------------------------

    @autocast_forward
    def vision_trace(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """``(features [B, n_img, D], attentions [B, Hv, Tv, Tv] per vision layer, vision_rows [n_img])``:
        every vision token is one image token (no CLS token, no selection)."""
        out = self.hf.model.vision_tower(pixel_values, output_attentions=True, return_dict=True)
        hidden = out.last_hidden_state
        rows = torch.arange(hidden.shape[1], device=hidden.device)
        return self.hf.model.multi_modal_projector(hidden), list(out.attentions), rows

    def _greedy(self, inputs_embeds: torch.Tensor, max_new_tokens: int, *,
                trace: bool) -> tuple[list[list[int]], Any, list[tuple[torch.Tensor, torch.Tensor]]]:
        """``FusionAdapter._greedy`` with the whole prompt in the first call (see the module docstring); the
        keys and values it returns are the prompt's but the last row, which ``generate_traced`` re-runs."""
        lm: Any = self.causal_lm
        embed_tokens = lm.get_input_embeddings()
        # Any: DynamicCache types its layers as a union of layer kinds; a DynamicCache's have keys and values
        cache: Any = self._new_cache()
        n = inputs_embeds.shape[1]
        prefix = lm(inputs_embeds=inputs_embeds, logits_to_keep=1, use_cache=True, output_attentions=trace,
                    return_dict=True, cache=cache)
        prefix_kv = [(layer.keys[:, :, :n - 1], layer.values[:, :, :n - 1]) for layer in cache.layers] if trace else []
        rows: list[list[int]] = [[] for _ in range(inputs_embeds.shape[0])]
        done = [False] * len(rows)
        logits = prefix.logits[:, -1].detach().float()
        with torch.no_grad():
            for step in range(max_new_tokens):
                logits[:, self.image_token_id] = -torch.inf
                tokens = logits.argmax(-1)
                for b, token in enumerate(tokens.tolist()):
                    if not done[b]:
                        done[b] = token == self.eos_token_id
                        if not done[b]:
                            rows[b].append(token)
                if all(done) or step == max_new_tokens - 1:
                    break
                x = embed_tokens(tokens[:, None]).to(inputs_embeds.dtype)
                logits = lm(inputs_embeds=x, logits_to_keep=1, use_cache=True, return_dict=True,
                            cache=cache).logits[:, -1].float()
        return rows, prefix, prefix_kv

    @autocast_forward
    def trace_targets(self, inputs_embeds: torch.Tensor, first_row: int) -> TargetTrace:
        """``FusionAdapter.trace_targets`` for a prefix-LM: the prompt (rows ``..first_row``, all of it) in one
        call, then rows ``first_row..`` over its keys and values but the last row's."""
        lm = self.causal_lm
        common: dict[str, Any] = {"use_cache": True, "output_attentions": True, "return_dict": True}
        cache: Any = self._new_cache()  # see _greedy
        prefix = lm(inputs_embeds=inputs_embeds[:, :first_row + 1], logits_to_keep=1, cache=cache, **common)
        kept = [(layer.keys[:, :, :first_row], layer.values[:, :, :first_row]) for layer in cache.layers]
        rest = lm(inputs_embeds=inputs_embeds[:, first_row:], cache=self._new_cache(kept), **common)
        return self._target_trace(prefix, rest)

    def head_modules(self) -> dict[str, tuple[str, int, int]]:
        return {"decoder": (r"language_model\.layers\.(\d+)\.self_attn\.o_proj$", self.num_layers, self.num_heads),
                "vision": (r"vision_tower\..*layers\.(\d+)\.self_attn\.out_proj$", self.vision_num_layers,
                           self.vision_num_heads)}
