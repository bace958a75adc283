"""Throwaway services for the distributed test: PostgreSQL, Redis and Celery workers on 127.0.0.1, free ports,
in temporary folders; each is stopped and removed when its context exits."""

import contextlib
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server binaries (initdb, pg_ctl), if installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres(args: list[str]) -> list[str]:
    """As root, PostgreSQL refuses to run: the command runs as the `postgres` user."""
    if os.geteuid() != 0:
        return args
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in args)]


def _wait_port(port: int, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {seconds} s")


@contextlib.contextmanager
def postgres() -> Iterator[dict[str, str]]:
    """A fresh PostgreSQL cluster (trust auth, no fsync); yields the DAGSTER_PG_* variables that
    dagster_home/postgres/dagster.yaml reads (database `postgres`)."""
    binaries = postgres_bin()
    if binaries is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install -y postgresql)")
    root = Path(tempfile.mkdtemp(prefix="ssl-attention-pg-"))
    data, port = root / "data", free_port()
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    pg_ctl = [str(binaries / "pg_ctl"), "-D", str(data), "-w", "-t", "60"]
    try:
        subprocess.run(
            _as_postgres([str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"]),
            check=True,
            capture_output=True,
        )
        options = f"-p {port} -h 127.0.0.1 -k {root} -F"
        subprocess.run(
            _as_postgres([*pg_ctl, "-o", options, "-l", str(root / "log"), "start"]), check=True, capture_output=True
        )
        yield {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(port),
            "DAGSTER_PG_USER": "postgres",
            "DAGSTER_PG_PASSWORD": "unused",  # trust authentication
            "DAGSTER_PG_DB": "postgres",
        }
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_as_postgres([*pg_ctl, "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def redis() -> Iterator[str]:
    """A Redis server without persistence; yields its URL."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, 20, "redis-server")
        yield f"redis://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


@contextlib.contextmanager
def celery_workers(
    broker: str, backend: str, count: int, env: dict[str, str], extra_args: tuple[str, ...] = ()
) -> Iterator[list[subprocess.Popen]]:
    """`count` Celery workers of dagster-celery's app, one task at a time each (plus ``extra_args`` for
    `celery worker`); yields their processes once all answer a ping."""
    from celery import Celery

    workers = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "dagster_celery.app", "-b", broker),
                *("--result-backend", backend, "worker", "-Q", "dagster", "-c", "1", "-n", f"worker{i}@%h"),
                *("--prefetch-multiplier=1", "-l", "WARNING", "--without-gossip", "--without-mingle"),
                *extra_args,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(count)
    ]
    try:
        app = Celery(broker=broker, backend=backend)
        deadline = time.time() + 90
        while len(app.control.ping(timeout=1.0)) < count:
            if time.time() > deadline or any(w.poll() is not None for w in workers):
                raise RuntimeError("the Celery workers did not start")
        yield workers
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(5)


# One run of pipelines.distributed's Celery job, executed in its own process (as a run launcher would): that
# process orchestrates, the Celery workers execute the steps. Prints "<run id> SUCCESS|FAILURE" last.
LAUNCH = """
import json, sys
import dagster as dg
from pipelines.distributed import celery_job_def
home, run_config, partition, assets = json.loads(sys.argv[1])
with dg.DagsterInstance.from_config(home) as instance:
    result = dg.execute_job(
        dg.reconstructable(celery_job_def), instance, run_config=run_config,
        tags={"dagster/partition": partition} if partition else {}, asset_selection=[dg.AssetKey(a) for a in assets],
    )
    print(result.run_id, "SUCCESS" if result.success else "FAILURE")
"""


def launch_run(
    home: Path, run_config: dict, partition: str | None, assets: list[str], env: dict[str, str]
) -> subprocess.Popen:
    """Start one Celery run of ``assets`` (for ``partition``, e.g. ``clip|0``) against the instance in ``home``."""
    args = json.dumps([str(home), run_config, partition, assets])
    return subprocess.Popen([sys.executable, "-c", LAUNCH, args], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def run_finished(process: subprocess.Popen, timeout: float = 240) -> tuple[str, bool]:
    """(run id, success) of a ``launch_run`` once its process exits."""
    out, _ = process.communicate(timeout=timeout)
    run_id, status = out.strip().splitlines()[-1].split()
    return run_id, status == "SUCCESS"
