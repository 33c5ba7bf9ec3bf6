"""``python -m benchmarks.perf [--quick] [--device cpu|cuda|all] ...``; ``--help`` lists the flags."""

from benchmarks.perf.cli import main

if __name__ == "__main__":
    main()
