"""docker-compose.yml and the Dockerfile, checked as text: no Docker engine runs here.

What is checked is what a typo would break silently at deploy time: a setting the
code never reads, clients that disagree on the broker, an evicting broker, Flower
without authentication, a tool missing from the image.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SETUP_SH = ROOT / "scripts" / "setup.sh"
SETTINGS_SOURCES = (
    ROOT / "vmcraft_tasks" / "config.py",
    ROOT / "vmcraft_tasks" / "craft" / "settings.py",
)
CLIENTS = ("worker", "flower", "scheduler")
NOT_IN_IMAGE = {"redis-server", "libvirt-clients"}  # Redis has its own containers; no virsh

VMCRAFT_VAR = re.compile(r"VMCRAFT_[A-Z_]+")


# --------------------------------------------------------------------------- helpers (pure)


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whichever of the two compose forms it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def argv_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def option(argv: list[str], name: str) -> str | None:
    """The value after `name` in a redis-server command line."""
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


def mounts_of(service: dict[str, Any]) -> dict[str, str]:
    """{target: source} of a service's volumes (short or long syntax)."""
    out = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            out[str(volume["target"])] = str(volume.get("source", ""))
        else:
            parts = str(volume).split(":")
            # "source:target[:mode]"; a source may hold a ${VAR:-default} with a colon.
            if parts[0].startswith("${"):
                head, _, rest = str(volume).partition("}:")
                parts = [head + "}", *rest.split(":")]
            out[parts[1]] = parts[0]
    return out


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def apt_installed(text: str) -> set[str]:
    """Packages named by every `apt-get install` in the Dockerfile's RUN instructions."""
    packages: set[str] = set()
    for instruction, args in dockerfile_instructions(text):
        if instruction != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            words = shlex.split(command)
            if "apt-get" in words and "install" in words:
                after = words[words.index("install") + 1 :]
                packages |= {w for w in after if not w.startswith("-")}
    return packages


def setup_sh_packages(text: str) -> set[str]:
    match = re.search(r"APT_PACKAGES=\((.*?)\)", text, re.S)
    assert match, "APT_PACKAGES=( ... ) not found in scripts/setup.sh"
    body = "\n".join(line.split("#", 1)[0] for line in match.group(1).splitlines())
    return set(body.split())


def settings_read_by_code() -> set[str]:
    return {name for path in SETTINGS_SOURCES for name in VMCRAFT_VAR.findall(path.read_text())}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict[str, Any]]:
    return compose["services"]


# --------------------------------------------------------------------------- the helpers


def test_helpers_read_both_compose_forms():
    assert env_of({"environment": ["A=1", "B=x=y", "C"]}) == {"A": "1", "B": "x=y", "C": ""}
    assert env_of({"environment": {"A": 1, "B": None}}) == {"A": "1", "B": ""}
    assert argv_of({"command": "celery -A x worker"}) == ["celery", "-A", "x", "worker"]
    assert mounts_of({"volumes": ["/dev:/dev", "${D:-./i}:/data:ro", "v:/run/x"]}) == {
        "/dev": "/dev",
        "/data": "${D:-./i}",
        "/run/x": "v",
    }
    assert mounts_of({"volumes": [{"type": "bind", "source": "/dev", "target": "/dev"}]}) == {
        "/dev": "/dev"
    }


def test_helpers_parse_apt_lists():
    dockerfile = (
        "FROM x\n# apt-get install nope\nRUN apt-get update \\\n"
        " && apt-get install -y --no-install-recommends a \\\n   b && rm -rf /y\n"
    )
    assert apt_installed(dockerfile) == {"a", "b"}
    assert setup_sh_packages("APT_PACKAGES=(\n  a b # c\n  d\n)\n") == {"a", "b", "d"}


# --------------------------------------------------------------------------- compose structure


def test_compose_has_the_five_services(services):
    assert set(services) == {"redis", "redis-cache", "worker", "flower", "scheduler"}


def test_every_service_has_an_image_or_a_build(services):
    for name, service in services.items():
        assert isinstance(service, dict), name
        assert service.get("image") or service.get("build"), f"{name}: neither image nor build"


def test_the_app_services_are_built_from_this_repository(services):
    for name in CLIENTS:
        assert services[name].get("build") == ".", name
    # One image tag: the three services run the same build.
    assert len({services[name].get("image") for name in CLIENTS}) == 1


