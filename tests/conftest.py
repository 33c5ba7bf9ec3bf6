import os
import sys
from pathlib import Path

import pytest
import torch

# No test may reach a model hub: fail at once instead of retrying for ~46 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def shared_data_dir() -> Path:
    return Path(os.environ.get("TTA_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    from tests import official

    official.current_item = item
