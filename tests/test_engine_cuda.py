"""The engine's CUDA paths against its CPU paths, and the CUDA-graph relaxation against eager
steps (skipped without a GPU; CI compiles the kernels but never runs them)."""

import pytest
import torch

import eqprop
from equilibrium_fields import TanhLayer
from test_block import _block
from testing import needs_cuda

pytestmark = [needs_cuda, pytest.mark.cuda]  # gpu_session.sh selects -m cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_damped_step_cuda_matches_cpu(dtype):
    z = torch.randn(24, 256, 64).to(dtype)
    fz = torch.randn(24, 256, 64).to(dtype)
    cpu = torch.ops.eqprop.relax_damped_step(z, fz, 0.7)
    gpu = torch.ops.eqprop.relax_damped_step(z.cuda(), fz.cuda(), 0.7)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu().double(), a.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("batch,n", [(1, 1 << 21), (3, 1_000_003)])
def test_damped_step_cuda_long_samples(batch, n):
    """Samples long enough that the kernel splits each over many blocks, capped by the device's
    multiprocessor count (4 per SM over the batch; 2^21 elements would otherwise be 1024 chunks),
    with a ragged last chunk (n prime). float32 against a float64 reference of the same numbers:
    each norm is a sum of ≤ ~40 terms per thread, a 256-way tree and ≤ ~600 atomic adds, so its
    relative error is ≤ ~700·2^-24 ≈ 4e-5; rtol 2e-4 leaves 5x."""
    g = torch.Generator().manual_seed(11)
    z, fz = torch.randn(batch, n, generator=g), torch.randn(batch, n, generator=g)
    z_new, res_sq, f_sq = torch.ops.eqprop.relax_damped_step(z.cuda(), fz.cuda(), 0.3)
    z64, f64 = z.double(), fz.double()
    torch.testing.assert_close(z_new.cpu().double(), z64 + 0.3 * (f64 - z64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res_sq.cpu().double(), (f64 - z64).square().sum(1), rtol=2e-4, atol=0)
    torch.testing.assert_close(f_sq.cpu().double(), f64.square().sum(1), rtol=2e-4, atol=0)


@pytest.mark.parametrize("attention", ["softmax", "energy"])
def test_block_cuda_agrees_with_cpu(attention):
    blk_cpu = _block(attention=attention, ffn="mlp", rope=True, bias=True, spectral_rho=0.8)
    blk = _block(attention=attention, ffn="mlp", rope=True, bias=True, spectral_rho=0.8, device="cuda")
    z, x = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(2, 6, 8, dtype=torch.float64)
    for grad in (False, True):  # SDPA and the explicit softmax
        with torch.set_grad_enabled(grad):
            got = blk(z.cuda(), x.cuda()).cpu()
        torch.testing.assert_close(got, blk_cpu(z, x), rtol=1e-10, atol=1e-10)
    f = blk.vector_field(x.cuda().to(torch.complex128))
    with torch.no_grad():
        torch.testing.assert_close(
            f.eval(z.cuda().to(torch.complex128)).cpu(),
            blk_cpu(z.to(torch.complex128), x.to(torch.complex128)),
            rtol=1e-10,
            atol=1e-10,
        )


def test_relax_module_field_cuda_matches_cpu():
    f = TanhLayer(16, dtype=torch.float64)
    x = torch.randn(5, 16, dtype=torch.float64)
    z_cpu, info_cpu = eqprop.relax(f, x, tol=1e-10, max_steps=300)
    z_gpu, info_gpu = eqprop.relax(TanhLayer(16, dtype=torch.float64).cuda(), x.cuda(), tol=1e-10, max_steps=300)
    torch.testing.assert_close(z_gpu.cpu(), z_cpu, rtol=1e-9, atol=1e-9)
    assert torch.equal(info_gpu.steps.cpu(), info_cpu.steps)
    assert not info_gpu.cuda_graph  # a Python module is never captured unasked


# --- the block's relaxation replayed as a CUDA graph ----------------------------------------------


def _pair(dtype, B=4, T=16, C=32, H=4, **kw):
    """The same block on the CPU (float64) and on the GPU (dtype), and x on both."""
    blk = _block(d_model=C, n_heads=H, perturb=0.1, spectral_rho=0.9, resinit=0.5, **kw)
    x = torch.randn(B, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    gpu = _block(d_model=C, n_heads=H, perturb=0.1, spectral_rho=0.9, resinit=0.5, **kw).to("cuda", dtype)
    return blk, x, gpu, x.to(device="cuda", dtype=dtype)


@pytest.mark.parametrize(
    "check_every,stop,trace", [(1, "rel", True), (4, "rel", True), (7, "abs", False), (40, "rel", True)]
)
@pytest.mark.parametrize("attention", ["softmax", "energy"])
def test_graph_replay_equals_eager_steps_float64(check_every, stop, trace, attention):
    """float64: the replayed graph runs the eager step's kernels, so z, steps, status and the trace
    agree with eager CUDA steps and with the CPU to rounding. The softmax block converges in about
    20 steps (samples stop inside replays); this energy block does not converge in 45 (every step
    replayed). max_steps = 45 leaves a tail shorter than a graph for check_every = 4 and 7, and
    check_every = 40 is captured as graphs of 32 steps."""
    blk, x, gblk, gx = _pair(torch.float64, attention=attention)
    kw = dict(tol=1e-11, max_steps=45, stop=stop, trace=trace, on_nonconvergence="ignore")  # energy: expected
    z_cpu, i_cpu = eqprop.relax(blk, x, **kw)
    z_eag, i_eag = eqprop.relax(gblk, gx, cuda_graph=False, **kw)
    z_gr, i_gr = eqprop.relax(gblk, gx, cuda_graph=True, check_every=check_every, **kw)
    assert i_gr.cuda_graph and not i_eag.cuda_graph
    for z, i in ((z_eag, i_eag), (z_gr, i_gr)):
        torch.testing.assert_close(z.cpu(), z_cpu, rtol=1e-10, atol=1e-10)
        assert torch.equal(i.steps.cpu(), i_cpu.steps) and torch.equal(i.status.cpu(), i_cpu.status)
        torch.testing.assert_close(i.trace_rel.cpu(), i_cpu.trace_rel, rtol=1e-6, atol=1e-12)
    last = int(i_gr.steps.max())
    assert last <= i_gr.n_evals < last + check_every and i_gr.trace_abs.shape[0] == (last if trace else 0)


@pytest.mark.parametrize("dtype,tol,err", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-2, 2e-2)])
def test_graph_replay_low_precision(dtype, tol, err):
    """float32 (SDPA's efficient kernel) and bfloat16 (flash; on the CPU its rel residual floors near 1.5e-3):
    graph = eager CUDA steps, and the fixed point is the float64 CPU one to the precision's
    rounding (relative error in norm ≤ err)."""
    blk, x, gblk, gx = _pair(dtype, T=64)
    z_cpu, _ = eqprop.relax(blk, x, tol=1e-10, max_steps=80)
    z_eag, i_eag = eqprop.relax(gblk, gx, cuda_graph=False, tol=tol, max_steps=80)
    z_gr, i_gr = eqprop.relax(gblk, gx, check_every=4, tol=tol, max_steps=80)  # auto: captured
    assert i_gr.cuda_graph and not i_eag.cuda_graph
    assert (i_gr.status == 0).all() and (i_eag.status == 0).all()
    rel = lambda a, b: float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())  # noqa: E731
    assert rel(z_gr, z_eag) <= err / 2
    assert rel(z_gr, z_cpu) <= err and rel(z_eag, z_cpu) <= err


