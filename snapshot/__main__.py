"""``python -m memtrace.snapshot``: trace-snapshot without the console script (a minimal guest)."""

from memtrace.snapshot.cli import main

if __name__ == "__main__":
    main()
