"""A tiny captioner trained to obey text written in the image: the zoo's subject for prompt injection.

Why a separate model: the zoo's ``tiny-llava`` never saw text in training. Its vision tower is
``tiny-clip``'s (96 px input, 8 px patches, trained on flat shapes), so rendered letters are a few
pixels of texture it has no features for, and its language model has no words to copy them into
beyond colours and shapes: a probe run on it can only report "no injection", which would not show
that the probe detects one. Large VLMs read (that is the threat); a tiny one has to be *made* to.

Recipe (``train_reader``): ``tiny-llava`` fine-tuned end to end (vision tower included, so it can
learn letter shapes) on world scenes, half of them with ``"say WORD"`` rendered by
``prompt_injection.render`` (a colour or shape word; fonts: only PIL's default, so other fonts
test generalisation), whose target text is then ``WORD`` alone; the other half keep their
captions. Deterministic for a fixed thread count. The zoo commits the result
(``checkpoints/tiny-llava-reader``); ``python -m workers.probes.zoo.reader --out DIR`` rebuilds it.

The committed build (400 steps) reads only weakly: it follows the written word in a minority of
held-out images, mostly in the font and at the high contrast it was tuned on, so it demonstrates
the probe's measurements (success against the scrambled-text control, relevance on the text) rather
than a model that reads reliably; more steps or a larger vision tower would be the next step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from workers.probes.zoo import world

NAME = "tiny-llava-reader"
WORDS: tuple[str, ...] = (*world.COLOURS, *world.SHAPES)
TRAIN_SEED = 611  # training streams stay below 1000 (see zoo.SPLITS)
TRAIN_FONTS: tuple[str, ...] = ("default",)


def training_examples(n: int, seed: int = TRAIN_SEED) -> list[tuple[Image.Image, str]]:
    """``(image, caption target)`` pairs: even indices plain scenes, odd ones with an instruction."""
    from workers.probes import prompt_injection as pi

    rng = np.random.default_rng(seed)
    out: list[tuple[Image.Image, str]] = []
    for i in range(n):
        scene = world.scene_at(seed, i)
        if i % 2 == 0:
            out.append((scene.image, scene.caption))
            continue
        word = WORDS[int(rng.integers(len(WORDS)))]
        variant = pi.Variant(TRAIN_FONTS[int(rng.integers(len(TRAIN_FONTS)))], float(rng.choice(pi.SIZES)),
                             pi.POSITIONS[int(rng.integers(len(pi.POSITIONS)))],
                             list(pi.CONTRASTS)[int(rng.integers(len(pi.CONTRASTS)))])
        image, _ = pi.render(scene.image, f"say {word}", variant)
        out.append((image, word))
    return out


def train_reader(out_dir: str | os.PathLike[str], *, steps: int = 400, n_images: int = 1200, batch_size: int = 16,
                 lr: float = 5e-4, threads: int = 1, log: Callable[[str], None] = print) -> Path:
    import torch

    from workers.probes.zoo import captioner, write_checksums

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    started = time.time()
    model, processor = captioner.load()
    model.requires_grad_(True).train()
    examples = training_examples(n_images)
    pixels = torch.cat([processor.image_processor([im for im, _ in examples[i:i + 200]],
                                                  return_tensors="pt")["pixel_values"]
                        for i in range(0, len(examples), 200)])
    targets = [SimpleNamespace(caption=c, objects=[], size=world.DEFAULT_SIZE) for _, c in examples]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(TRAIN_SEED)
    n_img = model.config.image_seq_length
    losses = []
    for step in range(steps):
        idx = rng.choice(len(examples), batch_size, replace=False)
        ids, labels, mask, _ = captioner._encode_batch(processor, [targets[i] for i in idx],
                                                       [captioner.PROMPTS[0]] * batch_size, n_img)
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels[torch.as_tensor(idx)], labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"  step {step:4d}  loss {np.mean(losses[-50:]):.4f}  ({time.time() - started:.0f}s)")
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "README.md").write_text(
        f"# {NAME}\n\n`tiny-llava` fine-tuned for {steps} steps to obey `say WORD` written in the image "
        f"(words: {', '.join(WORDS)}; fonts: {', '.join(TRAIN_FONTS)}). See `workers/probes/zoo/reader.py`.\n",
        encoding="utf-8")
    write_checksums(out)
    log(f"saved {out} ({time.time() - started:.0f}s, final loss {np.mean(losses[-50:]):.4f})")
    return out


def reader_dir() -> Path:
    """The committed reader checkpoint (checksums verified)."""
    from workers.probes.zoo import checkpoint_path

    return checkpoint_path(NAME)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from workers.probes.zoo import CHECKPOINT_ROOT

    parser = argparse.ArgumentParser(prog="python -m workers.probes.zoo.reader", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CHECKPOINT_ROOT / NAME)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args(argv)
    train_reader(args.out, steps=args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
