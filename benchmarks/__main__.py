"""``python -m benchmarks [--quick] [--case C] [--impl I] ...``: see ``benchmarks.harness``."""

from .harness import main

__all__: list[str] = []

raise SystemExit(main())