def test_graph_replay_on_a_user_stream_and_in_fixed_point():
    """relax on a non-default stream returns results ordered on that stream; fixed_point's implicit
    gradient is the same with the graph on or off."""
    blk, x, gblk, gx = _pair(torch.float64)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        z_s, i_s = eqprop.relax(gblk, gx, tol=1e-11, max_steps=60)
        z_s = z_s.clone()
    s.synchronize()
    z_e, _ = eqprop.relax(gblk, gx, tol=1e-11, max_steps=60, cuda_graph=False)
    assert i_s.cuda_graph
    torch.testing.assert_close(z_s, z_e, rtol=1e-12, atol=1e-12)
    grads = []
    for mode in (True, False):
        gblk.zero_grad()
        z = eqprop.fixed_point(gblk, gx, tol=1e-11, max_steps=60, cuda_graph=mode)
        z.square().sum().backward()
        grads.append([p.grad.clone() for p in gblk.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_graph_memory_does_not_grow_across_calls():
    """Each call captures a graph; they share one memory pool per thread and device, so the
    allocator's reserve is flat after the first calls (a private pool per call would grow it)."""
    _, _, gblk, gx = _pair(torch.float32, B=8, T=64)
    for _ in range(3):
        eqprop.relax(gblk, gx, tol=0.0, max_steps=10)
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    for _ in range(30):
        assert eqprop.relax(gblk, gx, tol=0.0, max_steps=10)[1].cuda_graph
    torch.cuda.synchronize()
    assert torch.cuda.memory_reserved() == reserved


def test_graph_refusals_on_cuda():
    _, _, gblk, gx = _pair(torch.float32)
    with pytest.raises(ValueError, match="needs solver='picard'"):
        eqprop.relax(gblk, gx, solver="anderson", cuda_graph=True)
    assert not eqprop.relax(gblk, gx, solver="anderson")[1].cuda_graph  # auto: eager
    assert not eqprop.relax(gblk, gx, drive=lambda z: 0.01 * z)[1].cuda_graph
    assert not eqprop.relax(gblk, gx, cuda_graph=False)[1].cuda_graph
