"""docker-compose.yml as docker-compose itself resolves it (`docker-compose config`): pinned
images, a real healthcheck, every setting from the environment, and a collector command made of
the flags the collector's own CLI and the tests' launcher use."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from store.clickhouse.config import ClickHouseConfig

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "compose-test-token"
PASSWORD = "compose-test-password"


def compose_binary() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        msg = "docker-compose not installed (scripts/system-deps.sh installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; CI is set, so this is a failure")
        pytest.skip(msg)
    return found


def yaml_to_data(text: str, compose: str) -> dict:
    """Parse docker-compose's YAML output; PyYAML if this venv has it, else the interpreter
    that runs docker-compose (Debian's is Python and needs PyYAML itself)."""
    try:
        import yaml

        return yaml.safe_load(text)
    except ImportError:
        pass
    shebang = Path(compose).read_text(errors="replace").splitlines()[0]
    if not shebang.startswith("#!") or "python" not in shebang:
        pytest.skip("no YAML parser: install PyYAML")
    code = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    out = subprocess.run(
        [shebang[2:].strip(), "-c", code], input=text, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def compose_config(**env: str) -> subprocess.CompletedProcess:
    compose = compose_binary()
    clean = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return subprocess.run(
        [compose, "-f", "docker-compose.yml", "config"],
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


def test_services_images_pinned_and_clickhouse_healthchecked(config):
    services = config["services"]
    assert set(services) == {"clickhouse", "collector", "dashboard"}
    image = services["clickhouse"]["image"]
    assert re.fullmatch(r"clickhouse/clickhouse-server:\d+\.\d+(\.\d+)*", image), image
    major, minor = map(int, image.split(":")[1].split(".")[:2])
    assert (major, minor) >= (24, 8)
    for name, svc in services.items():
        assert not svc["image"].endswith(":latest") and ":" in svc["image"], name
    health = services["clickhouse"]["healthcheck"]
    assert health["test"][0] == "CMD" and "/ping" in health["test"][-1]
    assert any(
        v.startswith("clickhouse-data:/var/lib/clickhouse")
        for v in services["clickhouse"]["volumes"]
    )
    assert "clickhouse-data" in config["volumes"]
    for app in ("collector", "dashboard"):
        assert services[app]["depends_on"] == {"clickhouse": {"condition": "service_healthy"}}
        assert services[app]["build"]["dockerfile"] == "deploy/Dockerfile"
    for rel in (
        "deploy/Dockerfile",
        "deploy/clickhouse/config.d/stepwatch.xml",
        "deploy/clickhouse/users.d/stepwatch.xml",
    ):
        assert (ROOT / rel).is_file(), rel


def launcher_flags() -> set[str]:
    """The flags collector/process.py (what the collector and integration tests start the
    collector with) puts on the command line, captured without starting anything."""
    import collector.process as proc

    class Captured(Exception):
        pass

    def fake_popen(cmd, **_kw):
        raise Captured(cmd)

    real = proc.subprocess.Popen
    proc.subprocess.Popen = fake_popen
    try:
        proc.start_collector("memory:")
    except Captured as c:
        return {a for a in c.args[0] if a.startswith("--")}
    finally:
        proc.subprocess.Popen = real
    raise AssertionError("start_collector did not build a command")


def test_collector_command_parses_with_the_real_cli(config, monkeypatch):
    svc = config["services"]["collector"]
    cmd = svc["command"]
    assert cmd[:4] == ["python", "-m", "collector", "serve"]
    flags = {a for a in cmd if a.startswith("--")}
    assert launcher_flags() <= flags, "compose must use the flags the tests' launcher uses"
    import collector.__main__ as cli

    seen = {}

    def fake_serve(store_url, *, host, port, config, **_kw):
        seen.update(store=store_url, host=host, port=port, token=config.token)
        return 0

    monkeypatch.setattr(cli, "serve", fake_serve)
    monkeypatch.setenv("STEPWATCH_TOKEN", svc["environment"]["STEPWATCH_TOKEN"])
    assert cli.main(cmd[3:]) == 0
    assert seen["host"] == "0.0.0.0" and seen["port"] == 50051 and seen["token"] == TOKEN
    assert any(p.get("target") == 50051 for p in svc["ports"])
    # the URL reaches the clickhouse service with the credentials that service was given
    ch_env = config["services"]["clickhouse"]["environment"]
    store = ClickHouseConfig.from_url(seen["store"], env=svc["environment"])
    assert (store.host, store.port) == ("clickhouse", 9000)
    assert (store.user, store.password, store.database) == (
        ch_env["CLICKHOUSE_USER"],
        ch_env["CLICKHOUSE_PASSWORD"],
        ch_env["CLICKHOUSE_DB"],
    )


def test_dashboard_placeholder_reads_the_same_store(config):
    dash, coll = config["services"]["dashboard"], config["services"]["collector"]
    cmd = dash["command"]
    assert cmd[:3] == ["python", "-m", "dashboard"]
    assert cmd[cmd.index("--store") + 1] == coll["command"][coll["command"].index("--store") + 1]
    assert cmd[cmd.index("--server.port") + 1] == "8501"
    # it listens on every interface of its container: only with the password compose requires
    from dashboard.__main__ import Refused, configure, parse

    args, rest = parse(cmd[3:])
    configure(args, rest, environ=dict(dash["environment"]))
    with pytest.raises(Refused, match="password"):
        configure(args, rest, environ={})


def test_settings_come_from_the_environment():
    cfg = resolved(
        STEPWATCH_TOKEN="t2",
        STEPWATCH_OPERATOR_TOKEN="op2",
        STEPWATCH_DASHBOARD_PASSWORD="dash2",
        CLICKHOUSE_DB="other_db",
        CLICKHOUSE_USER="u2",
        CLICKHOUSE_PASSWORD="pw2",
        STEPWATCH_COLLECTOR_PORT="6000",
    )
    ch, coll = cfg["services"]["clickhouse"], cfg["services"]["collector"]
    assert ch["environment"]["CLICKHOUSE_DB"] == "other_db"
    assert "clickhouse://u2@clickhouse:9000/other_db" in coll["command"]
    assert coll["environment"]["CLICKHOUSE_PASSWORD"] == "pw2"
    assert "pw2" not in " ".join(coll["command"])  # never on a command line
    assert coll["environment"]["STEPWATCH_TOKEN"] == "t2"
    assert coll["environment"]["STEPWATCH_OPERATOR_TOKEN"] == "op2"
    dash = cfg["services"]["dashboard"]
    assert dash["environment"]["STEPWATCH_DASHBOARD_PASSWORD"] == "dash2"
    for svc in (coll, dash):  # no secret on any command line
        assert not {"t2", "op2", "dash2", "pw2"} & set(" ".join(svc["command"]).split())
    assert any(str(p.get("published")) == "6000" for p in coll["ports"])


def test_no_default_token_or_dashboard_password():
    out = compose_config(STEPWATCH_DASHBOARD_PASSWORD=PASSWORD)
    assert out.returncode != 0 and "STEPWATCH_TOKEN" in out.stderr
    out = compose_config(STEPWATCH_TOKEN=TOKEN)
    assert out.returncode != 0 and "STEPWATCH_DASHBOARD_PASSWORD" in out.stderr
