"""qaserve: a gRPC inference server for extractive question answering."""

import os
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qaserve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# OpenMP's wait policy for torch's thread teams: the one place to choose it. OpenMP reads it once, when torch first
# starts a team, so it is set before anything imports torch; an OMP_WAIT_POLICY in the environment always wins.
# None keeps OpenMP's default (threads spin briefly between operators). qaserve runs torch on replica threads only,
# so no second OpenMP team competes for the cores and spinning pays. Measured on 2 cores with the embedded model,
# `python -m bench.load --backends torch` (server p50 at concurrency 1 minus the bare model's, same run): default
# -0.5 ms (23.1 q/s vs 23.0 bare); PASSIVE +13.1 ms (0.75x the bare model's q/s). ONNX Runtime's threads are not
# OpenMP's and ignore this.
OMP_WAIT_POLICY: str | None = None
if OMP_WAIT_POLICY is not None:
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
