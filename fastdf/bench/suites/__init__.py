"""One module per suite; each registers itself with ``fastdf.bench.core.suite``."""
