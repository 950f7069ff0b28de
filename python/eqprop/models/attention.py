"""Sliding-window causal attention in O(T·W) memory (docs/design.md §9).

Convention: with window ``W``, query ``t`` sees the ``W`` most recent keys, itself included::

    key s is visible to query t   iff   t − W < s ≤ t

so ``W = 1`` attends to the current token only and ``W ≥ T`` is ordinary causal attention.

Three implementations of the same function:

- ``"dense"``: the masked ``[T, T]`` reference (O(T²) memory; tests and short sequences).
- ``"chunked"``: queries in chunks of ``c = min(W, T)`` positions, each chunk against the keys
  ``[chunk start − W, chunk end)`` (``c + W`` keys, overlapping strided windows of the keys). The
  first chunk is the dense path on its c tokens; the others are one ``scaled_dot_product_attention``
  call with chunks on the batch axis and one shared ``[c, c + W]`` mask (the query at offset a sees
  window keys a < j ≤ a + W), so PyTorch's fused kernels run where they take a mask. The largest
  intermediate is at most the scores ``[B, H, ⌈T/c⌉, c, c + W]``: ≤ ``2·B·H·(T + c)·W`` entries,
  linear in T. Runs on any device.
- ``"flex"``: ``torch.nn.attention.flex_attention`` with a block-sparse sliding-window ``BlockMask``
  (CUDA only; the mask is built once per ``(T, W, device)`` and cached).

``"auto"`` picks flex on CUDA when it is available and the dtype / head size suit it, else chunked.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["IMPLS", "sliding_window_attention", "sliding_window_mask", "flex_available"]

IMPLS = ("auto", "dense", "chunked", "flex")


def sliding_window_mask(T: int, window: int, *, device=None) -> torch.Tensor:
    """Boolean ``[T, T]`` mask, True where key ``s`` is visible to query ``t``: ``t − window < s ≤ t``.

    Example: ``sliding_window_mask(3, 2)  # [[1, 0, 0], [1, 1, 0], [0, 1, 1]]``
    """
    t = torch.arange(T, device=device)
    diff = t[:, None] - t[None, :]  # query minus key
    return (diff >= 0) & (diff < window)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window) -> None:
    if not all(isinstance(a, torch.Tensor) for a in (q, k, v)):
        raise TypeError(f"q, k, v must be tensors, got {type(q).__name__}, {type(k).__name__}, {type(v).__name__}")
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k must be [B, H, T, d] of one shape and v [B, H, T, d_v]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


def _dense(q, k, v, window, scale, slopes):
    T = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, T, T]
    if slopes is not None:  # ALiBi: −slope_h·(t − s)
        t = torch.arange(T, device=q.device)
        scores = scores - slopes.to(scores.dtype)[:, None, None] * (t[:, None] - t[None, :]).to(scores.dtype)
    scores = scores.masked_fill(~sliding_window_mask(T, window, device=q.device), float("-inf"))
    return torch.matmul(scores.softmax(-1), v)


def _chunked(q, k, v, window, scale, slopes):
    B, H, T, d = q.shape
    W = min(window, T)  # t − s < T always, so a longer window changes nothing
    c = W  # query chunk length
    n = -(-T // c)  # number of chunks
    # chunk 0 (positions [0, c)) sees only keys [0, c): the dense path on c tokens
    out0 = _dense(q[:, :, :c], k[:, :, :c], v[:, :, :c], W, scale, slopes)
    if n == 1:
        return out0
    Tp = n * c
    pad = torch.nn.functional.pad
    kp, vp = pad(k, (0, 0, 0, Tp - T)), pad(v, (0, 0, 0, Tp - T))  # [B, H, Tp, d]
    # chunk i ≥ 1 (queries [i·c, (i+1)·c)) against keys [i·c − W, (i+1)·c): window i − 1 of length c + W
    # and step c (c = W), a strided view; batch and chunk go together on the first axis
    kw = kp.unfold(2, c + W, c).permute(0, 2, 1, 4, 3).reshape(B * (n - 1), H, c + W, d)
    vw = vp.unfold(2, c + W, c).permute(0, 2, 1, 4, 3).reshape(B * (n - 1), H, c + W, v.shape[-1])
    qc = pad(q, (0, 0, 0, Tp - T))[:, :, c:].unflatten(2, (n - 1, c)).transpose(1, 2).reshape(B * (n - 1), H, c, d)
    # query a (position i·c + a) and key j (position i·c − W + j): visible iff a < j ≤ a + W, the same
    # in every chunk, so one [c, c + W] mask serves all; every query sees itself (j = a + W)
    a = torch.arange(c, device=q.device)[:, None]
    j = torch.arange(c + W, device=q.device)[None, :]
    mask = (j > a) & (j <= a + W)  # [c, c + W]
    if slopes is not None:  # ALiBi: −slope_h·(t − s), t − s = a + W − j
        bias = -slopes.to(q.dtype)[:, None, None] * (a + W - j).to(q.dtype)  # [H, c, c + W]
        mask = bias.masked_fill(~mask, float("-inf"))
    # per chunk: scores [c, c + W] at most (the fused kernels do not even materialize those)
    out = torch.nn.functional.scaled_dot_product_attention(qc, kw, vw, attn_mask=mask, scale=scale)
    out = out.unflatten(0, (B, n - 1)).transpose(1, 2).flatten(2, 3)  # [B, H, (n − 1)·c, d_v]
    return torch.cat([out0, out], 2)[:, :, :T]


# ---- FlexAttention (CUDA) -------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _flex():
    """(flex_attention compiled, create_block_mask) or None when this torch lacks them."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def flex_available(device) -> bool:
    """Whether the FlexAttention path can run on ``device`` (CUDA and a torch that has it).

    Example: ``flex_available(torch.device("cpu"))  # False``
    """
    return torch.device(device).type == "cuda" and _flex() is not None


