"""Dies hard (SIGABRT, no Python exception) while building its strategy."""

import os


def make_strategy(context):
    os.abort()
