"""The Hydra benchmark app behind ``python -m benchmarks.run`` (console script ``tta-bench``).

* :mod:`~benchmarks.app.schema`: structured configs registered in Hydra's ConfigStore;
* :mod:`~benchmarks.app.identity`: run identity (hash of the resolved config) and resolvers;
* :mod:`~benchmarks.app.spec`: the typed :class:`RunSpec`, converted once from the config;
* :mod:`~benchmarks.app.checks`, :mod:`~benchmarks.app.preprocessing`: checks against the
  code and the model/dataset preprocessing before any work starts;
* :mod:`~benchmarks.app.fingerprint`: the run's protocol block (:mod:`benchmarks.protocol`);
* :mod:`~benchmarks.app.models`: source models from config (no downloads);
* :mod:`~benchmarks.app.runner`: one run, skipping finished ones;
* :mod:`~benchmarks.app.records`: ``run.json`` completion records, finding finished runs;
* :mod:`~benchmarks.app.compare`, :mod:`~benchmarks.app.aggregate`,
  :mod:`~benchmarks.app.plots`: the report (protocol groups, tables, figures).

Importing the package registers the schema and the ``tta.*`` resolvers, which every process
that composes or resolves a config needs (launcher workers import it through the task
function's module, :mod:`benchmarks.run`).
"""

from benchmarks.app.identity import register_resolvers
from benchmarks.app.schema import register_configs

register_resolvers()
register_configs()

__all__ = ["register_configs", "register_resolvers"]
