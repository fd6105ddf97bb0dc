"""What the subcommands share: their common options."""

from __future__ import annotations

import argparse

CACHE_HELP = "the layer and artifact store (default: KILN_CACHE, else ~/.cache/kiln)"


def add_cache(parser: argparse.ArgumentParser) -> None:
    """--cache: the store, the same option for every command that reads or writes it."""
    parser.add_argument("--cache", metavar="DIR", help=CACHE_HELP)
