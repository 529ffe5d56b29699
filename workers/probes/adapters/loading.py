"""Load a Hugging Face checkpoint behind the right adapter, refusing what we cannot trust or explain.

A model directory is untrusted input from a model provider, so:

- weights are loaded from safetensors only (``use_safetensors=True``); a directory with only
  pickled weights (``pytorch_model.bin``, ``*.pt``, ``*.pkl``, ``*.ckpt``) is refused with a message
  that says so, because unpickling runs arbitrary code;
- ``trust_remote_code`` is never set: a config that needs custom code is refused;
- weights must cover the whole architecture: transformers would silently fill missing weights
  with random ones, and explaining a half-random model would be worse than refusing.

Everything goes through the Auto classes (``AutoConfig``, ``AutoModel``, ``AutoTokenizer``,
``AutoImageProcessor``); the adapter class is chosen from ``ARCHITECTURES`` by ``model_type``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workers.probes.errors import ProbeInputError, UnsupportedModelError

if TYPE_CHECKING:
    from workers.probes.adapters.base import VisionLanguageAdapter

logger = logging.getLogger(__name__)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: models come from local directories

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

DTYPES: dict[str, torch.dtype | None] = {
    "float32": None, "fp32": None, "auto": None,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        resolved = None if dtype == torch.float32 else dtype
    else:
        try:
            resolved = DTYPES[str(dtype).lower()]
        except KeyError:
            raise ProbeInputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None
    if resolved is torch.float16 and device.type != "cuda":
        raise ProbeInputError("float16 autocast needs a CUDA device; use bfloat16 or float32 on CPU")
    return resolved


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ProbeInputError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProbeInputError("device cuda requested but no CUDA GPU is available")
    if dev.type not in {"cpu", "cuda"}:
        raise ProbeInputError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def check_weights(directory: Path) -> None:
    """Refuse a directory without safetensors weights, naming pickled files when that's all there is."""
    safetensors = list(directory.glob("*.safetensors")) + list(directory.glob("*.safetensors.index.json"))
    if safetensors:
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise ProbeInputError(
            f"{directory} has only pickled weights ({', '.join(pickled)}); Loupe loads safetensors only, "
            "because unpickling a file can run arbitrary code. Ask the provider for model.safetensors "
            "(e.g. model.save_pretrained(dir, safe_serialization=True)).")
    raise ProbeInputError(f"{directory} has no model weights (*.safetensors)")


