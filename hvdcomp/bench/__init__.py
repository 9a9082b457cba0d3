"""Measurements behind ``hvdcomp bench``: each module measures one thing and returns plain
records; the CLI in ``cli/bench_*.py`` only parses options and prints."""