def test_dependencies_and_named_volumes_exist(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for dependency in service.get("depends_on") or []:
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for source in mounts_of(service).values():
            if not source.startswith(("/", ".", "$", "~")):
                assert source in declared, f"{name}: volume {source} is not declared"


# --------------------------------------------------------------------------- settings


def test_compose_uses_only_settings_the_code_reads():
    known = settings_read_by_code()
    assert {"VMCRAFT_BROKER_URL", "VMCRAFT_HOST_ID", "VMCRAFT_WORK_DIR"} <= known  # regex sanity
    used = set(VMCRAFT_VAR.findall(COMPOSE.read_text()))
    assert used, "compose sets no VMCRAFT_* variable"
    assert used <= known, f"not read by the code: {sorted(used - known)}"


def test_clients_agree_on_broker_results_and_cache(services):
    envs = {name: env_of(services[name]) for name in CLIENTS}
    for key in ("VMCRAFT_BROKER_URL", "VMCRAFT_RESULT_BACKEND", "VMCRAFT_CACHE_URL"):
        values = {name: env.get(key) for name, env in envs.items()}
        assert len(set(values.values())) == 1, f"{key} differs: {values}"
        assert None not in values.values(), f"{key} missing: {values}"
    env = envs["worker"]
    broker = urlparse(env["VMCRAFT_BROKER_URL"])
    results = urlparse(env["VMCRAFT_RESULT_BACKEND"])
    cache = urlparse(env["VMCRAFT_CACHE_URL"])
    assert broker.scheme == results.scheme == cache.scheme == "redis"
    assert broker.hostname == results.hostname == "redis"
    assert broker.path != results.path  # Celery results in their own database
    assert cache.hostname == "redis-cache"


def test_worker_is_privileged_and_sees_the_live_dev(services):
    worker = services["worker"]
    assert worker.get("privileged") is True
    assert mounts_of(worker).get("/dev") == "/dev"


def test_worker_paths_match_its_mounts(services):
    worker = services["worker"]
    env, mounts = env_of(worker), mounts_of(worker)
    assert env["VMCRAFT_WORK_DIR"] in mounts
    for root in env["VMCRAFT_IMAGE_ROOTS"].split(":"):
        assert root in mounts
    assert env["VMCRAFT_HOST_ID"].startswith("${HOSTNAME")


def test_scheduler_sees_images_at_the_workers_path(services):
    assert mounts_of(services["scheduler"])["/data"] == mounts_of(services["worker"])["/data"]


def test_app_commands(services):
    assert argv_of(services["worker"])[:4] == ["celery", "-A", "vmcraft_tasks", "worker"]
    flower = argv_of(services["flower"])
    assert flower[:4] == ["celery", "-A", "vmcraft_tasks", "flower"]
    assert "--port=5555" in flower
    assert any(str(p).endswith("5555") for p in services["flower"].get("ports", []))


# --------------------------------------------------------------------------- redis


def test_broker_redis_persists_and_never_evicts(services):
    argv = argv_of(services["redis"])
    assert argv[0] == "redis-server"
    assert option(argv, "--appendonly") == "yes"
    assert option(argv, "--maxmemory-policy") == "noeviction"
    assert "/data" in mounts_of(services["redis"])  # the append-only file outlives the container


def test_cache_redis_is_a_bounded_lru_without_persistence(services):
    argv = argv_of(services["redis-cache"])
    assert argv[0] == "redis-server"
    assert (option(argv, "--maxmemory-policy") or "").endswith("-lru")
    assert option(argv, "--maxmemory")
    assert option(argv, "--save") == ""
    assert option(argv, "--appendonly") in (None, "no")
    assert not services["redis-cache"].get("volumes")


# --------------------------------------------------------------------------- flower


def test_flower_requires_basic_auth(services):
    value = env_of(services["flower"]).get("FLOWER_BASIC_AUTH", "")
    assert value.startswith("${FLOWER_BASIC_AUTH")
    # Required (":?"), never a default password written in this file (":-").
    assert ":?" in value
    assert ":-" not in value


# --------------------------------------------------------------------------- image


def test_dockerfile_base_image():
    froms = [
        args for word, args in dockerfile_instructions(DOCKERFILE.read_text()) if word == "FROM"
    ]
    assert froms == ["python:3.11-slim-bookworm"]


def test_dockerfile_installs_the_tools_setup_sh_installs():
    wanted = setup_sh_packages(SETUP_SH.read_text()) - NOT_IN_IMAGE
    assert "qemu-utils" in wanted  # the parse found the real list
    installed = apt_installed(DOCKERFILE.read_text())
    assert wanted <= installed, f"missing from the image: {sorted(wanted - installed)}"


def test_dockerfile_copies_every_package_it_installs():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    copied = {src for word, args in instructions if word == "COPY" for src in args.split()[:-1]}
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"include\s*=\s*\[(.*?)\]", pyproject, re.S)
    assert include
    packages = {p.strip().strip('"').rstrip("*") for p in include.group(1).split(",") if p.strip()}
    assert packages <= copied
    assert {"pyproject.toml", "README.md"} <= copied
    for src in copied:
        assert (ROOT / src).exists(), src
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert not copied & ignored
    assert {".git", ".venv", ".env"} <= ignored
