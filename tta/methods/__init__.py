"""The built-in methods. Importing a module registers its method: one line per method, in the
order tables list them (:func:`tta.registry.registered_methods`), so this file keeps its own
order (no import sorting)."""

# isort: off
from tta.methods import source  # noqa: F401
from tta.methods import norm  # noqa: F401
from tta.methods import alpha_bn  # noqa: F401
from tta.methods import bcn  # noqa: F401
from tta.methods import unmix_tns  # noqa: F401
from tta.methods import tent  # noqa: F401
from tta.methods import sar  # noqa: F401
from tta.methods import lame  # noqa: F401
from tta.methods import balanced_bn  # noqa: F401
from tta.methods import eata  # noqa: F401  (eta, then eata)
from tta.methods import gated_bn  # noqa: F401
from tta.methods import rbn  # noqa: F401
from tta.methods import roid  # noqa: F401
from tta.methods import rotta  # noqa: F401
from tta.methods import tribe  # noqa: F401
from tta.methods import unmix_tns_mass  # noqa: F401
from tta.methods import adanpc  # noqa: F401
from tta.methods import petta  # noqa: F401
from tta.methods import deyo  # noqa: F401
from tta.methods import cotta  # noqa: F401
from tta.methods import cmf  # noqa: F401
from tta.methods import follow  # noqa: F401
# isort: on
