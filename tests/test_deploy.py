"""Deployment files: docker-compose.yml, Dockerfile, the Kubernetes example, the example producer.

No container engine is needed: docker-compose v1 validates the compose file
(CI installs it into .venv-compose and exports OUTBOX_DOCKER_COMPOSE), and the
Dockerfile and the manifests are parsed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy import Engine, select

from outbox import table

ROOT = Path(__file__).resolve().parents[1]
RELAY_HTTP_PORT = 9464


def _compose_tool() -> str:
    candidates = [
        os.environ.get("OUTBOX_DOCKER_COMPOSE", ""),
        str(ROOT / ".venv-compose" / "bin" / "docker-compose"),
        shutil.which("docker-compose") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    message = "docker-compose is not installed (see .ci/run: it builds .venv-compose)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as docker-compose itself resolves it (anchors, paths, defaults)."""
    tool = _compose_tool()
    quiet = subprocess.run(
        [tool, "-f", "docker-compose.yml", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert quiet.returncode == 0, quiet.stderr
    resolved = subprocess.run(
        [tool, "-f", "docker-compose.yml", "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    document: dict[str, Any] = yaml.safe_load(resolved.stdout)
    return document


def test_compose_has_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "rabbitmq", "migrate", "grant-relay-role", "relay", "producer"} <= set(
        services
    )
    assert services["rabbitmq"]["image"].endswith("-management")
    assert any(str(p["target"]) == "15672" for p in services["rabbitmq"]["ports"])


def test_compose_migrates_before_the_relay_starts(compose: dict[str, Any]) -> None:
    services = compose["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    grant = services["grant-relay-role"]
    assert grant["command"][0] == "grant-relay-role"
    assert grant["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    relay = services["relay"]
    assert relay["depends_on"]["grant-relay-role"]["condition"] == "service_completed_successfully"
    assert relay["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert (
        services["producer"]["depends_on"]["migrate"]["condition"]
        == "service_completed_successfully"
    )


def test_compose_relay_health_check_calls_livez_on_the_http_port(compose: dict[str, Any]) -> None:
    relay = compose["services"]["relay"]
    assert relay["command"] == ["relay"]
    assert relay["environment"]["OUTBOX_HTTP_PORT"] == str(RELAY_HTTP_PORT)
    test = relay["healthcheck"]["test"]
    assert test[0] == "CMD"  # exec form: no shell needed in the image
    assert f"http://127.0.0.1:{RELAY_HTTP_PORT}/livez" in " ".join(test)
    assert any(int(p["target"]) == RELAY_HTTP_PORT for p in relay["ports"])


def test_compose_services_read_urls_from_secret_files(compose: dict[str, Any]) -> None:
    services = compose["services"]
    relay = services["relay"]
    assert relay["environment"]["OUTBOX_SECRETS_DIR"] == "/run/secrets"
    assert {s["target"] for s in relay["secrets"]} == {"database_url", "broker_url"}
    for service in services.values():
        for name, value in service.get("environment", {}).items():
            assert "://" not in str(value), f"{name} holds a URL in plain text"
    for name, secret in compose["secrets"].items():
        assert Path(secret["file"]).is_file(), name
    # The relay connects as its own least-privilege role, created by the init script.
    relay_url = (ROOT / "examples/compose/secrets/relay_database_url").read_text().strip()
    role = urlsplit(relay_url).username
    assert role == services["grant-relay-role"]["command"][1]
    init_sql = (ROOT / "examples/compose/initdb/10-relay-role.sql").read_text()
    assert f"CREATE ROLE {role} LOGIN" in init_sql


def test_compose_example_services_run_the_example_scripts(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("producer", "consumer"):
        entrypoint = services[name]["entrypoint"]
        script = entrypoint[-1]
        mount = next(v for v in services[name]["volumes"] if v.endswith(":ro"))
        host, container, _ = mount.rsplit(":", 2)
        assert script.startswith(container + "/")
        assert (Path(host) / script.removeprefix(container + "/")).is_file()


# -- Dockerfile -------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_runs_as_a_non_root_user() -> None:
    instructions = _dockerfile()
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "no USER instruction: the relay would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    last_user = max(i for i, (k, _) in enumerate(instructions) if k == "USER")
    assert all(k != "RUN" for k, _ in instructions[last_user:]), "RUN after USER runs as the user"


def test_dockerfile_entrypoint_is_exec_form_so_sigterm_reaches_the_relay() -> None:
    instructions = dict(_dockerfile())
    entrypoint = json.loads(instructions["ENTRYPOINT"])  # exec form is a JSON array
    assert entrypoint == ["outbox"]
    assert json.loads(instructions["CMD"]) == ["relay"]


def test_dockerfile_installs_the_project_with_pip() -> None:
    runs = [args for keyword, args in _dockerfile() if keyword == "RUN"]
    assert any(re.search(r"pip install \"?\.(\[[a-z,]+\])?\"?", run) for run in runs)
    copied = {args.split()[0].rstrip("/") for keyword, args in _dockerfile() if keyword == "COPY"}
    assert {"outbox", "migrations"} <= copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


# -- Kubernetes example -------------------------------------------------------------


def _kubernetes_documents() -> list[dict[str, Any]]:
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert blocks
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _kubernetes_documents() if d["kind"] == kind]


def test_kubernetes_relay_is_a_native_sidecar_with_probes() -> None:
    (deployment,) = _by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "outbox-relay"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["args"] == ["relay"]
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert env["OUTBOX_HTTP_PORT"] == str(RELAY_HTTP_PORT)
    port = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert port[sidecar["livenessProbe"]["httpGet"]["port"]] == RELAY_HTTP_PORT
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"], "the service container itself"


def test_kubernetes_secrets_are_mounted_as_files() -> None:
    (deployment,) = _by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "outbox-relay"]
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    secrets_dir = env["OUTBOX_SECRETS_DIR"]
    assert all("://" not in str(value) for value in env.values())
    mount = next(m for m in sidecar["volumeMounts"] if m["mountPath"] == secrets_dir)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    secret = next(
        s for s in _by_kind("Secret") if s["metadata"]["name"] == volume["secret"]["secretName"]
    )
    assert {"database_url", "broker_url"} <= set(secret["stringData"])
    # The CA named by a setting is mounted too.
    ca_dir = str(Path(env["OUTBOX_BROKER_SSL_CA"]).parent)
    assert any(m["mountPath"] == ca_dir for m in sidecar["volumeMounts"])


def test_kubernetes_migration_job_runs_migrate_then_grants() -> None:
    (job,) = _by_kind("Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert [c["args"][0] for c in pod["initContainers"]] == ["migrate"]
    assert [c["args"][0] for c in pod["containers"]] == ["grant-relay-role"]
    for container in pod["initContainers"] + pod["containers"]:
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["OUTBOX_DATABASE_URL_FILE"].startswith("/run/secrets/")


# -- the example producer ---------------------------------------------------------------


def _load_example(name: str) -> ModuleType:
    path = ROOT / "examples" / "producer" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_example_producer_writes_events_through_the_session_hooks(pg_engine: Engine) -> None:
    producer = _load_example("producer")
    assert producer.run(pg_engine, count=9, interval=0) == 9
    with pg_engine.connect() as connection:
        rows = connection.execute(
            select(table.event.c.payload, table.event.c.ordering_key).order_by(
                table.event.c.position
            )
        ).all()
    assert len(rows) == 9  # one event per change, written in the producer's transactions
    events = [json.loads(r.payload) for r in rows]
    assert events[0]["action"] == "create"
    assert {e["action"] for e in events} >= {"create", "update"}
    assert all(e["resource"]["schema"] == producer.SCHEMA for e in events)
