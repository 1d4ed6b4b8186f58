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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors and models (``pytestmark = usefixtures("one_thread")``):
    on a shared 2-core machine, thread-pool wake-ups and contention cost more than a second core gives (a
    test file of tiny models ran 3x faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
