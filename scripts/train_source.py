#!/usr/bin/env python
"""Train a source model on clean CIFAR-10 (Hydra app; configs in conf/train_source.yaml).

    python scripts/train_source.py source_model=resnet26_bn           # ResNet-26 + BN
    python scripts/train_source.py source_model=resnet26_gn threads=1
    python scripts/train_source.py source_model=vit_small device=cuda source_model.train.epochs=100
    python scripts/train_source.py data.source=digits source_model.train.epochs=2   # no CIFAR needed

The default data are the CIFAR-10 JPEG tarballs (quality 75) of ../shared/data. The checkpoint
(weights, clean test accuracy, training config, per-epoch history) goes to
<cache>/models/<source_model.name>.pt, where the benchmark configs conf/model/cifar10_*.yaml
look for it; a better checkpoint already there is kept unless force=true.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import benchmarks.app  # noqa: E402,F401  (registers the tta.* resolvers)


@hydra.main(config_path="pkg://conf", config_name="train_source", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from benchmarks.training.source import AlreadyTrained, train_source

    try:
        result, decision = train_source(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    except AlreadyTrained as error:
        print(f"not training: {error}", file=sys.stderr)
        return float("nan")
    print(f"clean test accuracy {result.clean_accuracy:.4f} after {result.seconds / 60:.1f} min; {decision.message}")
    return result.clean_accuracy


if __name__ == "__main__":
    main()
