"""Plain PyTorch twins of the C++ core, used only as the test oracle and the benchmark baseline."""
