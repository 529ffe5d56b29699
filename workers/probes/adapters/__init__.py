"""Model adapters: ``load_adapter(path_or_id)`` returns the right adapter for a checkpoint.

Safetensors only and never ``trust_remote_code``: a model directory is untrusted input.
"""

from workers.probes.adapters.base import DualEncoderAdapter, VisionLanguageAdapter, VisionTrace

__all__ = ["ARCHITECTURES", "DualEncoderAdapter", "VisionLanguageAdapter", "VisionTrace", "load_adapter"]

#: ``config.model_type`` -> ``"module:AdapterClass"`` (imported lazily). A new architecture is one line here
#: plus its adapter class.
ARCHITECTURES: dict[str, str] = {
    "clip": "workers.probes.adapters.clip_fast:FastCLIPAdapter",
    "siglip": "workers.probes.adapters.clip:SiglipAdapter",
    "siglip2": "workers.probes.adapters.siglip2:Siglip2Adapter",
    "llava": "workers.probes.adapters.llava:LlavaAdapter",
    "blip-2": "workers.probes.adapters.blip2:Blip2Adapter",
    "llava_next": "workers.probes.adapters.llava_next:LlavaNextAdapter",
    "llava_onevision": "workers.probes.adapters.llava_next:LlavaOnevisionAdapter",
    "idefics3": "workers.probes.adapters.idefics3:Idefics3Adapter",
    "smolvlm": "workers.probes.adapters.idefics3:SmolVLMAdapter",
    "gemma3": "workers.probes.adapters.gemma3:Gemma3Adapter",
    "qwen2_5_vl": "workers.probes.adapters.qwen_vl:QwenVLAdapter",
    "qwen3_vl": "workers.probes.adapters.qwen_vl:Qwen3VLAdapter",
    "paligemma": "workers.probes.adapters.paligemma:PaliGemmaAdapter",
    "internvl": "workers.probes.adapters.internvl:InternVLAdapter",
    "mistral3": "workers.probes.adapters.mistral3:Mistral3Adapter",
    "mllama": "workers.probes.adapters.mllama:MllamaAdapter",
}


def load_adapter(path_or_id: str, *, revision: str | None = None, device: str = "cpu",
                 dtype: str | None = None) -> VisionLanguageAdapter:
    """Load a local Hugging Face-format directory (or a hub id with a pinned revision).

    Raises ``UnsupportedModelError`` naming what is missing when the model cannot be explained.
    """
    from workers.probes.adapters.loading import load  # implemented in loading.py

    return load(path_or_id, revision=revision, device=device, dtype=dtype)
