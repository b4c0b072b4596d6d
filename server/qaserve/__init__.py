"""qaserve: a gRPC inference server for extractive question answering."""

import os
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qaserve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# OpenMP's wait policy for torch's thread teams: the one place to choose it. OpenMP reads it once, when torch first
# starts a team, so it is set before anything imports torch; an OMP_WAIT_POLICY in the environment always wins.
# None keeps OpenMP's default (threads spin briefly between operators). Measured on 2 cores with the embedded model
# (issue 10): a forward pass on a replica thread took 23.6 ms by default when torch ran on no other thread, and
# 33 ms under PASSIVE whatever else ran. qaserve now runs torch on replica threads only, so PASSIVE is not the
# default; ONNX Runtime's threads are not OpenMP's and ignore this.
OMP_WAIT_POLICY: str | None = None
if OMP_WAIT_POLICY is not None:
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
