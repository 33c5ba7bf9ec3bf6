"""Does not follow the contract: no make_strategy."""


def build(context):
    return None
