"""``Blip2ForConditionalGeneration`` (decoder-only language model, e.g. OPT) behind ``FusionAdapter``.

Loaded like LLaVA (``loading.load_generative``): a local directory, transformers' own classes,
safetensors only, never ``trust_remote_code``, eager attention, float32 weights (a ``dtype`` runs
the forward passes under autocast); pickled weights and partly random models are refused.

What differs from LLaVA: the language model's image tokens are the Q-Former's
``num_query_tokens`` learned queries (after ``language_projection``), not vision grid cells
(``patch_aligned = False``). Each query reads the whole image through the Q-Former's
cross-attention, so relevance over image tokens is carried to the patches by Chefer's bi-modal
rule (``chefer.query_context_relevance``) inside the same traced forward as the decoder:

- ``chefer``: decoder relevance over the query tokens -> Q-Former (self- and cross-attention,
  vision tokens taken as they enter, ``R^ii = I``) -> patches;
- ``chefer_full``: the same with ``R^ii`` the vision tower's own Chefer relevance;
- ``raw``: the decoder's raw attention over the query tokens, spread over the patches by the
  Q-Former's cross-attention probabilities (mean over heads and cross-attention layers).

There is no separate ``chefer_bimodal``: that is the bi-modal rule through a projector, and here
``chefer_full`` already applies it through the Q-Former (normalised vision relevance as context).
The perturbation and gradient methods (``token_perturbation``) need no image-token mapping: they
perturb the image on the vision tower's own patch grid, as for the patch-aligned families.

Supported: loading, captioning (``generate``), ``attribute`` / ``token_attribution``, ``attention``
statistics (decoder attention mapped to patches as in ``raw``), head ablation over the decoder
(OPT ``out_proj``), the vision tower (``projection``) and the Q-Former's cross-attention
(``qformer``: its k-th entry is the k-th layer that has cross-attention), and feature swap at the
vision tower's patch embeddings.

Refused, with a message: an encoder-decoder language model (BLIP-2 with Flan-T5: the probes
explain one causal decoder over the joint sequence); a Q-Former that also takes text
(``use_qformer_text_input``: InstructBLIP-style instructions); feature swap at the ``projector``
site (the query tokens are not patch-aligned, so there is no "object's token" to swap); an
``<image>`` placeholder anywhere but first (BLIP-2 always puts the image before the prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from workers.probes.adapters.base import Encoded, FusionAdapter, HFModule, autocast_forward
from workers.probes.errors import ProbeInputError, UnsupportedModelError

#: ``model_type`` values this adapter explains.
MODEL_TYPES = ("blip-2",)


class Blip2Adapter(FusionAdapter):
    architecture = "blip-2"
    hf_class = "Blip2ForConditionalGeneration"
    model_types = MODEL_TYPES
    family = "BLIP-2"
    patch_aligned = False
    num_prefix_tokens = 1  # Blip2VisionEmbeddings prepends a CLS token to the patches

    def __init__(self, model: HFModule, processor: Any, device: str | torch.device = "cpu") -> None:
        cfg = model.config
        if not getattr(cfg, "use_decoder_only_language_model", True):
            raise UnsupportedModelError(
                "BLIP-2 with an encoder-decoder language model (e.g. Flan-T5) is not supported: the generative "
                "probes explain one causal decoder over the joint image + text sequence; use an OPT-based BLIP-2")
        if getattr(cfg.qformer_config, "use_qformer_text_input", False):
            raise UnsupportedModelError("a Q-Former that also reads the prompt (use_qformer_text_input) is not "
                                        "supported: the Q-Former relevance assumes queries attend only to the image")
        if getattr(cfg, "image_token_id", None) is None:
            raise UnsupportedModelError("the BLIP-2 config has no image_token_index: this transformers version "
                                        "needs image placeholder tokens in the prompt")
        self.setup(model, processor, device)
        qc = cfg.qformer_config
        self.qformer_num_layers = int(qc.num_hidden_layers)
        self.qformer_num_heads = int(qc.num_attention_heads)
        #: Q-Former layers with a cross-attention block (every ``cross_attention_frequency``-th)
        self.cross_layers = [i for i, layer in enumerate(model.qformer.encoder.layer) if layer.has_cross_attention]
        self.num_query_tokens = int(cfg.num_query_tokens)
        self.n_image_tokens = self.num_query_tokens

    # --- inputs ----------------------------------------------------------------------------

    def encode(self, prompt: str) -> Encoded:
        """``num_query_tokens`` image tokens, then the tokenized prompt (with its BOS), as
        ``Blip2Processor`` builds it: BLIP-2 always reads the image before the text."""
        text = prompt.strip()
        if text.startswith("<image>"):
            text = text[len("<image>"):].strip()
        if "<image>" in text:
            raise ProbeInputError(f"BLIP-2 reads the image before the prompt; put '<image>' first or leave it out "
                                  f"(got {prompt!r})")
        ids = [self.image_token_id] * self.num_query_tokens + list(self.tokenizer(text).input_ids)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = (input_ids[0] == self.image_token_id).nonzero().flatten()
        if len(positions) != self.num_query_tokens:
            raise ProbeInputError(f"the prompt {prompt!r} encodes to the image token; it cannot be used")
        return Encoded(input_ids=input_ids, image_positions=positions)

    @autocast_forward
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower -> Q-Former queries -> ``language_projection``: ``[B, num_query_tokens, D]``."""
        return self.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output

    # --- running -----------------------------------------------------------------------------

    @property
    def causal_lm(self) -> HFModule:
        # Blip2ForConditionalGeneration's forward and generate insist on pixel_values; the probes
        # edit the embeddings themselves, so they run its language model (OPTForCausalLM) directly.
        return self.model.language_model

    @autocast_forward
    def vision_trace(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Image features with every attention on the way kept (with gradients).

        Returns ``(features [B, n_q, D], attentions, vision_rows [Tv])`` where ``attentions`` is the
        vision tower's layers ``[B, Hv, Tv, Tv]``, then the Q-Former's self-attentions
        ``[B, Hq, n_q, n_q]`` (one per layer), then its cross-attentions ``[B, Hq, n_q, Tv]`` (one per
        layer in ``cross_layers``); ``patch_relevance`` splits them again.
        """
        captured: dict[tuple[str, int], torch.Tensor] = {}
        handles: list[torch.utils.hooks.RemovableHandle] = []
        for i, layer in enumerate(self.model.qformer.encoder.layer):
            blocks = [("self", layer.attention.attention)]
            if layer.has_cross_attention:
                blocks.append(("cross", layer.crossattention.attention))
            for kind, module in blocks:
                # Blip2QFormerMultiHeadAttention returns (output, probabilities) under eager attention
                handles.append(module.register_forward_hook(
                    lambda _m, _a, out, key=(kind, i): captured.__setitem__(key, out[1])))
        try:
            vision = self.model.vision_model(pixel_values, output_attentions=True, return_dict=True)
            image_embeds = vision.last_hidden_state
            queries = self.model.query_tokens.expand(image_embeds.shape[0], -1, -1)
            mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            q = self.model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                                   encoder_attention_mask=mask, return_dict=True)
        finally:
            for h in handles:
                h.remove()
        features = self.model.language_projection(q.last_hidden_state.to(image_embeds.dtype))
        selfs = [captured.get(("self", i)) for i in range(self.qformer_num_layers)]
        crosses = [captured.get(("cross", i)) for i in self.cross_layers]
        recorded = list(vision.attentions or []) + selfs + crosses
        attentions = [a for a in recorded if a is not None]
        if len(vision.attentions or []) != self.vision_num_layers or len(attentions) != len(recorded):
            raise UnsupportedModelError("the vision tower or Q-Former did not return attention probabilities "
                                        "(eager attention)")
        return features, attentions, torch.arange(image_embeds.shape[1], device=image_embeds.device)

    def _split(self, items: Sequence[torch.Tensor]
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        nv, nq = self.vision_num_layers, self.qformer_num_layers
        return list(items[:nv]), list(items[nv:nv + nq]), list(items[nv + nq:])

    def _cross_map(self, crosses: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, n_q, G]``: the Q-Former's cross-attention probabilities, mean over heads and
        cross-attention layers, over the patch tokens (CLS column dropped)."""
        return torch.stack([a.detach().float().mean(1) for a in crosses]).mean(0)[..., self.num_prefix_tokens:]

    def patch_relevance(self, method: str, rows_rel: torch.Tensor, image_positions: torch.Tensor,
                        attentions: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                        vision_rows: torch.Tensor) -> torch.Tensor:
        """``[T, G]`` patch relevance of each target from its rows ``[T, N]`` over the joint sequence
        (see the module docstring for the three methods)."""
        from workers.probes.chefer import query_context_relevance, self_relevance, weighted_attention

        q_rel = rows_rel[:, image_positions].float().clamp(min=0)  # [T, n_q]: relevance of the query tokens
        vis_a, self_a, cross_a = self._split(attentions)
        if method == "raw":
            # Baseline, no gradients: how much the decoder attends to each query token, times how much
            # each query attends to each patch in the Q-Former (cross-attention, mean over heads/layers).
            return q_rel @ self._cross_map(cross_a)[0]
        vis_g, self_g, cross_g = self._split(grads)
        t = q_rel.shape[0]
        self_cams = [weighted_attention(a, g) for a, g in zip(self_a, self_g, strict=True)]
        cross_cams = iter(weighted_attention(a, g) for a, g in zip(cross_a, cross_g, strict=True))
        steps: list[tuple[str, torch.Tensor]] = []
        for i in range(self.qformer_num_layers):  # execution order: self-attention, then cross-attention
            steps.append(("self", self_cams[i]))
            if i in self.cross_layers:
                steps.append(("cross", next(cross_cams)))
        tv = cross_a[0].shape[-1]
        context = None
        if method == "chefer_full":
            vision_cams = [weighted_attention(a, g) for a, g in zip(vis_a, vis_g, strict=True)]
            context = self_relevance(vision_cams, tv, t, q_rel.device)
        r_qi = query_context_relevance(steps, self.num_query_tokens, tv, context)  # [T, n_q, Tv]
        return torch.bmm(q_rel[:, None, :], r_qi)[:, 0, self.num_prefix_tokens:]

    def image_token_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_features_and_patches(pixel_values)[1]

    def image_features_and_patches(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One pass: the traced image path yields the LM-input features (the tests check they equal
        # get_image_features') and the Q-Former cross-attention the mapping is made of.
        with torch.no_grad():
            features, attentions, _ = self.vision_trace(pixel_values)
        return features, self._cross_map(self._split(attentions)[2])

    # --- components and geometry -----------------------------------------------------------

    def head_modules(self) -> dict[str, tuple[str, int, int]]:
        """``decoder``: the language model's ``out_proj``; ``vision``: the vision tower's
        ``projection``; ``qformer``: the output ``dense`` of each Q-Former cross-attention block (the
        queries reading the image); ``qformer-self``: that of each Q-Former self-attention block (the
        queries reading each other)."""
        return {
            "decoder": (r"language_model\.(?:model\.)?(?:decoder\.)?layers\.(\d+)\.self_attn\.out_proj$",
                        self.num_layers, self.num_heads),
            "vision": (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection$", self.vision_num_layers,
                       self.vision_num_heads),
            "qformer": (r"qformer\.encoder\.layer\.(\d+)\.crossattention\.output\.dense$", len(self.cross_layers),
                        self.qformer_num_heads),
            "qformer-self": (r"qformer\.encoder\.layer\.(\d+)\.attention\.output\.dense$", self.qformer_num_layers,
                             self.qformer_num_heads),
        }
