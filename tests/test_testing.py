"""eqprop.testing: each assertion passes on a correct case and fails, with its documented message, on a
constructed wrong one; the pytest plugin; the example test file of docs/testing.md."""

import math
import pathlib
import subprocess
import sys

import pytest
import torch
from equilibrium_fields import Linear, TanhLayer

import eqprop
from eqprop import markov
from eqprop.estimators import BPTT, Implicit
from eqprop.solvers import as_field
from eqprop.testing import (
    assert_contractive,
    assert_converged,
    assert_field_consistent,
    assert_grads_close,
    assert_markov_gap,
    tol,
)

pytest_plugins = ["pytester"]

ROOT = pathlib.Path(__file__).resolve().parents[1]


class ComplexTanh(torch.nn.Module):
    """F(z; x) = tanh(z Aᵀ) + x with complex A: holomorphic, J = diag(1 − tanh²) A is not real."""

    def __init__(self, n, dtype=torch.complex128, modulus=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = torch.nn.Parameter(torch.randn(n, n, dtype=dtype, generator=g) / n**0.5)
        self.modulus = modulus

    def forward(self, z, x):
        y = torch.tanh(z @ self.A.T)
        return (y * z.abs() / 3 if self.modulus else y) + x  # |z| depends on conj(z): not holomorphic


class ConjugateVJP:
    """A field whose VJP returns the conjugate transpose Jᴴu = conj(Jᵀ conj(u)) instead of Jᵀu."""

    def __init__(self, fld):
        self.fld = fld

    def eval(self, z):
        return self.fld.eval(z)

    def jvp(self, z, v):
        return self.fld.jvp(z, v)

    def vjp(self, z, u):
        return self.fld.vjp(z, u.conj()).conj()


class MixesSamples(torch.nn.Module):
    """F(z; x) = tanh(z) + x + mean over the batch of z: sample b of F reads every sample."""

    def forward(self, z, x):
        return torch.tanh(z) + x + z.mean(0)


# --- tol: the one implementation, shared with the project's tests -----------------------------------


def test_tol_is_the_tests_tol():
    import testing

    assert testing.tol is tol
    assert tol(torch.float32, n=64, scale=2.0) == 64 * torch.finfo(torch.float32).eps * 2.0
    assert tol(torch.complex128) == torch.finfo(torch.float64).eps


# --- assert_field_consistent ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_field_consistent_passes_on_correct_fields(dtype):
    x = torch.randn(4, 8, dtype=dtype, generator=torch.Generator().manual_seed(1))
    assert_field_consistent(TanhLayer(8, dtype=dtype), x)
    torch.manual_seed(0)
    block = eqprop.EquilibriumBlock(16, 2, dtype=dtype)
    assert_field_consistent(block, torch.randn(2, 5, 16, dtype=dtype, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_field_consistent_passes_on_holomorphic_field(dtype):
    x = torch.randn(3, 6, dtype=dtype, generator=torch.Generator().manual_seed(1))
    assert_field_consistent(ComplexTanh(6, dtype), x, holomorphic=True)
    # the block on a complex state near the real axis (where holomorphic EP evaluates it; far from it
    # the complex LayerNorm approaches its branch point)
    torch.manual_seed(0)
    block = eqprop.EquilibriumBlock(8, 2, dtype=dtype.to_real())
    g = torch.Generator().manual_seed(3)
    c = lambda: torch.complex(torch.randn(2, 5, 8, generator=g), 0.3 * torch.randn(2, 5, 8, generator=g)).to(dtype)
    assert_field_consistent(block, c(), c(), holomorphic=True)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_field_consistent_catches_conjugate_transpose_vjp(dtype):
    f, x = ComplexTanh(6, dtype), torch.randn(3, 6, dtype=dtype, generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError) as e:
        assert_field_consistent(ConjugateVJP(as_field(f, x)), x)
    msg = str(e.value)
    assert "adjoint (the VJP is not the plain transpose of the JVP)" in msg
    assert "conjugate transpose" in msg
    # the JVP and the holomorphy are fine: only the adjoint is named
    assert "1 property broke" in msg and "holomorphic:" not in msg and "finite differences" not in msg


def test_field_consistent_catches_a_field_that_mixes_samples():
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError) as e:
        assert_field_consistent(MixesSamples(), x)
    msg = str(e.value)
    assert "separable: perturbing sample" in msg and "1 property broke" in msg
    # the mixing is 1/B of the perturbation: far above the rounding bound it is compared with
    change = float(msg.split(" by ")[1].split(" >")[0])
    bound = float(msg.split("> bound ")[1].split(" ")[0])
    assert change > 1e6 * bound


def test_field_consistent_catches_a_non_holomorphic_field():
    x = torch.randn(3, 6, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    f = ComplexTanh(6, modulus=True)
    with pytest.raises(AssertionError) as e:
        assert_field_consistent(f, x)
    assert "holomorphic: max |Jv - (F(z+ihv) - F(z-ihv))/2ih|" in str(e.value)
    assert "depends on conj(z)" in str(e.value)
    # the real-direction derivative is still right: finite differences along real v agree with the JVP
    assert "finite differences" not in str(e.value)


def test_field_consistent_catches_a_wrong_jvp():
    f, x = TanhLayer(6), torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fld = as_field(f, x)

    class ScaledProducts:  # J and Jᵀ both off by 1 %: adjoint holds, finite differences do not
        eval = staticmethod(fld.eval)
        jvp = staticmethod(lambda z, v: 1.01 * fld.jvp(z, v))
        vjp = staticmethod(lambda z, u: 1.01 * fld.vjp(z, u))

    with pytest.raises(AssertionError, match=r"finite differences: max \|Jv - \(F\(z\+hv\)"):
        assert_field_consistent(ScaledProducts(), x)


def test_field_consistent_bad_input():
    with pytest.raises(ValueError, match="holomorphic=True needs a complex state"):
        assert_field_consistent(TanhLayer(4), torch.zeros(2, 4, dtype=torch.float64), holomorphic=True)
    with pytest.raises(ValueError, match="probes must be"):
        assert_field_consistent(TanhLayer(4), torch.zeros(2, 4, dtype=torch.float64), probes=0)


# --- assert_converged / assert_contractive ------------------------------------------------------


def test_converged_and_contractive_pass_on_a_contraction():
    f, x = TanhLayer(8), torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z, info = eqprop.relax(f, x, tol=1e-10, max_steps=500)
    assert_converged(info, tol=1e-10)
    assert_contractive(f, x, z, rho_max=0.8 + 1e-6)  # ‖J‖₂ <= ‖W‖₂ = 0.8 bounds ρ


def test_converged_and_contractive_fail_for_rho_above_one():
    # J = A = diag(1.5, 0.5, 0.2): ρ = 1.5 exactly, and Picard moves away from the fixed point
    A = torch.diag(torch.tensor([1.5, 0.5, 0.2], dtype=torch.float64))
    f, x = Linear(A), torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError) as e:
        assert_contractive(f, x, torch.zeros_like(x))
    msg = str(e.value)
    assert "spectral radius above rho_max = 1 in 3 of 3 samples (max 1.5000" in msg
    assert msg.count("<-- FAIL") == 3
    z, info = eqprop.relax(f, x, max_steps=20, on_nonconvergence="ignore")
    with pytest.raises(AssertionError) as e:
        assert_converged(info)
    assert "3 of 3 samples did not converge" in str(e.value) and "max_steps" in str(e.value)


def test_converged_fails_above_tol_with_the_residuals():
    f, x = TanhLayer(8), torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, info = eqprop.relax(f, x, tol=1e-3, max_steps=500)
    assert_converged(info)
    with pytest.raises(AssertionError) as e:
        assert_converged(info, tol=1e-12)
    assert "did not converge to rel residual <= 1e-12" in str(e.value)
    assert f"{float(info.rel_lowest[0]):.3g}" in str(e.value)


# --- assert_grads_close --------------------------------------------------------------------------


def _estimates():
    f, x = TanhLayer(8), torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss = lambda z: z.square().sum()
    a = Implicit(tol=1e-12, max_steps=500).grad(f, x, loss)
    # BPTT through 120 steps of a ρ <= 0.8 contraction: off by ~0.8^120 ~ 3e-12 from the implicit gradient
    b = BPTT(120, tol=1e-12, max_steps=500).grad(f, x, loss)
    return a, b


def test_grads_close_passes_for_implicit_vs_long_bptt():
    a, b = _estimates()
    assert_grads_close(a, b)  # default: half the float64 digits
    assert_grads_close(a, b, cos_min=0.999999, rtol=1e-8, atol=1e-9)
    assert_grads_close(a.grads, b.grads, groups={"W": "weights", "U": "weights"})


def test_grads_close_names_the_flipped_group():
    a, b = _estimates()
    flipped = {n: (-g if n == "W" else g) for n, g in a.grads.items()}
    with pytest.raises(AssertionError) as e:
        assert_grads_close(flipped, b, cos_min=0.99)
    rows = {line.split()[0]: line for line in str(e.value).splitlines()[2:]}
    assert "gradients differ in 1 of 3 parameters" in str(e.value)
    assert "-1.0000" in rows["W"] and "<-- FAIL: cosine -1.0000 < 0.99" in rows["W"]
    assert "FAIL" not in rows["U"] and "FAIL" not in rows["b"]
    # groups: the flipped W drags its group's cosine to (‖g_U‖² − ‖g_W‖²) / (‖g_U‖² + ‖g_W‖²)
    nW, nU = float(a.grads["W"].norm()) ** 2, float(a.grads["U"].norm()) ** 2
    with pytest.raises(AssertionError) as e:
        assert_grads_close(flipped, b, cos_min=0.99, groups=lambda n: "bias" if n == "b" else "weights")
    line = next(r for r in str(e.value).splitlines() if r.startswith("weights"))
    assert f"{(nU - nW) / (nU + nW):.4f}" in line and "<-- FAIL" in line
    assert "W[" in line  # the worst entry is in the flipped parameter


def test_grads_close_names_the_worst_entry():
    b = {"p": torch.zeros(3, 4, dtype=torch.float64), "q": torch.ones(2, dtype=torch.complex128)}
    a = {"p": b["p"].clone(), "q": b["q"].clone()}
    a["p"][1, 2] = 1e-3
    with pytest.raises(AssertionError) as e:
        assert_grads_close(a, b)
    assert "p[1, 2]: 0.001 vs 0" in str(e.value)
    with pytest.raises(AssertionError, match="only in a"):
        assert_grads_close({**a, "r": b["p"]}, b)


# --- assert_markov_gap ---------------------------------------------------------------------------


def test_markov_gap_passes_for_bayes_and_fails_for_order_k_minus_1():
    k = 2
    assert_markov_gap(lambda x: markov.bayes_nll(x, k, dtype=torch.float64), k, max_gap_pct=0.0, n_sequences=32, seed=0)
    with pytest.raises(AssertionError) as e:
        assert_markov_gap(
            lambda x: markov.bayes_nll(x, k - 1, dtype=torch.float64), k, max_gap_pct=5.0, n_sequences=64, seed=0
        )
    msg = str(e.value)
    x = markov.sample(64, k, seed=0)
    gap, se = markov.gap_pct(*(markov.bayes_nll(x, o, dtype=torch.float64) for o in (k - 1, k)), k)
    assert gap - 2 * se > 5.0  # the order-(k-1) rule is ~14-16 % worse: a real failure
    assert f"Markov-2 gap to Bayes {gap:+.2f}% ± {se:.2f}" in msg and "> max_gap_pct = 5.0%" in msg
    for label in ("positions 2..", "visits 0", "visits 1..2", "visits >= 100"):
        assert label in msg


def _noisy_model(k, excess_pct, sd):
    """Bayes NLL scaled by 1 + excess/100 plus a per-sequence offset of mean exactly 0 and sd exactly
    ``sd``: the paired gap is exactly ``excess_pct`` and its SE 100·sd / (√n · mean Bayes NLL)."""

    def nll(x):
        b = markov.bayes_nll(x, k, dtype=torch.float64)
        e = torch.randn(x.shape[0], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        e = (e - e.mean()) / e.std() * sd
        return b * (1 + excess_pct / 100) + e

    return nll


def test_markov_gap_is_judged_with_its_standard_error():
    k, n = 2, 64
    x = markov.sample(n, k, seed=1)
    bayes_mean = float(markov.bayes_nll(x, k, dtype=torch.float64)[:, k:].mean())
    sd = 0.01 * math.sqrt(n) * bayes_mean  # SE = 1 %
    noisy = _noisy_model(k, 5.5, sd)
    gap, se = markov.gap_pct(noisy(x), markov.bayes_nll(x, k, dtype=torch.float64), k)
    assert 5.0 < gap and gap - 2 * se < 5.0 and abs(gap - 5.5) < 1e-9 and abs(se - 1.0) < 1e-9
    # above the bound, but within 2 SE of it: not evidence of a regression
    assert_markov_gap(noisy, k, max_gap_pct=5.0, n_sequences=n, seed=1)
    # the same gap measured precisely (SE 0.1 %) fails
    with pytest.raises(AssertionError, match=r"gap to Bayes \+5.50% ± 0.10"):
        assert_markov_gap(_noisy_model(k, 5.5, sd / 10), k, max_gap_pct=5.0, n_sequences=n, seed=1)


def test_markov_gap_bad_input():
    with pytest.raises(ValueError, match="must return a tensor of the tokens' shape"):
        assert_markov_gap(lambda x: x[:, 1:].double(), 2, max_gap_pct=1, n_sequences=4, seed=0)
    with pytest.raises(ValueError, match="n_sequences must be"):
        assert_markov_gap(lambda x: x.double(), 2, max_gap_pct=1, n_sequences=1, seed=0)


# --- the pytest plugin ---------------------------------------------------------------------------


def test_plugin_fixtures_marker_and_seed(pytester):
    pytester.makepyfile(
        """
        import pytest, torch

        def test_device(device):
            assert device.type in ("cpu", "cuda")

        def test_dtype(float_dtype):
            assert float_dtype in (torch.float32, torch.float64)

        def test_seed(eqprop_seed):
            first = torch.rand(3)
            torch.manual_seed(eqprop_seed)
            assert torch.equal(first, torch.rand(3))
            print("SEED", eqprop_seed, torch.rand(1).item())

        def test_seeded_before_each_test():
            print("DRAW", torch.rand(1).item())

        @pytest.mark.cuda
        def test_needs_gpu():
            assert torch.cuda.is_available()
        """
    )
    r = pytester.runpytest("-s", "-rs", "-p", "no:cacheprovider", "--eqprop-seed", "123")
    n_dev = 1 + torch.cuda.is_available()
    r.assert_outcomes(passed=n_dev + 2 + 2 + int(torch.cuda.is_available()), skipped=int(not torch.cuda.is_available()))
    torch.manual_seed(123)
    draw = torch.rand(1).item()
    assert f"DRAW {draw}" in r.stdout.str()
    assert "SEED 123" in r.stdout.str()
    if not torch.cuda.is_available():  # reported at the test, with the reason
        r.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_plugin_*.py:*: needs a CUDA device (marked cuda)"])
    r3 = pytester.runpytest("-p", "no:cacheprovider", "--markers")
    r3.stdout.fnmatch_lines(["@pytest.mark.cuda: needs a CUDA device*"])


def test_importing_eqprop_testing_does_not_import_pytest():
    code = "import sys, eqprop.testing; assert 'pytest' not in sys.modules, 'pytest imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- the example test file of docs/testing.md ---------------------------------------------------


@pytest.mark.slow  # a fresh interpreter imports torch and eqprop, then pytest runs the file
def test_docs_example_test_file_passes(tmp_path):
    path = ROOT / "examples" / "regression" / "test_my_model.py"
    assert path.read_text() in (ROOT / "docs" / "testing.md").read_text(), "docs/testing.md must show the file"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "--eqprop-seed",
            "0",
            str(path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout
