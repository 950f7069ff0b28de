"""Package-level behaviour: build facts, the torch-version guard, the command line."""

import json
import subprocess
import sys

import torch

import eqprop
from eqprop import markov
from testing import check, tol


def test_build_info_matches_running_torch():
    info = eqprop.build_info()
    assert set(info) == {"eqprop", "torch", "torch_cuda", "cuda_kernels", "compiler"}
    assert info["eqprop"] == eqprop.__version__
    assert info["torch"] == torch.__version__
    assert info["cuda_kernels"] == (torch.version.cuda is not None) == eqprop._C.with_cuda
    assert info["compiler"]


def test_import_under_another_torch_says_rebuild():
    code = "import torch; torch.__version__ = '0.0.1'; import eqprop"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "built against torch" in proc.stderr and "rebuilt" in proc.stderr


def test_cli_markov_bayes(tmp_path):
    out = tmp_path / "bayes.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "eqprop",
            "markov",
            "bayes",
            "--k",
            "1",
            "2",
            "--batch",
            "64",
            "--seed",
            "3",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Bayes NLL/token" in proc.stdout
    rows = json.loads(out.read_text())
    assert [r["k"] for r in rows] == [1, 2]
    for r in rows:  # the CLI reports what the library computes for the same seed
        x = markov.sample(64, r["k"], seed=3 + r["k"])
        expected = markov.bayes_nll(x, r["k"], dtype=torch.float64)[:, r["k"] :].mean()
        check(r["bayes_nll"], expected.item(), tol(torch.float64, n=x.numel(), scale=expected))
        assert r["anchor"] == markov.BAYES_NLL_ANCHORS[r["k"]].nll
