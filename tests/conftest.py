import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter. Triton reads this when a
# kernel is defined (attnzoo.kernels is imported lazily, by the tests that use it), so setting it here, before
# any test runs, covers every test in the process; nothing else in attnzoo's test process defines Triton kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
