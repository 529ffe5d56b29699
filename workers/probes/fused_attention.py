"""Self-attention whose backward pass also yields Chefer's gradient-weighted attention.

Chefer's rule needs, for every layer, ``A_bar = mean_heads((dS/dA * A)+)`` ``[B, n, T]`` from the
attention probabilities ``A`` ``[B, H, n, T]`` and their gradient. Through plain autograd that
costs, per layer, a [B, H, n, T] gradient tensor handed back to the caller, another pass to
multiply it with ``A``, and the softmax backward's own pass over the same product; for a batch
these tensors are well past the CPU's caches, so every pass streams from memory and the batched
call spends more time moving probabilities than multiplying matrices. Here one
``autograd.Function`` does the attention and, in its backward pass, computes
``P = dS/dA * A`` once per block of images, derives both ``A_bar`` (clamp, head mean) and the
softmax backward (``P - A * rowsum(P)``) from it while the block is still in cache, and hands
``A_bar`` to a ``WeightedAttentionSink`` instead of returning the gradient.

Why by hand (nothing in torch fuses a softmax's backward with a side output): the batched chefer
call peaks at less memory, since one [B, n, T] matrix per layer stays alive instead of two
[B, H, n, T] tensors (speed and memory: ``benchmarks/README.md``). The result equals the autograd
path's to float rounding (tests).

Shapes: ``q`` ``[B, H, n, d]`` (``n`` query rows: all ``T`` tokens, or the readout row alone),
``k``/``v`` ``[B, H, T, d]``.
"""

from __future__ import annotations

from typing import Any

import torch

#: Bytes of one [block, H, n, T] float32 tensor the CPU path aims for: small enough that the
#: few tensors of a block stay in a core's L2 cache between the passes over them.
CPU_BLOCK_BYTES = 1 << 20
#: ``None``: fuse where ``pays_off`` says so; ``True``/``False``: always/never (benchmarks that
#: compare the two paths, e.g. ``benchmarks/gpu_grounding.py`` on a GPU).
FUSE: bool | None = None


def block_size(batch: int, heads: int, rows: int, tokens: int, device: torch.device | str) -> int:
    """Images per block: the whole batch on a GPU (one kernel per step keeps it busy), on a CPU as
    many as fit ``CPU_BLOCK_BYTES`` (at least one)."""
    if torch.device(device).type != "cpu":
        return batch
    return max(1, min(batch, CPU_BLOCK_BYTES // (heads * rows * tokens * 4)))


def pays_off(batch: int, heads: int, tokens: int, device: torch.device | str) -> bool:
    """Whether to fuse rather than go through autograd: where the benchmark shows it pays, on a CPU
    for a batch whose [B, H, T, T] attention spans more than one block. A batch that fits one block
    stays in cache through autograd too, and there the Python backward step costs more than it
    saves; on a GPU there is no benchmark yet (``FUSE`` overrides)."""
    if FUSE is not None:
        return FUSE
    return torch.device(device).type == "cpu" and block_size(batch, heads, tokens, tokens, device) < batch


class WeightedAttentionSink:
    """Collects ``A_bar`` of every fused attention call of one forward pass.

    ``attend`` is used in place of ``softmax(q k^T * scale) v``; after
    ``torch.autograd.grad(score.sum(), sink.anchor)`` (one backward pass for the batch),
    ``weighted()`` returns each call's ``A_bar`` ``[B, n, T]`` float32, in forward order. The
    anchor is a scalar every call depends on, so the backward pass reaches every layer even where
    nothing else below it needs a gradient (the first traced layer).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.anchor = torch.zeros((), device=device, requires_grad=True)
        self._weighted: dict[int, torch.Tensor] = {}
        self._calls = 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """``softmax(q k^T * scale) v`` ``[B, H, n, d]``; its backward records ``A_bar``."""
        self._calls += 1
        return _WeightedAttention.apply(q, k, v, self.anchor, scale, self, self._calls - 1)

    def _record(self, index: int, weighted: torch.Tensor) -> None:
        self._weighted[index] = weighted

    def weighted(self) -> list[torch.Tensor]:
        missing = [i for i in range(self._calls) if i not in self._weighted]
        if missing:
            raise RuntimeError(f"no backward pass reached fused attention call(s) {missing}")
        return [self._weighted[i] for i in range(self._calls)]


class _WeightedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, anchor: torch.Tensor, scale: float,
                sink: WeightedAttentionSink, index: int) -> torch.Tensor:
        b, h, n, d = q.shape
        t = k.shape[2]
        # q, k, v usually arrive as views of one stacked projection; slicing blocks of them would
        # copy in every matrix product, so copy each once ([B, H, T, d]: a few hundred KB)
        q, k, v = (x.contiguous() for x in (q, k, v))
        out = q.new_empty(b, h, n, d)
        probs = q.new_empty(b, h, n, t)
        step = block_size(b, h, n, t, q.device)
        for s in range(0, b, step):
            blk = slice(s, s + step)
            scores = torch.matmul(q[blk] * scale, k[blk].transpose(-1, -2))
            if probs.dtype == torch.float32:
                torch.softmax(scores, dim=-1, out=probs[blk])
            else:  # softmax in float32 as the models' eager attention does, then back to the inputs' dtype
                probs[blk] = torch.softmax(scores, dim=-1, dtype=torch.float32)
            torch.matmul(probs[blk], v[blk], out=out[blk])
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale, ctx.sink, ctx.index = scale, sink, index
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, probs = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        b, h, n, d = q.shape
        t = k.shape[2]
        grad_out = grad_out.to(v.dtype).contiguous()
        dq = torch.empty_like(q) if need_q else None
        dk = torch.empty_like(k) if need_k else None
        dv = torch.empty_like(v) if need_v else None
        weighted = torch.empty(b, n, t, device=q.device, dtype=torch.float32)
        step = block_size(b, h, n, t, q.device)
        for s in range(0, b, step):
            blk = slice(s, s + step)
            a = probs[blk]
            # P = dS/dA * A, once: Chefer's weighting and the softmax backward both start from it
            p = torch.matmul(grad_out[blk], v[blk].transpose(-1, -2)).float().mul_(a)
            torch.mean(p.clamp(min=0), dim=1, out=weighted[blk])
            if dv is not None:  # need_v
                torch.matmul(a.transpose(-1, -2), grad_out[blk], out=dv[blk])
            if need_q or need_k:
                # softmax backward: dS/dscores = A * (dS/dA - rowsum(A * dS/dA)) = P - A * rowsum(P)
                dscores = p.addcmul_(a, p.sum(-1, keepdim=True), value=-1).mul_(ctx.scale).to(q.dtype)
                if dq is not None:  # need_q
                    torch.matmul(dscores, k[blk], out=dq[blk])
                if dk is not None:  # need_k
                    torch.matmul(dscores.transpose(-1, -2), q[blk], out=dk[blk])
        ctx.sink._record(ctx.index, weighted)
        # the anchor only routes the backward pass here; its own gradient is a zero nobody reads
        return dq, dk, dv, torch.zeros((), device=q.device), None, None, None
