"""`ssl-attention serve`: the Panel dashboard over a warehouse, as the process itself (no wrapper)."""

import argparse
import importlib.util
import os
import socket
import sys
from pathlib import Path
from typing import NamedTuple

from ssl_attention.cli.usage import fail
from ssl_attention.settings import WAREHOUSE_ENV, resolve_warehouse
from ssl_attention.warehouse.paths import WarehouseLocationError


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="open the Panel dashboard over the warehouse")
    serve.add_argument("--warehouse", help=f"warehouse root (default ${WAREHOUSE_ENV} or data/warehouse)")
    serve.add_argument("--port", type=int, default=5006, help="port (default 5006; 0 picks a free one)")
    serve.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--show", action="store_true", help="open a browser tab")


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


class Launch(NamedTuple):
    command: list[str]  # `panel serve` of dashboards/app.py
    env: dict[str, str]  # the dashboard reads the warehouse from it, through ssl_attention.settings
    warehouse: Path
    port: int


def launch(args: argparse.Namespace) -> Launch:
    warehouse = resolve_warehouse(args.warehouse)
    spec = importlib.util.find_spec("dashboards")
    if spec is None or not spec.submodule_search_locations:
        raise LookupError("the dashboards package is not installed")
    app = Path(next(iter(spec.submodule_search_locations))) / "app.py"
    port = args.port or _free_port(args.address)
    command = [sys.executable, "-m", "panel", "serve", str(app), "--port", str(port), "--address", args.address]
    command.append("--liveness")  # /liveness?endpoint=/app answers once the app builds
    for host in sorted({args.address, "localhost", "127.0.0.1"}):
        command += ["--allow-websocket-origin", f"{host}:{port}"]
    if args.show:
        command.append("--show")
    return Launch(command, {**os.environ, WAREHOUSE_ENV: str(warehouse)}, warehouse, port)


def main(args: argparse.Namespace) -> int:
    try:
        server = launch(args)
    except (WarehouseLocationError, LookupError) as exc:
        return fail(str(exc))
    print(f"serving the dashboard over {server.warehouse} at http://{args.address}:{server.port}/app", flush=True)
    # Become the server (no wrapper process): signals such as Ctrl-C or a supervisor's SIGTERM reach it.
    os.execve(sys.executable, server.command, server.env)
    return 0  # not reached
