"""Test-session settings."""

from __future__ import annotations

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one thread each, not two threads per worker
    # spinning against each other on tiny tensors.
    torch.set_num_threads(1)
