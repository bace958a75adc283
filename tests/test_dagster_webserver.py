"""`dagster dev` is known to load: the webserver serves this workspace's asset graph over GraphQL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipelines.partitions import SHARDS
from ssl_attention.registry import MODELS
from ssl_attention.validation import CHECK_NAMES
from tests.webserver_helpers import free_port, graphql

REPO = Path(__file__).resolve().parents[1]
QUERY = """
{
  workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
      locationOrLoadError { __typename ... on PythonError { message } } } } }
  assetNodes {
    assetKey { path }
    isPartitioned
    partitionKeysByDimension { name partitionKeys }
    pools
    assetChecksOrError { __typename ... on AssetChecks { checks { name } } }
  }
}
"""


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster_home")
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "SSL_ATTENTION_POOL": "gpu"}  # as on a CUDA machine
    process = subprocess.Popen(
        [sys.executable, "-m", "dagster_webserver", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"webserver exited: {process.stderr.read()[-2000:]}")
            try:
                data = graphql(port, QUERY)
                entries = data["data"]["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["loadStatus"] == "LOADED":
                    break
            except (urllib.error.URLError, ConnectionError, KeyError, TypeError):
                pass
            if time.time() > deadline:
                pytest.fail("webserver did not load the workspace within 120 s")
            time.sleep(0.5)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


def test_workspace_loads_without_errors(webserver):
    (entry,) = graphql(webserver, QUERY)["data"]["workspaceOrError"]["locationEntries"]
    assert entry["name"] == "ssl_attention"
    assert entry["locationOrLoadError"]["__typename"] == "RepositoryLocation"


def test_asset_graph_partitions_and_checks_are_served(webserver):
    nodes = {tuple(n["assetKey"]["path"]): n for n in graphql(webserver, QUERY)["data"]["assetNodes"]}
    assert set(nodes) == {
        ("images",),
        ("attention_maps",),
        ("head_stats",),
        ("annotations",),
        ("alignment",),
        ("warehouse_catalog",),
        ("head_ranking",),
    }
    for key in (("attention_maps",), ("head_stats",), ("alignment",)):  # model x image shard
        assert nodes[key]["isPartitioned"]
        dimensions = {d["name"]: d["partitionKeys"] for d in nodes[key]["partitionKeysByDimension"]}
        assert dimensions == {"model": list(MODELS), "shard": [str(s) for s in range(SHARDS)]}
    (ranking,) = nodes[("head_ranking",)]["partitionKeysByDimension"]  # per model, over every shard
    assert ranking["partitionKeys"] == list(MODELS)
    assert nodes[("attention_maps",)]["pools"] == ["gpu"]
    checks = {c["name"] for c in nodes[("attention_maps",)]["assetChecksOrError"]["checks"]}
    assert checks == set(CHECK_NAMES)
    assert not nodes[("images",)]["isPartitioned"]
