from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    # The online-CL tests run many tiny batches; on a shared, loaded 2-core machine OpenMP
    # threads spin-wait on each other and run ~20x slower than one thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
