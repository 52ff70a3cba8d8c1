"""GPU correctness checks and benchmarks for fastpref (see benchmarks/README.md)."""
