"""How `run` and `serve` report a bad flag: one line on stderr, exit code 2 (argparse's own code)."""

import sys

EXIT_USAGE = 2


def fail(message: str) -> int:
    print(f"ssl-attention: error: {message}", file=sys.stderr)
    return EXIT_USAGE
