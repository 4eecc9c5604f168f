"""Command-line interface (argument parsing only; work happens in experiments and reports)."""
