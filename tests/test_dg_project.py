"""The repository is a `dg` project: `dg check defs` and `dg list defs` load pipelines.definitions, and `dg dev`
serves it under the workspace's location name without `dagster dev`'s supersession warning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
from pathlib import Path

import pytest

from pipelines.definitions import defs
from tests.webserver_helpers import free_port, graphql

REPO = Path(__file__).resolve().parents[1]
DG = Path(sys.executable).parent / "dg"
LOCATIONS = """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename ... on RepositoryLocation { repositories { assetNodes { assetKey { path } } } }
    ... on PythonError { message } } } } } }"""

pytestmark = pytest.mark.skipif(not DG.is_file(), reason="dagster-dg-cli is not installed (pip install -e .)")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}


def dg(*args: str, cwd: Path = REPO, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DG), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_dg_check_defs_passes_and_lists_the_projects_definitions(env):
    checked = dg("check", "defs", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr
    listed = dg("list", "defs", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assets = {entry["asset_key"] for entry in json.loads(listed.stdout)["assets"]}
    assert assets == {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}


def test_dg_check_defs_fails_on_broken_definitions(env, tmp_path):
    """The `make test` gate can fail: the same [tool.dg] config over a module whose Definitions do not load."""
    project = tmp_path / "broken"
    (project / "broken_pipelines").mkdir(parents=True)
    (project / "broken_pipelines" / "__init__.py").write_text("")
    (project / "broken_pipelines" / "definitions.py").write_text(
        "import dagster as dg\n\n\n@dg.asset(required_resource_keys={'missing'})\ndef a():\n    pass\n\n\n"
        "defs = dg.Definitions(assets=[a])\n"
    )
    dg_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dg"]
    lines = [
        '[project]\nname = "broken"\nversion = "0"\n',
        "[tool.dg]",
        f'directory_type = "{dg_config["directory_type"]}"',
    ]
    lines.append("[tool.dg.project]")
    for key, value in dg_config["project"].items():  # the same settings, over the broken module
        lines.append(f'{key} = "{value.replace("pipelines", "broken_pipelines")}"')
    (project / "pyproject.toml").write_text("\n".join(lines) + "\n")
    checked = dg("check", "defs", cwd=project, env={**env, "PYTHONPATH": str(project)})
    assert checked.returncode != 0
    assert "resource with key 'missing'" in checked.stdout + checked.stderr  # the real cause, named


def test_dg_dev_serves_the_project_without_the_supersession_warning(env, tmp_path):
    port = free_port()
    log = tmp_path / "dg_dev.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(DG), "dev", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its webserver and daemon are children: stopped with it below
        )
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None, log.read_text()[-2000:]
            try:
                entries = graphql(port, LOCATIONS)["data"]["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["loadStatus"] == "LOADED":
                    break
            except (urllib.error.URLError, ConnectionError, KeyError, TypeError):
                pass
            assert time.time() < deadline, "dg dev did not load the project within 120 s"
            time.sleep(0.5)
        (entry,) = entries
        assert entry["name"] == "ssl_attention"  # workspace.yaml's location name: run history carries over
        (repository,) = entry["locationOrLoadError"]["repositories"]
        served = {"/".join(node["assetKey"]["path"]) for node in repository["assetNodes"]}
        assert served == {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    finally:
        os.killpg(process.pid, signal.SIGINT)  # dg dev shuts its services down on an interrupt
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log.read_text()
    assert "Serving dagster-webserver" in output
    # `dagster dev` warns "Function `dev_command` is superseded ... Use 'dg dev' instead." (dagster/_cli/dev.py)
    assert "superseded" not in output.lower()
