"""alpc's benchmarks: one harness, one script per question, peers measured in the same run.

``python -m benchmarks`` (``make bench``) runs everything; ``--quick`` is the
smoke run (``make bench-quick``). See ``harness`` for the flow and
``registry`` for what is measured where.
"""

__all__: list[str] = []
