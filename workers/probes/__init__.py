"""Loupe's probe library: interpretability and audit probes for vision-language models.

Plain PyTorch/transformers. It never imports Django or Celery: functions take a model
adapter and data, and return tensors, numbers and matplotlib figures.

Layout (one module per method family):
- ``adapters/``: load Hugging Face VLMs (safetensors only) behind one interface.
- ``registry``: grounding methods by name (``chefer``, ``gradcam``, ``rollout``, ``flow``, ``occlusion``).
- ``zoo/``: the synthetic world and the reference models Loupe trains itself.
- ``cli``: ``python -m workers.probes <command>``.
"""
