"""Test setup: Triton kernels run in the interpreter on CPU unless FXFUSE_TEST_DEVICE=cuda.

TRITON_INTERPRET must be set before triton is first imported, hence here, before anything else.
"""

import os

if os.environ.get("FXFUSE_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """Device the kernel tests run on: CPU (Triton interpreter) here, CUDA on a GPU machine."""
    return torch.device(os.environ.get("FXFUSE_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
