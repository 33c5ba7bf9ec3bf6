"""Over the time budget: never finishes building its strategy."""

import time


def make_strategy(context):
    time.sleep(3600)
