"""docker-compose.cluster.yml as docker-compose itself resolves it (validated, not run: no Docker
engine here): two pinned ClickHouse shards and a keeper wired to each other through the config
files they mount, and a collector and dashboard whose store URL names that cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from store.clickhouse.config import ClickHouseConfig

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # importlib mode: make `tests.integration.*` importable
    sys.path.insert(0, str(ROOT))

from tests.integration.test_clickhouse_compose import (  # noqa: E402 - after the path fix
    compose_binary,
    launcher_flags,
    yaml_to_data,
)

FILE = "docker-compose.cluster.yml"
TOKEN = "cluster-test-token"
PASSWORD = "cluster-test-password"
SHARDS = ("ch1", "ch2")


def compose_config(**env: str) -> subprocess.CompletedProcess:
    compose = compose_binary()
    clean = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return subprocess.run(
        [compose, "-f", FILE, "config"],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def resolved(**env: str) -> dict:
    out = compose_config(**env)
    assert out.returncode == 0, out.stderr
    return yaml_to_data(out.stdout, compose_binary())


@pytest.fixture(scope="module")
def config() -> dict:
    return resolved(STEPWATCH_TOKEN=TOKEN, STEPWATCH_DASHBOARD_PASSWORD=PASSWORD)


def mounted(svc: dict, target: str) -> Path:
    """The host file a service mounts at `target` (compose has made the path absolute)."""
    for v in svc["volumes"]:
        src, _, rest = v.partition(":")
        if rest.split(":")[0] == target:
            return Path(src)
    raise AssertionError(f"nothing mounted at {target}")


def test_two_pinned_shards_and_a_keeper(config):
    services = config["services"]
    assert set(services) == {"keeper", *SHARDS, "collector", "dashboard"}
    for name in SHARDS:
        image = services[name]["image"]
        assert image.startswith("clickhouse/clickhouse-server:"), image
        major, minor = map(int, image.split(":")[1].split(".")[:2])
        assert (major, minor) >= (24, 8)
        assert services["keeper"]["image"] == image.replace("-server:", "-keeper:")  # same release
        assert "/ping" in services[name]["healthcheck"]["test"][-1]
        assert "keeper" in services[name]["depends_on"]
        assert any(
            v.startswith(f"{name}-data:/var/lib/clickhouse") for v in services[name]["volumes"]
        )
    for app in ("collector", "dashboard"):
        assert services[app]["depends_on"] == {s: {"condition": "service_healthy"} for s in SHARDS}
    assert {"keeper-data", "ch1-data", "ch2-data"} <= set(config["volumes"])


def test_the_mounted_configs_name_the_services(config):
    """remote_servers lists exactly the shard services on their container port, the keeper the
    servers use is the keeper service on the port its own config listens on."""
    services = config["services"]
    cluster_files = {
        mounted(services[s], "/etc/clickhouse-server/config.d/cluster.xml") for s in SHARDS
    }
    (cluster_file,) = cluster_files  # one file: every node knows the same cluster
    for s in SHARDS:
        assert mounted(services[s], "/etc/clickhouse-server/config.d/stepwatch.xml").is_file()
    tree = ET.parse(cluster_file).getroot()
    (cluster,) = list(tree.find("remote_servers"))
    assert cluster.tag == "stepwatch"
    shards = cluster.findall("shard")
    assert [s.find("replica/host").text for s in shards] == list(SHARDS)
    assert {s.find("replica/port").text for s in shards} == {"9000"}
    assert {s.find("internal_replication").text for s in shards} == {"true"}
    for s in shards:  # inter-node queries log in as the compose user, password from env
        assert s.find("replica/user").get("from_env") == "CLICKHOUSE_USER"
        assert s.find("replica/password").get("from_env") == "CLICKHOUSE_PASSWORD"
        assert s.find("replica/password").text is None  # never a literal password
    keeper_file = mounted(services["keeper"], "/etc/clickhouse-keeper/keeper_config.xml")
    keeper = ET.parse(keeper_file).getroot().find("keeper_server")
    node = tree.find("zookeeper/node")
    assert node.find("host").text == "keeper"
    assert node.find("port").text == keeper.find("tcp_port").text
    assert [h.text for h in keeper.findall("raft_configuration/server/hostname")] == ["keeper"]


def test_collector_and_dashboard_store_urls_name_the_cluster(config, monkeypatch):
    services = config["services"]
    svc = services["collector"]
    cmd = svc["command"]
    assert cmd[:4] == ["python", "-m", "collector", "serve"]
    assert launcher_flags() <= {a for a in cmd if a.startswith("--")}
    import collector.__main__ as cli

    seen = {}

    def fake_serve(store_url, *, host, port, config, **_kw):
        seen.update(store=store_url, host=host, port=port, token=config.token)
        return 0

    monkeypatch.setattr(cli, "serve", fake_serve)
    monkeypatch.setenv("STEPWATCH_TOKEN", svc["environment"]["STEPWATCH_TOKEN"])
    assert cli.main(cmd[3:]) == 0
    assert seen["token"] == TOKEN and seen["port"] == 50051
    store = ClickHouseConfig.from_url(seen["store"], env=svc["environment"])
    ch_env = services["ch1"]["environment"]
    assert (store.host, store.port) == ("ch1", 9000)
    assert store.options.cluster == "stepwatch" and store.options.nodes == ""  # names resolve
    assert (store.user, store.password, store.database) == (
        ch_env["CLICKHOUSE_USER"],
        ch_env["CLICKHOUSE_PASSWORD"],
        ch_env["CLICKHOUSE_DB"],
    )
    assert services["ch2"]["environment"] == ch_env  # one user on every node
    dash = services["dashboard"]["command"]
    assert dash[dash.index("--store") + 1] == seen["store"]
    # it listens on every interface of its container: only with the password compose requires
    from dashboard.__main__ import Refused, configure, parse

    args, rest = parse(dash[3:])
    configure(args, rest, environ=dict(services["dashboard"]["environment"]))
    with pytest.raises(Refused, match="password"):
        configure(args, rest, environ={})


def test_settings_come_from_the_environment_and_no_default_secrets():
    cfg = resolved(
        STEPWATCH_TOKEN="t2",
        STEPWATCH_OPERATOR_TOKEN="op2",
        STEPWATCH_DASHBOARD_PASSWORD="dash2",
        CLICKHOUSE_DB="other",
        CLICKHOUSE_USER="u2",
        CLICKHOUSE_PASSWORD="pw2",
    )
    coll, dash = cfg["services"]["collector"], cfg["services"]["dashboard"]
    assert "clickhouse://u2@ch1:9000/other?cluster=stepwatch" in coll["command"]
    assert coll["environment"]["CLICKHOUSE_PASSWORD"] == "pw2"
    assert coll["environment"]["STEPWATCH_OPERATOR_TOKEN"] == "op2"
    assert dash["environment"]["STEPWATCH_DASHBOARD_PASSWORD"] == "dash2"
    for svc in (coll, dash):  # no secret on any command line
        assert not {"t2", "op2", "dash2", "pw2"} & set(" ".join(svc["command"]).split())
    for s in SHARDS:
        assert cfg["services"][s]["environment"]["CLICKHOUSE_PASSWORD"] == "pw2"
    out = compose_config(STEPWATCH_DASHBOARD_PASSWORD=PASSWORD)
    assert out.returncode != 0 and "STEPWATCH_TOKEN" in out.stderr
    out = compose_config(STEPWATCH_TOKEN=TOKEN)
    assert out.returncode != 0 and "STEPWATCH_DASHBOARD_PASSWORD" in out.stderr
