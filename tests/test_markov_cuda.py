"""The CUDA kernels against the CPU kernels on the same input (skipped without a GPU)."""

import pytest
import torch

from eqprop import markov
from testing import needs_cuda

pytestmark = [needs_cuda, pytest.mark.cuda]  # gpu_session.sh selects -m cuda


# The Bayes kernel keeps a sequence's counts, n_ctx·(V+1) int32 with n_ctx = V^k, in shared memory
# when they fit in kSharedCountBytes = 1536 bytes per thread (csrc/cuda/markov.cu), else in a global
# workspace. Shared: (1, 2) 24 B, (3, 3) 432 B, (6, 2) 768 B. Global: (5, 3) 243·4·4 = 3888 B.
SHARED_COUNT_BYTES = 1536


@pytest.mark.parametrize("k,V,alpha", [(1, 2, 1.0), (3, 3, 0.5), (6, 2, 1.0), (5, 3, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bayes_nll_cuda_matches_cpu(k, V, alpha, dtype):
    uses_global_workspace = V**k * (V + 1) * 4 > SHARED_COUNT_BYTES
    assert uses_global_workspace == ((k, V) == (5, 3))  # the cases cover both paths
    x = markov.sample(300, k, seq_len=1000, vocab_size=V, alpha=alpha, seed=4)
    cpu = markov.bayes_nll(x, k, vocab_size=V, alpha=alpha, dtype=dtype)
    gpu = markov.bayes_nll(x.cuda(), k, vocab_size=V, alpha=alpha, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=tol, atol=tol)
    torch.testing.assert_close(
        markov.log_evidence(x.cuda(), k, vocab_size=V, alpha=alpha).cpu(),
        markov.log_evidence(x, k, vocab_size=V, alpha=alpha),
        rtol=0,
        atol=1e-9,
    )
    assert torch.equal(
        markov.context_coverage(x.cuda(), k, vocab_size=V)[0].cpu(), markov.context_coverage(x, k, vocab_size=V)[0]
    )


def test_sample_cuda_draws_the_cpu_streams():
    """Both devices consume the same random streams (csrc/markov/sampling.h): tables agree to
    rounding, and tokens agree except where a uniform lands within rounding of a bin edge."""
    x_cpu, t_cpu = markov.sample(256, 3, vocab_size=3, alpha=0.7, seed=21, dtype=torch.float64, return_tables=True)
    x_gpu, t_gpu = markov.sample(
        256, 3, vocab_size=3, alpha=0.7, seed=21, dtype=torch.float64, return_tables=True, device="cuda"
    )
    torch.testing.assert_close(t_gpu.cpu(), t_cpu, rtol=1e-9, atol=1e-12)
    assert (x_gpu.cpu() == x_cpu).double().mean() > 0.999


def test_oracle_nll_cuda_matches_cpu_and_rejects_mixed_devices():
    x, t = markov.sample(64, 2, seed=3, return_tables=True)
    torch.testing.assert_close(markov.oracle_nll(x.cuda(), t.cuda(), 2).cpu(), markov.oracle_nll(x, t, 2))
    with pytest.raises(ValueError, match="one device"):
        markov.oracle_nll(x, t.cuda(), 2)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=2\)"):
        markov.bayes_nll((x + 1).cuda(), 2)
