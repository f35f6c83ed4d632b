"""kvbench: a benchmark harness for KV-cache compression in large language models."""

__version__ = "0.1.0"
