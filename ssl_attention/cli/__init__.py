"""`ssl-attention`: extract (`run`), query (`sql`), look (`serve`) and re-lay a warehouse out (`migrate-shards`);
`python -m ssl_attention.cli` too.

The one room of ``ssl_attention`` that may import ``pipelines`` (the Dagster definitions, which `run`
executes in-process) and reach ``dashboards`` (which `serve` starts). The library core, everything in
``ssl_attention`` outside ``cli/``, never imports either: the pipeline and the dashboard are layers over it,
and tests/test_cli.py checks the rule.
"""

import argparse
import logging
import sys
import warnings

from ssl_attention.cli import migrate, run, serve, sql

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-attention", description="Where self-supervised vision models look, per head and fused."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,sql,serve,migrate-shards}")
    run.add_parser(sub)
    sub.add_parser("sql", help=sql.HELP, add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    serve.add_parser(sub)
    migrate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sql"]:  # its own parser: every error one line (scripts read its stderr)
        return sql.main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.command == migrate.COMMAND:
        return migrate.main(args)
    return run.main(args) if args.command == "run" else serve.main(args)
