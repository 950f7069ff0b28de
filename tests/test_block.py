"""The equilibrium transformer block (docs/design.md §4): the C++ F against the plain reference for every
option, gradients, holomorphy, the energy / monotone / spectral guarantees, bad input."""

import itertools
import math

import pytest
import torch

import eqprop
from eqprop import _C
from eqprop.reference import block as ref
from eqprop.testing import assert_converged
from testing import central_difference, check, condition_scale, fd_tol, oracle_dtype, third_difference, tol


def _block(dtype=torch.float64, perturb=0.3, seed=0, device="cpu", **kw):
    """A block with every parameter moved off its init (so no option is trivially inactive); made on
    the CPU and then moved, so every device gets the same parameters."""
    torch.manual_seed(seed)
    kw.setdefault("resinit", 1.0)
    blk = eqprop.EquilibriumBlock(kw.pop("d_model", 8), kw.pop("n_heads", 2), dtype=dtype, **kw)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(perturb * torch.randn_like(p))
    blk.update_spectral_norm(100)
    return blk.to(device).eval()


def _reference(blk, z, x):
    return ref.block(z, x, dict(blk.named_parameters()), **blk._reference_options())


#: The rounding stages of F, each rounding its intermediates once: LN1, the q/k/v projections, qk-norm,
#: the logits, the softmax / log-sum-exp, P·V, the output projection, LN2, the FFN's two layers.
STAGES = 10


def _oracle_args(blk, z, x):
    """The block's weights and z, x upcast exactly to float64 / complex128, and the oracle F on them."""
    hi = oracle_dtype(z.dtype)
    names = [n for n, _ in blk.named_parameters()]
    opts = blk._reference_options()
    opts["sn_u"] = {k: u.double() for k, u in opts["sn_u"].items()}

    def F(z, x, *params):
        return ref.block(z, x, dict(zip(names, params)), **opts)

    return F, [z.to(hi), x.to(hi), *[p.detach().double() for p in blk.parameters()]]


def _oracle(blk, z, x):
    """F in float64 / complex128 on the same (upcast) weights and inputs as blk(z, x)."""
    F, args = _oracle_args(blk, z, x)
    with torch.no_grad():
        return F(*args)


def _bound(blk, z, x, dtype=None):
    """Bound on |F_dtype(z, x) − F_oracle(z, x)|: STAGES roundings of ε(dtype), each amplified as F
    amplifies a relative perturbation of its inputs (testing.condition_scale)."""
    F, args = _oracle_args(blk, z, x)
    return tol(dtype or z.dtype, n=STAGES, scale=condition_scale(F, args))


OPTIONS = list(
    itertools.product(
        ["coupled", "sequential"],
        ["softmax", "energy"],
        ["mlp", "monotone"],
        [True, False],
        [True, False],
        [None, 0.5],
        [False, True],
    )
)
OPTION_IDS = [
    "-".join(
        [
            c,
            a,
            f,
            "qk" if q else "noqk",
            "bias" if b else "nobias",
            f"rho{r}" if r else "norho",
            "rope" if p else "norope",
        ]
    )
    for c, a, f, q, b, r, p in OPTIONS
]


def _kw(opt):
    coupling, attention, ffn, qk_norm, bias, rho, rope = opt
    return dict(
        coupling=coupling, attention=attention, ffn=ffn, qk_norm=qk_norm, bias=bias, spectral_rho=rho, rope=rope
    )


# ---- F equals the reference ---------------------------------------------------------------------


@pytest.mark.parametrize("opt", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.complex128, torch.complex64], ids=["f32", "f64", "c128", "c64"]
)
def test_matches_reference(opt, dtype):
    """The C++ F in dtype against the reference in float64 / complex128 on the same weights and inputs."""
    blk = _block(dtype.to_real() if dtype.is_complex else dtype, **_kw(opt))
    torch.manual_seed(1)
    z, x = torch.randn(2, 5, 8, dtype=dtype), torch.randn(2, 5, 8, dtype=dtype)
    expected, bound = _oracle(blk, z, x), _bound(blk, z, x)
    for grad in (True, False):  # with autograd recording (math attention) and without (SDPA for real)
        with torch.set_grad_enabled(grad):
            got = blk(z, x)
        assert got.dtype == dtype and got.shape == z.shape
        check(got.detach(), expected, bound, f"grad={grad}")
    field = blk.vector_field(x)
    with torch.no_grad():
        check(field.eval(z), expected, bound, "field")