@functools.lru_cache(maxsize=32)
def _block_mask(T: int, window: int, device: str):
    """The sliding-window BlockMask for length T: built once per (T, window, device), reused by every call."""
    _, create_block_mask = _flex()

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


@functools.lru_cache(maxsize=32)
def _alibi_score_mod(slopes: tuple, device: str):
    """ALiBi as a flex score_mod, one function object per slope set, so the compiled kernel is reused."""
    table = torch.tensor(slopes, dtype=torch.float32, device=device)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - table[h] * (q_idx - kv_idx)

    return score_mod


def _flex_ok(q) -> bool:
    d = q.shape[-1]
    return (
        flex_available(q.device)
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and d >= 16
        and d & (d - 1) == 0  # flex's kernels want a power-of-two head size
    )


def _flex_attention(q, k, v, window, scale, slopes):
    flex_attention, _ = _flex()
    T = q.shape[-2]
    block_mask = _block_mask(T, window, str(q.device))
    score_mod = None
    if slopes is not None:
        score_mod = _alibi_score_mod(tuple(slopes.tolist()), str(q.device))
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Causal softmax attention restricted to the ``window`` most recent keys, the query's own included.

    ``out[t] = Σ_s softmax_s(scale·q_t·k_s − slope·(t − s)) v_s`` over ``t − window < s ≤ t``.

    Args:
        q, k: ``[B, H, T, d]``; v: ``[B, H, T, d_v]``.
        window: W ≥ 1 (``W ≥ T`` is plain causal attention).
        scale: score scale, default ``1/√d`` (as ``scaled_dot_product_attention``).
        alibi_slopes: optional ``[H]`` ALiBi slopes (bias ``−slope_h·(t − s)``).
        impl: ``"auto"`` (flex on CUDA when available, else chunked), ``"chunked"`` (O(T·W) memory,
            any device), ``"flex"`` (CUDA FlexAttention, block-sparse) or ``"dense"`` (the O(T²)
            masked reference).

    Returns:
        ``[B, H, T, d_v]`` in the dtype of ``q``.

    Example: ``y = sliding_window_attention(q, k, v, 64)  # q, k, v: [B, H, T, d]``
    """
    _check(q, k, v, window)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if alibi_slopes is not None and alibi_slopes.shape != (q.shape[1],):
        raise ValueError(f"alibi_slopes must be [H] = [{q.shape[1]}], got {tuple(alibi_slopes.shape)}")
    if impl == "auto":
        impl = "flex" if _flex_ok(q) else "chunked"
    if impl == "flex":
        if not flex_available(q.device):
            raise ValueError(f"impl='flex' needs a CUDA tensor and torch.nn.attention.flex_attention; got {q.device}")
        return _flex_attention(q, k, v, window, scale, alibi_slopes)
    if impl == "dense":
        return _dense(q, k, v, window, scale, alibi_slopes)
    return _chunked(q, k, v, window, scale, alibi_slopes)
