"""Built-in methods. Importing a module registers its method (one line per method)."""

from tta.methods import alpha_bn, norm, source, unmix_tns  # noqa: F401
from tta.methods import bcn, lame, sar, tent  # noqa: F401
from tta.methods import rbn  # noqa: F401
from tta.methods import balanced_bn  # noqa: F401
from tta.methods import rotta  # noqa: F401
from tta.methods import tribe  # noqa: F401
from tta.methods import roid  # noqa: F401
from tta.methods import eata  # noqa: F401
from tta.methods import unmix_tns_mass  # noqa: F401
from tta.methods import gated_bn  # noqa: F401