def test_complex_block_on_real_input_is_the_real_block():
    blk = _block(coupling="sequential", attention="energy", ffn="mlp", bias=True, rope=True)
    z, x = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(2, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        Fc = blk(z.to(torch.complex128), x.to(torch.complex128))
        Fr = blk(z, x)
    bound = _bound(blk, z, x)  # each path within it of the exact F
    check(Fc.imag, 0.0, 2 * bound, "imag")
    check(Fc.real, Fr, 2 * bound, "real")


def test_sdpa_and_math_attention_agree():
    z, x = torch.randn(2, 7, 8, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        a = _block(rope=True, bias=True, attn_kernel="auto")(z, x)  # SDPA: real input, autograd off
        b = _block(rope=True, bias=True, attn_kernel="math")(z, x)
    check(a, b, 2 * _bound(_block(rope=True, bias=True), z, x))


def test_block_differs_between_options():
    # Guards the reference comparison against options that silently do nothing.
    z, x = torch.randn(1, 5, 8, dtype=torch.float64), torch.randn(1, 5, 8, dtype=torch.float64)
    base = dict(
        coupling="coupled", attention="softmax", ffn="mlp", qk_norm=True, bias=True, spectral_rho=None, rope=False
    )
    F0 = _block(**base)(z, x)
    for key, value in [("coupling", "sequential"), ("qk_norm", False), ("rope", True), ("spectral_rho", 0.3)]:
        F1 = _block(**{**base, key: value})(z, x)
        assert (F1 - F0).abs().max() > 1e-4, key


# ---- gradients ----------------------------------------------------------------------------------

GRAD_OPTIONS = [
    dict(
        coupling=c,
        attention=a,
        ffn=f,
        qk_norm=True,
        bias=True,
        rope=(f == "mlp"),
        spectral_rho=0.8 if c == "sequential" else None,
    )
    for c, a, f in itertools.product(["coupled", "sequential"], ["softmax", "energy"], ["mlp", "monotone"])
]


@pytest.mark.parametrize("kw", GRAD_OPTIONS, ids=lambda kw: f"{kw['coupling']}-{kw['attention']}-{kw['ffn']}")
def test_gradcheck_z_x_params(kw):
    blk = _block(d_model=4, n_heads=2, mlp_ratio=1, **kw)
    cfg, sn_u = blk.config, blk.sn_u_list()
    params = [p.detach().clone().requires_grad_(True) for p in blk.param_list()]
    z = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)

    def F(z, x, *params):
        return _C.block_forward(cfg, list(params), sn_u, z, x)

    assert torch.autograd.gradcheck(F, (z, x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kw", [GRAD_OPTIONS[0], GRAD_OPTIONS[7]], ids=["softmax-mlp", "energy-monotone"])
def test_gradgradcheck_z(kw):
    # The engine's JVPs are double VJPs (AutogradField): F must be twice differentiable.
    blk = _block(d_model=4, n_heads=2, mlp_ratio=1, **kw)
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    z = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda z: blk(z, x), (z,), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---- holomorphy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", GRAD_OPTIONS, ids=lambda kw: f"{kw['coupling']}-{kw['attention']}-{kw['ffn']}")
def test_holomorphic(kw):
    """F(z + hv) − F(z) ≈ h Jv and F(z + ihv) − F(z) ≈ ih Jv (central differences), Jv from the field."""
    blk = _block(**kw)
    torch.manual_seed(2)
    # near the real axis, where holomorphic EP evaluates F (far from it the complex LayerNorm's
    # mean((z − μ)²) can approach 0: a branch point, where finite differences lose accuracy)
    cplx = lambda *s: torch.complex(torch.randn(*s, dtype=torch.float64), 0.3 * torch.randn(*s, dtype=torch.float64))  # noqa: E731
    z, x, v = cplx(2, 5, 8), cplx(2, 5, 8), torch.randn(2, 5, 8, dtype=torch.complex128)
    h = 1e-5
    F = lambda t: blk(z + t * v, x)  # noqa: E731
    with torch.no_grad():
        d_real = central_difference(F, h)
        d_imag = central_difference(F, 1j * h)  # (F(z + ihv) − F(z − ihv)) / 2ih
        curvature = max(third_difference(F, 1e-3), third_difference(F, 1e-3j))
    Jv = blk.vector_field(x).jvp(z, v)
    bound = fd_tol(h, noise=_bound(blk, z, x), curvature=curvature)
    check(d_real, Jv, bound, "real step")
    check(d_imag, Jv, bound, "imaginary step")  # Cauchy–Riemann: no dependence on conj(z)


def test_complex_field_vjp_is_plain_transpose():
    blk = _block(attention="softmax", ffn="mlp", bias=True)
    z, x = torch.randn(1, 4, 8, dtype=torch.complex128), torch.randn(1, 4, 8, dtype=torch.complex128)
    u, v = torch.randn_like(z), torch.randn_like(z)
    f = blk.vector_field(x)
    lhs = (u * f.jvp(z, v)).sum()  # uᵀ(Jv), bilinear: no conjugation
    rhs = (f.vjp(z, u) * v).sum()  # (Jᵀu)ᵀv
    # both are F's graph run forward and backward (2·STAGES roundings) and summed
    bound = tol(z.dtype, n=2 * STAGES, scale=condition_scale(lambda z, u, v: (u * f.jvp(z, v)).sum(), [z, u, v]))
    check(lhs, rhs, 2 * bound)


# ---- the field ------------------------------------------------------------------------------------


def test_field_products_match_autograd():
    blk = _block(coupling="sequential", attention="softmax", ffn="monotone", bias=True, spectral_rho=0.7)
    z, x = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    v = torch.randn_like(z)
    f = blk.vector_field(x)
    assert f.parameter_names() == blk.param_names()
    zz = z.clone().requires_grad_(True)
    Fz = blk(zz, x)
    grads = torch.autograd.grad(Fz, [zz, *blk.param_list()], v)
    # the field's products and autograd: the forward and the backward pass, 2·STAGES roundings each
    bound = 2 * tol(z.dtype, n=2 * STAGES, scale=condition_scale(lambda z, v: f.vjp(z, v), [z, v]))
    check(f.vjp(z, v), grads[0], bound, "vjp")
    param_vjp = lambda z, v: torch.cat([g.flatten() for g in f.param_vjp(z, v)])  # noqa: E731
    bound = 2 * tol(z.dtype, n=2 * STAGES, scale=condition_scale(param_vjp, [z, v]))
    check(param_vjp(z, v), torch.cat([g.flatten() for g in grads[1:]]), bound, "param_vjp")
    h = 1e-6
    F = lambda t: blk(z + t * v, x)  # noqa: E731
    with torch.no_grad():
        fd = central_difference(F, h)
        bound = fd_tol(h, noise=_bound(blk, z, x), curvature=third_difference(F, 1e-3))
    check(f.jvp(z, v), fd, bound, "jvp")


def test_field_cache_follows_parameter_updates():
    blk = _block(ffn="monotone", spectral_rho=0.7)
    z, x = torch.randn(1, 4, 8, dtype=torch.float64), torch.randn(1, 4, 8, dtype=torch.float64)
    f = blk.vector_field(x)
    with torch.no_grad():
        before = f.eval(z)
        blk.q_weight.mul_(1.5)
        blk.mono_A.add_(0.1)
        after = f.eval(z)
        check(after, blk(z, x), 2 * _bound(blk, z, x))
    assert (after - before).abs().max() > 1e-6


# ---- energy attention -----------------------------------------------------------------------------


@pytest.mark.parametrize("qk_norm,rope,bias", [(False, False, False), (True, False, True), (True, True, False)])
def test_energy_attention_is_symmetric_gradient(qk_norm, rope, bias):
    blk = _block(attention="energy", qk_norm=qk_norm, rope=rope, bias=bias)
    cfg, params, sn_u = blk.config, blk.param_list(), blk.sn_u_list()
    u = torch.randn(1, 4, 8, dtype=torch.float64)
    attn = lambda u: _C.block_attention(cfg, params, sn_u, u)  # noqa: E731
    jac = lambda u: torch.autograd.functional.jacobian(attn, u).reshape(32, 32)  # noqa: E731
    J = jac(u)
    # J and Jᵀ: the attention's forward and backward pass, 2·STAGES roundings
    check(J, J.T, 2 * tol(u.dtype, n=2 * STAGES, scale=condition_scale(jac, [u])), "J - Jᵀ")
    # ... and it is −∇E for the documented energy (C++ closed form vs autograd of the C++ energy)
    uu = u.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_C.block_energy(cfg, params, sn_u, uu).sum(), uu)
    check(attn(u), -g, 2 * tol(u.dtype, n=2 * STAGES, scale=condition_scale(attn, [u])), "attention + ∇E")


def test_softmax_attention_jacobian_is_not_symmetric():
    # The control for the test above: the check can fail.
    blk = _block(attention="softmax")
    u = torch.randn(1, 4, 8, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(
        lambda u: _C.block_attention(blk.config, blk.param_list(), blk.sn_u_list(), u), u
    ).reshape(32, 32)
    assert (J - J.T).abs().max() > 1e-2 * J.abs().max()


# ---- monotone FFN ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scale,m,rho", [(0.05, 0.1, None), (1.0, 0.1, None), (3.0, 0.3, None), (3.0, 0.1, 0.5)])
def test_monotone_ffn_is_contractive(scale, m, rho):
    torch.manual_seed(3)
    blk = eqprop.EquilibriumBlock(8, 2, ffn="monotone", bias=True, monotone_m=m, spectral_rho=rho, dtype=torch.float64)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(scale * torch.randn_like(p))
    cap = 1 - m if rho is None else min(1 - m, rho)
    W = blk.effective_weights()["mono_W"].detach()
    # a norm or eigenvalue of an n×n matrix is computed to within about n²·ε·‖W‖ (backward stable)
    slack = tol(W.dtype, n=W.numel(), scale=cap)
    assert torch.linalg.matrix_norm(W, 2) <= cap + slack
    # monotone: the symmetric part of I − W̃ is ⪰ m I
    assert torch.linalg.eigvalsh(torch.eye(8, dtype=W.dtype) - (W + W.T) / 2).min() >= m - slack
    # the dense Jacobian of the branch u ↦ tanh(W̃u + b) at random points
    for _ in range(3):
        u = 2 * torch.randn(1, 3, 8, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(
            lambda u: _C.block_ffn(blk.config, blk.param_list(), blk.sn_u_list(), u), u
        ).reshape(24, 24)
        assert torch.linalg.matrix_norm(J, 2) <= cap + tol(J.dtype, n=J.numel(), scale=cap)
    # the construction only shrinks when its bound exceeds the cap: B = 0 and ‖A‖_F² ≤ 2(1−m)
    # leave W = (1−m)I − AᵀA as is (its norm is 1−m already), larger A is shrunk
    with torch.no_grad():
        blk.mono_B.zero_()
    A = blk.mono_A.detach()
    W_raw = (1 - m) * torch.eye(8, dtype=A.dtype) - A.T @ A
    # unshrunk, the two differ only by the rounding of AᵀA (8 terms of size ‖A‖²)
    gap = (blk.effective_weights()["mono_W"].detach() - W_raw).abs().max()
    shrunk = bool(gap > tol(A.dtype, n=8, scale=1 + (A * A).sum()))
    assert shrunk == bool((A * A).sum() > 2 * (1 - m) if rho is None else True)


# ---- spectral normalization -----------------------------------------------------------------------


def test_spectral_rho_respected():
    rho = 0.6
    blk = _block(spectral_rho=rho, bias=True)
    with torch.no_grad():
        blk.q_weight.mul_(10.0)  # far above rho
        blk.k_weight.mul_(1e-3 / torch.linalg.matrix_norm(blk.k_weight, 2))  # far below rho
    blk.update_spectral_norm(200)
    eff = blk.effective_weights()
    for name in ("q_weight", "v_weight", "o_weight", "ffn_in_weight", "ffn_out_weight"):
        raw_norm = torch.linalg.matrix_norm(getattr(blk, name).detach(), 2)
        norm = torch.linalg.matrix_norm(eff[name].detach(), 2)
        if raw_norm > rho:
            assert abs(norm - rho) <= 1e-6 * rho, name
    torch.testing.assert_close(eff["k_weight"], blk.k_weight, rtol=0, atol=0)


def test_spectral_vectors_update_in_training_forward_only():
    blk = _block(spectral_rho=0.5)
    z, x = torch.randn(1, 3, 8, dtype=torch.float64), torch.randn(1, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        blk.q_weight.copy_(torch.randn_like(blk.q_weight))
    u0 = blk.q_weight_sn_u.clone()
    blk.eval()(z, x)
    assert torch.equal(blk.q_weight_sn_u, u0)
    blk.train()(z, x)
    assert not torch.equal(blk.q_weight_sn_u, u0)


def test_training_mode_backward_through_several_forwards():
    # each training forward moves sn_u in place; graphs of earlier calls must not depend on it
    blk = _block(spectral_rho=0.5).train()
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    z = torch.zeros_like(x)
    for _ in range(3):
        z = blk(z, x)
    z.square().sum().backward()
    assert blk.q_weight.grad.abs().sum() > 0


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_model=10, n_heads=3), r"d_model must be divisible by n_heads, got d_model=10 and n_heads=3"),
        (dict(coupling="parallel"), r'coupling must be one of "coupled", "sequential"; got "parallel"'),
        (dict(attention="linear"), r'attention must be one of "softmax", "energy"; got "linear"'),
        (dict(ffn="moe"), r'ffn must be one of "mlp", "monotone"; got "moe"'),
        (dict(attn_kernel="flash"), r'attn_kernel must be one of "auto", "math"; got "flash"'),
        (dict(spectral_rho=0.0), r"spectral_rho must be a finite number > 0"),
        (dict(spectral_rho=-1.0), r"spectral_rho must be a finite number > 0"),
        (dict(d_model=6, n_heads=2, rope=True), r"rope needs an even head dimension d_model / n_heads, got 3"),
        (dict(monotone_m=1.0), r"monotone_m must be in \(0, 1\), got 1"),
        (dict(d_model=0, n_heads=1), r"d_model must be >= 1, got 0"),
        (dict(resinit=-0.1), r"resinit must be a finite number >= 0, got -0.1"),
        (dict(dtype=torch.int64), r"dtype must be a real floating dtype"),
    ],
)
def test_bad_config(kwargs, match):
    kwargs = {"d_model": 8, "n_heads": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        eqprop.EquilibriumBlock(kwargs.pop("d_model"), kwargs.pop("n_heads"), **kwargs)


def test_bad_config_types():
    with pytest.raises(TypeError, match=r"n_heads must be an int, got float 2.0"):
        eqprop.EquilibriumBlock(8, 2.0)
    with pytest.raises(TypeError, match=r"coupling must be a str"):
        eqprop.EquilibriumBlock(8, 2, coupling=None)
    with pytest.raises(TypeError):
        eqprop.EquilibriumBlock(8, 2, colour="red")  # unknown keyword


def test_bad_inputs():
    blk = _block()
    z = torch.randn(2, 5, 8, dtype=torch.float64)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    cases = [
        ((z[0], x[0]), r"z must be \[B, T, C\] with C = d_model = 8, got shape \[5, 8\]"),
        ((z[..., :4], x[..., :4]), r"z must be \[B, T, C\] with C = d_model = 8, got shape \[2, 5, 4\]"),
        ((z, x[:, :3]), r"x must have the shape of z \[2, 5, 8\], got \[2, 3, 8\]"),
        ((z.float(), x.float()), r"z must have the parameters' dtype \(Double\), got Float"),
        ((z, x.float()), r"x must have the dtype of z \(Double\), got Float"),
        (
            (z.to(torch.complex64), x.to(torch.complex64)),
            r"complex z of dtype ComplexFloat needs parameters of dtype Float, got Double",
        ),
        ((z.long(), x.long()), r"z must be a floating or complex tensor, got Long"),
        (
            (z, torch.where(torch.arange(8) == 3, float("nan"), x)),
            r"x \(the injection\) must be finite, got 10 non-finite",
        ),
        ((z, x.to("meta")), r"x must be on the device of z \(cpu\), got meta"),
        ((z.to("meta"), x.to("meta")), r"z and x must be on the parameters' device \(cpu\), got meta"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            blk(*args)


def test_bad_params_and_field_inputs():
    blk = _block(spectral_rho=0.5)
    cfg, params, sn_u = blk.config, blk.param_list(), blk.sn_u_list()
    z = torch.randn(1, 3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"params must hold the \d+ parameters of this config"):
        _C.block_forward(cfg, params[:-1], sn_u, z, z)
    bad = list(params)
    bad[1] = bad[1][:4]
    with pytest.raises(ValueError, match=r"parameter q_weight must have shape \[8, 8\], got \[4, 8\]"):
        _C.block_forward(cfg, bad, sn_u, z, z)
    with pytest.raises(ValueError, match=r"sn_u must hold \d+ power-iteration vectors"):
        _C.block_forward(cfg, params, [], z, z)
    with pytest.raises(ValueError, match=r"x \(the injection\) must be finite"):
        blk.vector_field(torch.full_like(z, float("inf")))
    with pytest.raises(ValueError, match=r"x must be \[B, T, C\] with C = d_model = 8, got shape \[3, 8\]"):
        blk.vector_field(z[0])
    f = blk.vector_field(z)
    with pytest.raises(ValueError, match=r"z must have the shape of the bound x \[1, 3, 8\], got \[1, 4, 8\]"):
        f.eval(torch.randn(1, 4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"z must have the dtype of the bound x \(Double\), got Float"):
        f.eval(z.float())


@pytest.mark.parametrize("attention,ffn", [("softmax", "mlp"), ("energy", "monotone")])
def test_gradcheck_complex(attention, ffn):
    # autograd of the holomorphic extension (Wirtinger convention), in z, x and the real parameters
    blk = _block(d_model=4, n_heads=2, mlp_ratio=1, attention=attention, ffn=ffn, bias=True, rope=True)
    cfg, sn_u = blk.config, blk.sn_u_list()
    params = [p.detach().clone().requires_grad_(True) for p in blk.param_list()][:4]
    rest = blk.param_list()[4:]
    cplx = lambda: torch.complex(
        torch.randn(1, 3, 4, dtype=torch.float64),  # noqa: E731
        0.2 * torch.randn(1, 3, 4, dtype=torch.float64),
    ).requires_grad_(True)
    z, x = cplx(), cplx()

    def F(z, x, *head):
        return _C.block_forward(cfg, [*head, *[r.detach() for r in rest]], sn_u, z, x)

    assert torch.autograd.gradcheck(F, (z, x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


# ---- the block in the engine ----------------------------------------------------------------------


def test_implicit_gradient_through_block_matches_finite_differences():
    """∇θ ℓ(z*(θ)) by eqprop.fixed_point (implicit, native block field) vs central differences."""
    blk = _block(d_model=8, n_heads=2, perturb=0.1, coupling="sequential", bias=True, spectral_rho=0.9, resinit=0.3)
    torch.manual_seed(4)
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    w = torch.randn(1, 4, 8, dtype=torch.float64)
    opts = dict(max_steps=400, tol=1e-14, backward_max_steps=400, backward_tol=1e-14)

    def loss():
        return (w * eqprop.fixed_point(blk, x, **opts)).sum()

    loss().backward()
    # the loss at a fixed point relaxed to a relative residual 1e-14 is off by about ‖w‖‖z*‖·1e-14/(1 − L);
    # (1 − L)⁻¹ ≤ 10 here, and float64 rounding of the block adds the same order
    with torch.no_grad():
        noise = 10 * float(w.norm() * eqprop.fixed_point(blk, x, **opts).norm()) * (opts["tol"] + tol(x.dtype))
    h = 1e-6
    for name in ("q_weight", "ffn_out_weight", "ln2_weight"):
        p = getattr(blk, name)
        d = torch.zeros_like(p)
        d[(1,) if p.dim() == 1 else (1, 2)] = 1.0
        fd = central_difference(loss, h, [p], [d])
        bound = fd_tol(h, noise=noise, curvature=third_difference(loss, 1e-3, [p], [d]))
        check((p.grad * d).sum(), fd, bound, name)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(attention="energy", ffn="monotone", rope=True, spectral_rho=0.7)],
    ids=["softmax-mlp", "energy-monotone"],
)
def test_bfloat16_block_tracks_float64(kw):
    blk = _block(**kw)
    b16 = _block(dtype=torch.bfloat16, **kw)
    with torch.no_grad():
        for p, q in zip(b16.parameters(), blk.parameters()):
            p.copy_(q)
        for name, u in b16.sn_u_dict().items():
            u.copy_(blk.sn_u_dict()[name])
    z, x = torch.randn(2, 5, 8).bfloat16(), torch.randn(2, 5, 8).bfloat16()
    expected, bound = _oracle(b16, z, x), _bound(b16, z, x)  # float64 on the same (bfloat16) weights
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            got = b16(z, x)
        assert got.dtype == torch.bfloat16
        check(got.detach().double(), expected, bound, f"grad={grad}")


def test_fixed_point_is_holomorphic_in_x():
    """The complex fixed point z*(x) of the block (engine relax on the native field) is holomorphic:
    real- and imaginary-direction differences of z* agree, and on real x it is the real z*."""
    blk = _block(perturb=0.05, resinit=0.3, spectral_rho=0.9, bias=True, rope=True)
    torch.manual_seed(5)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    v = torch.randn(2, 5, 8, dtype=torch.complex128)
    xc = x.to(torch.complex128)

    def z_star(x):
        z, info = eqprop.relax(blk, x, max_steps=300, tol=1e-14)
        assert_converged(info)
        return z

    zr = z_star(x)
    # each z* is within ‖z*‖·1e-14/(1 − L) of the fixed point ((1 − L)⁻¹ ≤ 10 here), plus float64 rounding
    noise = 10 * float(zr.abs().max()) * (1e-14 + tol(x.dtype, n=STAGES))
    check(z_star(xc), zr.to(torch.complex128), 2 * noise, "complex z* on real x")
    h = 1e-5
    Z = lambda t: z_star(xc + t * v)  # noqa: E731
    d_real = central_difference(Z, h)
    d_imag = central_difference(Z, 1j * h)
    curvature = max(third_difference(Z, 1e-3), third_difference(Z, 1e-3j))
    check(d_real, d_imag, 2 * fd_tol(h, noise=noise, curvature=curvature))


# ---- EquilibriumLM --------------------------------------------------------------------------------


def _lm(pos="learned", **kw):
    torch.manual_seed(0)
    return eqprop.EquilibriumLM(
        3,
        8,
        2,
        max_len=12,
        pos_enc=pos,
        mlp_ratio=2,
        dtype=torch.float64,
        fixed_point=dict(max_steps=25, tol=0.0),
        **kw,
    )


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_lm_shapes_loss_and_causality(pos):
    lm = _lm(pos)
    tokens = torch.randint(0, 3, (2, 10))
    logits = lm(tokens)
    assert logits.shape == (2, 10, 3)
    nll = lm.token_nll(tokens)
    assert nll.shape == (2, 10)
    torch.testing.assert_close(nll[:, 0], torch.full((2,), math.log(3), dtype=nll.dtype))
    loss = lm.loss(tokens)
    assert loss.dtype == torch.float64
    check(loss, nll[:, 1:].mean(), tol(loss.dtype, n=nll.numel(), scale=nll.abs().max()))
    loss.backward()
    for name, p in [("tok_emb", lm.tok_emb.weight), ("q_weight", lm.block.q_weight), ("head", lm.head.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if pos == "learned":
        assert lm.pos_emb.weight.grad[:10].abs().sum() > 0
    # causal: a change at position 6 leaves the logits of positions 0..5 unchanged (fixed step count,
    # so every iterate, not just the limit, is causal)
    other = tokens.clone()
    other[:, 6] = (other[:, 6] + 1) % 3
    with torch.no_grad():
        a, b = lm(tokens), lm(other)
    check(a[:, :6], b[:, :6], tol(a.dtype, n=25 * STAGES, scale=a.abs().max()))  # 25 steps of F, then the head
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-6


def test_positions_matter():
    """Attention without positions is blind to the order of earlier tokens: permuting the prefix
    leaves F at the last position unchanged. RoPE (in the block) and every LM pos mode break this."""
    perm = [2, 0, 1, 3, 4]
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    for rope in (False, True):
        blk = _block(rope=rope)
        with torch.no_grad():
            d = (blk(x[:, perm], x[:, perm])[:, -1] - blk(x, x)[:, -1]).abs().max()
        assert (d > 1e-6) == rope, (rope, float(d))
    tokens = torch.tensor([[0, 1, 2, 2, 1]])
    for pos in ("learned", "sinusoidal", "rope"):
        lm = _lm(pos)
        with torch.no_grad():
            d = (lm(tokens[:, perm])[:, -1] - lm(tokens)[:, -1]).abs().max()
        assert d > 1e-6, pos


def test_energy_attention_is_not_causal_so_the_lm_refuses_it():
    blk = _block(attention="energy")
    z, x = torch.randn(1, 5, 8, dtype=torch.float64), torch.randn(1, 5, 8, dtype=torch.float64)
    z2 = z.clone()
    z2[:, -1] += torch.randn(8, dtype=torch.float64)  # (a constant shift would vanish in LN1)
    with torch.no_grad():
        assert (blk(z2, x)[:, 0] - blk(z, x)[:, 0]).abs().max() > 1e-6  # the last token reaches the first
    with pytest.raises(ValueError, match=r'attention="energy" is not causal'):
        eqprop.EquilibriumLM(2, 8, 2, max_len=10, attention="energy")


def test_lm_bad_input():
    with pytest.raises(ValueError, match=r'pos_enc must be one of "learned", "sinusoidal", "rope"; got \'alibi\''):
        eqprop.EquilibriumLM(2, 8, 2, max_len=10, pos_enc="alibi")
    with pytest.raises(TypeError, match=r'pass pos_enc="rope" instead'):
        eqprop.EquilibriumLM(2, 8, 2, max_len=10, rope=True)
    with pytest.raises(ValueError, match=r"d_model must be divisible by n_heads, got d_model=8 and n_heads=3"):
        eqprop.EquilibriumLM(2, 8, 3, max_len=10)
    with pytest.raises(ValueError, match=r"vocab_size must be >= 2, got 1"):
        eqprop.EquilibriumLM(1, 8, 2, max_len=10)
    lm = eqprop.EquilibriumLM(2, 8, 2, max_len=10)
    with pytest.raises(ValueError, match=r"tokens must be an int64 tensor \[B, L\], got torch.float32"):
        lm(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"tokens must have 1 <= L <= max_len=10 positions, got L=11"):
        lm(torch.zeros(1, 11, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=2\), got values in \[0, 2\]"):
        lm(torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match=r"loss needs sequences of L >= 2 tokens, got L=1"):
        lm.loss(torch.zeros(1, 1, dtype=torch.long))
    lm_bad = eqprop.EquilibriumLM(2, 8, 2, max_len=10, fixed_point=dict(max_iters=5))
    with pytest.raises(TypeError, match=r"unknown relaxation option\(s\) \['max_iters'\]"):
        lm_bad(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.slow
def test_lm_learns_markov_k1():
    """Trained with ordinary autograd through eqprop.fixed_point (implicit backward), the LM beats
    an adaptive order-0 counter (which ignores the previous token) and falls well below ln 2."""
    k, L = 1, 100
    torch.manual_seed(0)
    # Training tolerates an adjoint that ends a little above backward_tol on some step (an inexact
    # gradient); the last forward's convergence is asserted below.
    lm = eqprop.EquilibriumLM(
        2,
        32,
        2,
        max_len=L,
        mlp_ratio=2,
        spectral_rho=1.0,
        fixed_point=dict(max_steps=20, tol=1e-3, backward_max_steps=30, backward_tol=1e-4, on_nonconvergence="ignore"),
    )
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(80):
        loss = lm.loss(eqprop.markov.sample(32, k, seq_len=L, seed=step))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
    test = eqprop.markov.sample(256, k, seq_len=L, seed=10_000)
    bayes = eqprop.markov.bayes_nll(test, k)
    with torch.no_grad():
        nll = lm.token_nll(test)
    assert_converged(lm.last_info)
    # the order-0 counter: P(a) = (n_a + 1/2) / (n + 1) over the tokens seen so far
    onehot = torch.nn.functional.one_hot(test, 2).double()
    counts = torch.cumsum(onehot, 1) - onehot
    p0 = (counts + 0.5) / (counts.sum(-1, keepdim=True) + 1.0)
    nll0 = -torch.log(p0.gather(-1, test[..., None]).squeeze(-1))
    gap, se = eqprop.markov.gap_pct(nll, bayes, k)
    gap0, _ = eqprop.markov.gap_pct(nll0, bayes, k)
    assert nll[:, k:].mean() < 0.60 < math.log(2)
    assert gap < gap0 - 3.0, (gap, se, gap0)
