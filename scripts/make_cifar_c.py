#!/usr/bin/env python
"""Generate CIFAR-10-C / CIFAR-100-C in the official layout with the batched torch corruptions.

Hendrycks & Dietterich (ICLR 2019) released CIFAR-10-C as ``CIFAR-10-C/<corruption>.npy``
(uint8, ``(5 * N, 32, 32, 3)``, severity-major: severity ``s`` fills rows
``(s - 1) * N .. s * N - 1``) plus ``labels.npy`` (the ``N`` test labels repeated five
times). This script writes the same layout from any source of 32x32 images, using
``benchmarks.corruptions`` (docs/METHODS.md §9.1) and the official truncating
8-bit output. ``benchmarks.data.load_cifar_c`` reads generated and official files alike.

Severity subsets: every file always has five severity blocks; blocks not generated stay
zero. ``generation.json`` beside the files lists, per corruption, the severities actually
generated (``load_cifar_c`` refuses the others), with the source, seed and image count, the
generator's version (a sha256 of the ``benchmarks.corruptions`` source) and the sha256 of
every file, which ``load_cifar_c`` verifies before reading.
Re-running with other corruptions or severities into the same folder fills the missing
blocks, provided source, order, image count and seed are the same.

Image order: the official files keep CIFAR's test-set order, which mixes the classes, so
"the first n images" (RobustBench's slicing) is a fair sample. The shared JPEG tarballs are
sorted by class, so with ``--source cifar10-jpeg`` the images are written in a fixed
pseudo-random order (``numpy.random.default_rng(0).permutation``; ``--order auto``) unless
``--order source`` is given. The sidecar records the order.

Examples::

    python scripts/make_cifar_c.py --out data/generated                  # CIFAR-10 test JPEGs
    python scripts/make_cifar_c.py --source digits --out outputs/cifar-c --corruptions fog snow
    python scripts/make_cifar_c.py --source cifar100 --root ~/data --download --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.corruptions import CORRUPTIONS, SEVERITIES, corrupt_uint8  # noqa: E402
from benchmarks.data import ImageArrays, cifar10_jpeg, load_cifar, load_digits  # noqa: E402
from benchmarks.data.corrupted import CIFAR_C_DIRS, GENERATION_SIDECAR, N_SEVERITIES, file_digest  # noqa: E402
from benchmarks.files import atomic_write_text  # noqa: E402
from benchmarks.protocol import code_sha256  # noqa: E402

SOURCES = ("cifar10-jpeg", "cifar10", "cifar100", "digits")


def load_source(source: str, root: str | None, download: bool) -> ImageArrays:
    """The clean test images to corrupt."""
    if source == "cifar10-jpeg":
        return cifar10_jpeg("test", shared_dir=root)
    if source in ("cifar10", "cifar100"):
        if root is None:
            raise SystemExit(f"--root is required for --source {source}")
        return load_cifar(source, root, train=False, download=download)
    return load_digits("test", size=32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder that receives CIFAR-10-C/ (or CIFAR-100-C/)")
    parser.add_argument(
        "--source", choices=SOURCES, default="cifar10-jpeg", help="clean test images (default: %(default)s)"
    )
    parser.add_argument("--root", help="torchvision root (cifar10/cifar100) or shared data folder (cifar10-jpeg)")
    parser.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS), metavar="NAME", help="default: all 15")
    parser.add_argument(
        "--severities", nargs="+", type=int, default=list(SEVERITIES), metavar="S", help="default: 1 2 3 4 5"
    )
    parser.add_argument("--n-examples", type=int, default=None, help="use only the first N images (after ordering)")
    parser.add_argument(
        "--order",
        choices=("auto", "source", "permuted"),
        default="auto",
        help="image order: 'permuted' (fixed seed 0) for class-sorted sources; auto: permuted for cifar10-jpeg",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.corruptions) - set(CORRUPTIONS))
    if unknown:
        parser.error(f"unknown corruptions {unknown}; valid: {', '.join(CORRUPTIONS)}")
    bad = sorted(set(args.severities) - set(SEVERITIES))
    if bad:
        parser.error(f"severities must be in {SEVERITIES}, got {bad}")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def _sidecar_base(args: argparse.Namespace, n: int) -> dict:
    return {
        "generator": "benchmarks.corruptions (batched torch reimplementation)",
        "generator_version": "code-sha256:" + code_sha256("benchmarks.corruptions"),
        "reference": "Hendrycks & Dietterich, ICLR 2019; hendrycks/robustness make_cifar_c.py",
        "source": args.source,
        "order": args.order,
        "n_per_severity": n,
        "seed": args.seed,
        "output_cast": "truncating uint8 of clip(x, 0, 1) * 255",
        "layout": "severity-major; blocks of severities not listed under 'severities' are zero",
    }


def generate(args: argparse.Namespace) -> Path:
    source = load_source(args.source, args.root, args.download)
    if args.order == "auto":
        args.order = "permuted" if args.source == "cifar10-jpeg" else "source"
    if args.order == "permuted":  # class-sorted folders: mix the classes like CIFAR's order
        source = source.subset(np.random.default_rng(0).permutation(len(source)))
    if args.n_examples is not None:
        source = source.subset(np.arange(min(args.n_examples, len(source))))
    n, height, width = source.images.shape[:3]
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    folder = args.out / CIFAR_C_DIRS["cifar100" if args.source == "cifar100" else "cifar10"]
    folder.mkdir(parents=True, exist_ok=True)

    sidecar_path = folder / GENERATION_SIDECAR
    sidecar = _sidecar_base(args, n)
    if sidecar_path.is_file():
        previous = json.loads(sidecar_path.read_text())
        keys = ("source", "order", "n_per_severity", "seed") + (("generator_version",) if "generator_version" in previous else ())
        if any(previous.get(k) != sidecar[k] for k in keys):
            raise SystemExit(
                f"{folder} holds a set generated with other settings or another generator version ({sidecar_path}); "
                "use another --out"
            )
        sidecar["severities"] = previous.get("severities", {})
        sidecar["files"] = previous.get("files", {})
    else:
        sidecar["severities"] = {}
        sidecar["files"] = {}

    label_dtype = np.uint8 if source.num_classes <= 256 else np.int64
    np.save(folder / "labels.npy", np.tile(source.labels, N_SEVERITIES).astype(label_dtype))
    sidecar["files"]["labels.npy"] = file_digest(folder / "labels.npy")

    from tqdm import tqdm

    batches = [(lo, min(lo + args.batch_size, n)) for lo in range(0, n, args.batch_size)]
    severities = sorted(set(args.severities))
    shape = (N_SEVERITIES * n, height, width, 3)
    with tqdm(total=len(args.corruptions) * len(severities) * len(batches), unit="batch") as bar:
        for name in args.corruptions:
            path = folder / f"{name}.npy"
            done = set(sidecar["severities"].get(name, []))
            reuse = path.is_file() and np.load(path, mmap_mode="r").shape == shape and bool(done)
            temporary = folder / f".{name}.partial.npy"
            if reuse:
                os.replace(path, temporary)  # keep earlier blocks, fill the new ones
                array = np.lib.format.open_memmap(temporary, mode="r+")
            else:
                done = set()
                array = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=shape)
            for severity in severities:
                bar.set_description(f"{name} s{severity}")
                for lo, hi in batches:
                    clean = source.to_tensor(slice(lo, hi)).to(device)
                    ids = torch.arange(lo, hi, device=device)
                    # the reference's truncated 8-bit values (truncating float32 output is off by
                    # one level for a few percent of some corruptions' values)
                    out = corrupt_uint8(clean, name, severity, seed=args.seed, sample_ids=ids)
                    start = (severity - 1) * n
                    array[start + lo : start + hi] = out.permute(0, 2, 3, 1).cpu().numpy()
                    bar.update(1)
            array.flush()
            del array
            os.replace(temporary, path)
            # The loaders verify every file against this digest (benchmarks.data.corrupted.verify_files).
            sidecar["files"][path.name] = file_digest(path)
            sidecar["severities"][name] = sorted(done | set(severities))
            sidecar["complete"] = all(
                sidecar["severities"].get(c) == list(SEVERITIES) for c in CORRUPTIONS
            )
            atomic_write_text(sidecar_path, json.dumps(sidecar, indent=2) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    folder = generate(args)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
