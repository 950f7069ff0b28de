"""Sliding-window attention on CUDA: FlexAttention's block-sparse path and the chunked path against the
dense masked reference (skipped without a GPU)."""

import pytest
import torch

from eqprop.models import alibi_slopes
from eqprop.models import attention as swa_mod
from eqprop.models.attention import flex_available, sliding_window_attention
from testing import needs_cuda, tol

pytestmark = [needs_cuda, pytest.mark.cuda]  # gpu_session.sh selects -m cuda


def _qkv(T, d=64, dtype=torch.float32, B=2, H=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, generator=g).to("cuda", dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("T,W", [(256, 64), (1000, 64), (300, 1), (200, 512)])
@pytest.mark.parametrize("alibi", [False, True])
def test_chunked_and_flex_match_dense_float64_oracle(T, W, alibi):
    q, k, v = _qkv(T)
    slopes = alibi_slopes(4).cuda() if alibi else None
    with torch.no_grad():
        ref = sliding_window_attention(
            q.double(),
            k.double(),
            v.double(),
            W,
            impl="dense",
            alibi_slopes=None if slopes is None else slopes.double(),
        )
    # float32 (TF32 off by default for matmul): a d = 64 dot product, a softmax over ≤ W + 1 terms and
    # a weighted sum of ≤ W values; flex's online softmax adds a rescale per block
    bound = tol(torch.float32, n=64 + 2 * min(W, T), scale=v.abs().max(), factor=8.0)
    impls = ["chunked"] + (["flex"] if flex_available("cuda") else [])
    for impl in impls:
        out = sliding_window_attention(q, k, v, W, impl=impl, alibi_slopes=slopes)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=bound, msg=impl)


@pytest.mark.skipif(not flex_available("cuda"), reason="torch without flex_attention")
def test_flex_gradients_match_chunked_and_mask_is_cached():
    T, W = 512, 64
    q, k, v = _qkv(T, seed=1)
    probe = torch.randn(2, 4, T, 64, device="cuda")
    grads = {}
    for impl in ("chunked", "flex"):
        out = sliding_window_attention(q, k, v, W, impl=impl)
        grads[impl] = torch.autograd.grad((out * probe).sum(), (q, k, v))
    for a, b in zip(grads["flex"], grads["chunked"]):
        torch.testing.assert_close(a, b, rtol=0, atol=tol(torch.float32, n=64 + 2 * W, scale=b.abs().max(), factor=8.0))
    swa_mod._block_mask.cache_clear()
    for _ in range(3):
        sliding_window_attention(q, k, v, W, impl="flex")
    info = swa_mod._block_mask.cache_info()
    assert info.misses == 1 and info.hits == 2  # one BlockMask per (T, W, device)


@pytest.mark.skipif(not flex_available("cuda"), reason="torch without flex_attention")
def test_auto_uses_flex_for_bf16():
    q, k, v = _qkv(384, dtype=torch.bfloat16)
    with torch.no_grad():
        auto = sliding_window_attention(q, k, v, 128)
        flex = sliding_window_attention(q, k, v, 128, impl="flex")
        ref = sliding_window_attention(q.double(), k.double(), v.double(), 128, impl="dense")
    assert torch.equal(auto, flex)
    # the oracle sees the same bf16-rounded inputs; the kernel accumulates in float32 and rounds the
    # probabilities and the output to bf16: ≈ 2 bf16 roundings of a convex combination of v
    bound = tol(torch.bfloat16, n=2, scale=v.abs().max())
    torch.testing.assert_close(auto.double(), ref, rtol=0, atol=bound)
