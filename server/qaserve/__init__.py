"""qaserve: a gRPC inference server for extractive question answering."""

import os
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qaserve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# OpenMP reads its wait policy once, when torch first starts its thread pool, so it is set before anything imports
# torch. Passive: between operators, torch's threads sleep instead of spinning, leaving the cores to the event loop,
# tokenizing and decoding that run beside the forward pass (bench/load.py: the forward pass of a lone request got
# about 4 ms faster of 109 ms on 2 cores). An explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
