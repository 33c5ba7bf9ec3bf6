"""``source``: the unadapted model (the baseline every method is compared with)."""

from __future__ import annotations

from tta.methods.base import Method
from tta.registry import register_method


@register_method
class Source(Method):
    """No adaptation: eval-mode inference with the source model."""

    name = "source"
    supports_streams = True