def _locate(path_or_id: str, revision: str | None) -> tuple[str, str | None]:
    """A local directory, or a hub id pinned to a commit (resolved from the local cache only)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ProbeInputError(f"{path} has no config.json: not a Hugging Face model directory")
        check_weights(path)
        return str(path), revision
    if path.exists():
        raise ProbeInputError(f"{path} is a file; pass the model directory (with config.json and *.safetensors)")
    if not _HUB_ID.match(path_or_id):
        raise ProbeInputError(f"model directory {path_or_id} not found")
    if revision is None or not _COMMIT.match(revision):
        # An audit must name exactly which weights it examined; branches and tags move.
        raise ProbeInputError(f"hub id {path_or_id!r} needs a pinned revision (a 40-character commit hash), "
                              f"got {revision!r}")
    return path_or_id, revision


def _architecture(config: Any) -> type:
    from workers.probes.adapters import ARCHITECTURES

    model_type = getattr(config, "model_type", None)
    target = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if target is not None:
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)
    has_vision = getattr(config, "vision_config", None) is not None
    has_text = getattr(config, "text_config", None) is not None
    missing = [what for what, present in (("a vision tower (vision_config)", has_vision),
                                         ("a text tower (text_config)", has_text)) if not present]
    if missing:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not a vision-language model: it lacks {' and '.join(missing)}. "
            f"Loupe explains: {', '.join(sorted(ARCHITECTURES))}")
    raise UnsupportedModelError(
        f"model type {model_type!r} has vision and text towers but no Loupe adapter; supported: "
        f"{', '.join(sorted(ARCHITECTURES))}")


def load(path_or_id: str, *, revision: str | None = None, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None) -> VisionLanguageAdapter:
    """See ``workers.probes.adapters.load_adapter``."""
    from transformers import AutoConfig

    dev = _resolve_device(device)
    autocast_dtype = resolve_dtype(dtype, dev)
    where, revision = _locate(str(path_or_id), revision)
    # local_files_only: a hub id resolves from the local cache only, whatever the environment says
    common = {"revision": revision, "trust_remote_code": False, "local_files_only": True}

    try:
        # Quiet here too: transformers 5 builds a default SigLIP text config while merely logging the
        # loaded one, and that default's own token ids (49406/49407, CLIP leftovers) fail its vocabulary
        # check, so every SigLIP load warned "may result in unexpected behavior" about a config the
        # provider never wrote (huggingface/transformers#47612). Real problems still raise below.
        with quiet_transformers():
            config = AutoConfig.from_pretrained(where, **common)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) or "custom code" in str(exc):
            raise UnsupportedModelError(f"{where} needs custom code (trust_remote_code), which Loupe never runs") \
                from None
        raise ProbeInputError(f"cannot read the config of {where}: {exc}") from None
    except (OSError, KeyError) as exc:
        raise ProbeInputError(f"cannot read the config of {where}: {exc}") from None
    adapter_cls = _architecture(config)
    if hasattr(adapter_cls, "from_pretrained"):  # fusion adapters load their own head-ful model class (llava.py)
        adapter = adapter_cls.from_pretrained(where, device=dev, dtype=autocast_dtype)
    else:
        with quiet_transformers():
            adapter = _load_quietly(where, revision, common, adapter_cls, config, dev, autocast_dtype,
                                    str(path_or_id))
    adapter.ignored_weights = ignored_pickles(Path(where)) if Path(where).is_dir() else ()
    if adapter.ignored_weights:
        logger.warning("%s: pickled weights ignored (%s); the safetensors weights were loaded", where,
                       ", ".join(adapter.ignored_weights))
    return adapter


def ignored_pickles(directory: Path) -> tuple[str, ...]:
    """Pickled weight files beside a directory's safetensors weights (a Hugging Face snapshot often holds
    both ``pytorch_model.bin`` and ``model.safetensors``): never opened, reported as ignored."""
    return tuple(sorted(p.name for p in directory.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES)))


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars while loading, restoring them afterwards.

    Incomplete weights are reported by the loaders themselves, as an error; the "torchvision
    missing, using the PIL image processor" notice is expected on CPU hosts; "Loading weights"
    bars would clutter CLI output and worker logs.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_quietly(where: str, revision: str | None, common: dict[str, Any], adapter_cls: type, config: Any,
                  dev: torch.device, autocast_dtype: torch.dtype | None, source: str) -> VisionLanguageAdapter:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    try:
        model, info = AutoModel.from_pretrained(where, use_safetensors=True, attn_implementation="eager",
                                                dtype=torch.float32, output_loading_info=True, **common)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ProbeInputError(f"cannot load the weights of {where}: {exc}") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        names = [str(k) for k in (missing + list(mismatched))]
        raise ProbeInputError(f"{where}: the weights don't match the config ({len(names)} tensors missing or "
                              f"mis-shaped, e.g. {', '.join(names[:3])}); refusing to explain a partly random model")

    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **common)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UnsupportedModelError(f"{where} has no usable tokenizer (tokenizer.json or vocabulary files), "
                                    f"so prompts cannot be encoded: {exc}") from None
    # transformers 5 builds an *empty* tokenizer from the model type when the files are absent,
    # which would silently map every prompt to unknown tokens: check the vocabulary ourselves.
    vocab_size = int(getattr(config.text_config, "vocab_size", 0) or 0)
    if tokenizer is None or isinstance(tokenizer, bool) or len(tokenizer) < 8:
        raise UnsupportedModelError(f"{where} has no usable tokenizer (tokenizer.json or vocabulary files), "
                                    "so prompts cannot be encoded")
    if vocab_size and len(tokenizer) > vocab_size:
        raise UnsupportedModelError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the text tower "
                                    f"embeds only {vocab_size}; they don't belong together")
    if Path(where).is_dir() and not (Path(where) / "preprocessor_config.json").is_file():
        raise UnsupportedModelError(f"{where} has no image processor (preprocessor_config.json), so images "
                                    "cannot be prepared the way the model expects")
    try:
        image_processor = AutoImageProcessor.from_pretrained(where, **common)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UnsupportedModelError(f"{where} has no image processor (preprocessor_config.json), so images "
                                    f"cannot be prepared the way the model expects: {exc}") from None

    return adapter_cls(model.to(dev), tokenizer, image_processor, device=dev, autocast_dtype=autocast_dtype,
                       source=source, revision=revision)


def load_generative(path: str | os.PathLike[str], model_class: str, model_types: Sequence[str],
                    family: str, *, processor_loader: Callable[[Path], Any] | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` from a local directory through transformers' ``model_class`` (a name in
    ``transformers``) and ``AutoProcessor`` (or ``processor_loader(directory)``, e.g. an image-only
    processor: ``regions.image_only_processor``): safetensors only, never ``trust_remote_code``, eager
    attention, float32. Refuses pickled weights, other model types and partly random models."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoConfig, AutoProcessor

    directory = Path(path)
    if not directory.is_dir():
        raise ProbeInputError(f"model directory {str(directory)!r} does not exist")
    if not any(directory.glob("*.safetensors")):
        raise ProbeInputError(f"{directory}: no *.safetensors weights (pickled weights are refused: "
                              "unpickling can run arbitrary code)")
    try:
        with quiet_transformers():  # see loading.load: no false alarms about default sub-configs
            config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ProbeInputError(f"{directory}: unreadable config.json ({exc})") from None
    if config.model_type not in model_types:
        raise UnsupportedModelError(
            f"{directory}: model_type {config.model_type!r} is not a supported generative VLM "
            f"(supported: {', '.join(model_types)})")
    try:
        with quiet_transformers():
            model, info = getattr(transformers, model_class).from_pretrained(
                directory, use_safetensors=True, trust_remote_code=False, attn_implementation="eager",
                dtype=torch.float32, output_loading_info=True)
            processor = (processor_loader(directory) if processor_loader is not None
                         else AutoProcessor.from_pretrained(directory, trust_remote_code=False))
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ProbeInputError(f"{directory}: cannot load the {family} checkpoint ({exc})") from None
    # transformers fills missing weights with random ones; explaining that would be worse than refusing.
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing or info.get("mismatched_keys"):
        raise ProbeInputError(f"{directory}: the weights don't match the config ({len(missing)} tensors missing, "
                              f"e.g. {', '.join(map(str, missing[:3]))}); refusing a partly random model")
    return model, processor
