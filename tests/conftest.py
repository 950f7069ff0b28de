import os
import sys

# Tests import their shared helpers (tests/testing.py) as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
