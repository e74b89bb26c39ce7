"""Deployment files: docker-compose.yml, Dockerfile, the Kubernetes example, the example producer.

No container engine is needed: docker-compose v1 validates the compose file
(CI installs it into .venv-compose and exports OUTBOX_DOCKER_COMPOSE), and the
Dockerfile and the manifests are parsed. So are the examples of the pages
about deployment (docs/deployment.md, docs/kubernetes.md): every YAML block is
loaded, every shell block is checked by ``bash -n``, and every ``outbox``
command line in either is parsed by the ``outbox`` command's own parser.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy import Engine, select

from outbox.cli import settings
from outbox.cli.main import build_parser
from outbox.store import table
from tests.docblocks import code_blocks, outbox_argv, shell_commands
from tests.paths import ROOT

ROOT = ROOT
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
    blocks = code_blocks("kubernetes.md")
    assert blocks
    assert {b.language for b in blocks} == {"yaml"}, "a block this test would not read"
    return [doc for block in blocks for doc in yaml.safe_load_all(block.code) if doc]


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


def _pods() -> dict[str, dict[str, Any]]:
    """Every Pod spec of the page, by the name of the workload holding it."""
    pods = {}
    for document in _kubernetes_documents():
        spec = document.get("spec", {})
        if "template" in spec:
            pods[f"{document['kind']} {document['metadata']['name']}"] = spec["template"]["spec"]
    return pods


def _containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def unreadable_secrets(pod: dict[str, Any]) -> list[str]:
    """The Secret files a container of ``pod`` mounts but could not read.

    As the kubelet writes them: owned by root, with group ``fsGroup`` when the Pod
    sets one (else root), with the item's ``mode``, else the volume's
    ``defaultMode`` (0644 when unset). A container runs as ``runAsUser`` with the
    groups ``runAsGroup``, ``fsGroup`` and ``supplementalGroups`` (its own
    securityContext overrides the Pod's). Root is the files' owner: with every
    capability dropped it, too, reads by the owner bits. The kubelet also adds
    group read to every mode when ``fsGroup`` is set (kubernetes/kubernetes#57923);
    this does not count on that, so that the mode a manifest states is the mode
    its files need.
    """
    context = pod.get("securityContext", {})
    fs_group = context.get("fsGroup")
    secrets = {v["name"]: v["secret"] for v in pod.get("volumes", []) if "secret" in v}
    problems = []
    for container in _containers(pod):
        mounts = [m for m in container.get("volumeMounts", []) if m["name"] in secrets]
        own = {**context, **container.get("securityContext", {})}
        uid = own.get("runAsUser")
        if mounts and uid is None:
            problems.append(f"{container['name']}: no runAsUser, so the reader is unknown")
            continue
        groups = {own.get("runAsGroup"), fs_group, *context.get("supplementalGroups", [])}
        file_group = 0 if fs_group is None else fs_group
        for mount in mounts:
            secret = secrets[mount["name"]]
            default = secret.get("defaultMode", 0o644)
            for item in secret.get("items") or [{"path": "(every key)"}]:
                mode = item.get("mode", default)
                if uid == 0:
                    bits = mode >> 6
                elif file_group in groups:
                    bits = mode >> 3
                else:
                    bits = mode
                if not bits & 0o4:
                    member = sorted(g for g in groups if g is not None)
                    problems.append(
                        f"{container['name']}: {mount['mountPath']}/{item['path']} of Secret "
                        f"{secret['secretName']!r} is mode {mode:04o}, owner root:{file_group}; "
                        f"unreadable by uid {uid} with groups {member}"
                    )
    return problems


def test_the_readability_check_finds_a_secret_only_root_may_read() -> None:
    """The migration Job: mode 0400, runAsUser 10001, no fsGroup."""
    job = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
        "initContainers": [
            {"name": "migrate", "volumeMounts": [{"name": "s", "mountPath": "/run/secrets/o"}]}
        ],
        "volumes": [{"name": "s", "secret": {"secretName": "owner", "defaultMode": 0o400}}],
    }
    (problem,) = unreadable_secrets(job)
    assert "migrate: /run/secrets/o/(every key) of Secret 'owner' is mode 0400" in problem
    job["securityContext"]["fsGroup"] = 10001
    assert unreadable_secrets(job) != []  # root:10001, but 0400 gives the group nothing
    job["volumes"][0]["secret"]["defaultMode"] = 0o440
    assert unreadable_secrets(job) == []
    job["volumes"][0]["secret"]["items"] = [{"key": "k", "path": "k", "mode": 0o600}]
    assert unreadable_secrets(job) != []  # an item's mode wins over defaultMode
    del job["securityContext"]["fsGroup"]
    job["securityContext"]["runAsUser"] = 0
    assert unreadable_secrets(job) == []  # root owns the files


def test_kubernetes_containers_can_read_the_secrets_they_mount() -> None:
    pods = _pods()
    assert set(pods) == {"Job cases-outbox-migrate", "Deployment cases"}
    for name, pod in pods.items():
        readers = [c for c in _containers(pod) if c.get("volumeMounts")]
        assert readers, f"{name}: no container mounts a secret"
        assert unreadable_secrets(pod) == [], name


def test_kubernetes_containers_run_outbox_commands_with_known_settings() -> None:
    """Each container of the relay image runs a command line that `outbox` accepts, with
    environment variables that are settings of that command (others would be ignored)."""
    known = {s.env: s for s in settings.SETTINGS}
    known |= {s.env + "_FILE": s for s in settings.SETTINGS if s.secret}
    checked = 0
    for name, pod in _pods().items():
        for container in _containers(pod):
            if "outbox-relay" not in container["image"]:
                continue
            checked += 1
            args = build_parser().parse_args(container["args"])  # exits (status 2) if refused
            for variable in (e["name"] for e in container.get("env", [])):
                assert variable in known, f"{name}/{container['name']}: unknown {variable}"
                assert settings.applies_to(known[variable], args.command), (
                    f"{name}/{container['name']}: {variable} is not read by {args.command}"
                )
    assert checked == 3  # migrate, grant-relay-role, the relay sidecar


# -- docs/deployment.md: its shell examples, its words about the image ----------------


def test_deployment_shell_examples_name_what_exists() -> None:
    """The image, services, settings and ports its commands name
    (tests/acceptance/test_docs_examples.py checks their syntax and their `outbox` arguments)."""
    blocks = code_blocks("deployment.md")
    assert blocks and {b.language for b in blocks} == {"bash"}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    instructions = _dockerfile()
    exposed = {args.split("/")[0] for keyword, args in instructions if keyword == "EXPOSE"}
    known = {s.env for s in settings.SETTINGS}
    known |= {s.env + "_FILE" for s in settings.SETTINGS if s.secret}
    images: list[str] = []
    outbox_lines = 0
    for block in blocks:
        for command in shell_commands(block.code):
            if command[:2] == ["docker", "build"]:
                assert command[-1] == "." and (ROOT / "Dockerfile").is_file()
                images.append(command[command.index("-t") + 1])
            if command[:2] == ["docker", "compose"] and command[2] in ("exec", "stop", "start"):
                assert command[3] in compose["services"], command
            if command[:2] == ["docker", "run"]:
                values = [command[i + 1] for i, word in enumerate(command[:-1]) if word == "-e"]
                assert {v.split("=")[0] for v in values} <= known, command
                published = [command[i + 1] for i, word in enumerate(command[:-1]) if word == "-p"]
                assert {p.split(":")[-1] for p in published} <= exposed, command
            if outbox_argv(command, images[0] if images else "outbox-relay") is not None:
                outbox_lines += 1
            if command[0] == "curl":
                assert f"localhost:{RELAY_HTTP_PORT}/" in command[-1], command
    assert images == ["outbox-relay"]
    assert outbox_lines >= 2  # `docker run ... outbox-relay`, `... exec relay outbox status`


def test_extras_named_by_the_docs_and_the_dockerfile_exist() -> None:
    """Issue 12: deployment.md and the Dockerfile named a `metrics` extra there is not."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(project["optional-dependencies"])
    texts = {
        path.relative_to(ROOT).as_posix(): path.read_text()
        for path in [ROOT / "Dockerfile", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    }
    named = {
        (where, extra.strip())
        for where, text in texts.items()
        for pattern in (r"`([\w-]+)` extras?\b", r"\.\[([\w,-]+)\]", r"\bextras? `([\w-]+)`")
        for group in re.findall(pattern, text)
        for extra in group.split(",")
    }
    assert {(where, extra) for where, extra in named if extra not in extras} == set()
    # /metrics needs prometheus-client, which the image's plain `pip install .` brings.
    assert any(d.startswith("prometheus-client") for d in project["dependencies"])
    runs = [args for keyword, args in _dockerfile() if keyword == "RUN"]
    assert any(re.search(r"pip install \.(\s|$)", run) for run in runs)


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
