"""Over the memory budget: allocates 8 GiB."""

import numpy as np


def make_strategy(context):
    hoard = np.ones(8 * 1024**3, dtype=np.uint8)
    return hoard
