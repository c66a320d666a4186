"""docker-compose.yml and the Dockerfile, checked as text: no Docker engine runs here.

What is checked is what a typo would break silently at deploy time: a setting the
code never reads, clients that disagree on the broker, an evicting broker, Flower
without authentication, a tool missing from the image; and the deployment's defences
(README, "Threat model"): Redis with a password and no published port, Flower on the
loopback only, a worker that is not privileged and gets only the devices it needs.
The two entrypoint scripts (Redis's password, the worker's loop device nodes) are run
for real, with the redis-server and the kernel of this machine.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from vmcraft_tasks.embedded.redis import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
SETUP_SH = ROOT / "scripts" / "setup.sh"
SETTINGS_SOURCES = (
    ROOT / "vmcraft_tasks" / "config.py",
    ROOT / "vmcraft_tasks" / "craft" / "settings.py",
)
CLIENTS = ("worker", "flower", "scheduler")
REDISES = ("redis", "redis-cache")
PASSWORD_REF = "${REDIS_PASSWORD:?"  # required: no default password in this file
NOT_IN_IMAGE = {
    "redis-server",  # Redis has its own containers
    "libvirt-clients",  # no virsh: the domain XML is a file
    # Only the tests build and boot sample guests.
    "debootstrap",
    "qemu-system-x86",
    "seabios",
    "ipxe-qemu",
    "busybox-static",
}

VMCRAFT_VAR = re.compile(r"VMCRAFT_[A-Z_]+")
# ${NAME...} that compose interpolates at deploy time; $${NAME} is left to the container.
COMPOSE_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")


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


def devices_of(service: dict[str, Any]) -> dict[str, str]:
    """{container path: host path} of a service's `devices` ("host[:container[:perms]]")."""
    out = {}
    for device in service.get("devices") or []:
        parts = str(device).split(":")
        out[parts[1] if len(parts) > 1 else parts[0]] = parts[0]
    return out


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([?-])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """What compose makes of `text` with this .env: ${V}, ${V:-default}, ${V-default},
    ${V:?error} (raises ValueError), ${V?error}; "$$" stays for the container."""

    def one(match: re.Match[str]) -> str:
        name, colon, kind, arg = match.groups()
        value = env.get(name)
        missing = value is None or (colon == ":" and value == "")
        if kind == "?" and missing:
            raise ValueError(f"{name}: {arg}")
        if kind == "-" and missing:
            return arg
        return value or ""

    parts = text.split("$$")
    return "$$".join(_INTERPOLATION.sub(one, part) for part in parts)


def runtime_script(text: str) -> str:
    """A compose string as the container's shell gets it: "$$" becomes "$". Any other
    "$" would be interpolated by compose at deploy time, putting a secret into the
    container's command line, so it is refused here."""
    assert not re.search(r"\$(?!\$)", text.replace("$$", "")), f"unescaped $ in {text!r}"
    return text.replace("$$", "$")


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
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


# --------------------------------------------------------------------------- the helpers


def test_helpers_interpolate_as_compose_does():
    env = {"A": "1", "E": ""}
    assert interpolate("${A} ${A:-2} ${B:-2} ${E:-3} ${E-4} $${A}", env) == "1 1 2 3  $${A}"
    with pytest.raises(ValueError, match="B: set it"):
        interpolate("x${B:?set it}", env)
    with pytest.raises(ValueError):
        interpolate("${E:?empty is missing}", env)


def test_helpers_read_devices_and_runtime_scripts():
    assert devices_of({"devices": ["/dev/fuse", "/dev/loop0:/dev/loop0:rwm", "/a:/b"]}) == {
        "/dev/fuse": "/dev/fuse",
        "/dev/loop0": "/dev/loop0",
        "/b": "/a",
    }
    assert runtime_script('echo "$$X" $$((1 + 1))') == 'echo "$X" $((1 + 1))'
    with pytest.raises(AssertionError):
        runtime_script("echo $X")
    with pytest.raises(AssertionError):
        runtime_script("echo ${X:-1}")


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
    service = {
        "volumes": [
            "${D:-./i}:/data:ro",
            "v:/run/x",
            "/a:/b:rw,z",
            {"type": "bind", "source": "/s", "target": "/t", "read_only": True},
        ]
    }
    assert mount_options(service, "/data") == {"ro"}
    assert mount_options(service, "/run/x") == set()
    assert mount_options(service, "/b") == {"rw", "z"}
    assert mount_options(service, "/t") == {"ro"}


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
    dotenv = {"REDIS_PASSWORD": "pw-from-the-env-file"}
    env = {
        k: interpolate(v, dotenv)
        for k, v in envs["worker"].items()
        if k.endswith(("_URL", "_BACKEND"))
    }
    broker = urlparse(env["VMCRAFT_BROKER_URL"])
    results = urlparse(env["VMCRAFT_RESULT_BACKEND"])
    cache = urlparse(env["VMCRAFT_CACHE_URL"])
    assert broker.scheme == results.scheme == cache.scheme == "redis"
    assert broker.hostname == results.hostname == "redis"
    assert broker.path != results.path  # Celery results in their own database
    assert cache.hostname == "redis-cache"
    # Every URL logs in with the password from .env, which must be set.
    for url in (broker, results, cache):
        assert url.username in (None, "")
        assert url.password == "pw-from-the-env-file", url.geturl()
    for key, value in envs["worker"].items():
        if key.endswith(("_URL", "_BACKEND")):
            assert PASSWORD_REF in value, key
            with pytest.raises(ValueError, match="REDIS_PASSWORD"):
                interpolate(value, {})


# --------------------------------------------------------------------------- worker devices


def test_no_service_is_privileged_or_sees_the_hosts_dev(services):
    for name, service in services.items():
        assert not service.get("privileged"), name
        for target, source in mounts_of(service).items():
            assert not target.startswith("/dev") and not source.startswith("/dev"), name
        assert service.get("pid") != "host" and service.get("network_mode") != "host", name
        assert service.get("ipc") != "host", name


def test_worker_gets_fuse_loop_control_and_loop_devices_only(services):
    worker = services["worker"]
    assert devices_of(worker) == {
        "/dev/fuse": "/dev/fuse",
        "/dev/loop-control": "/dev/loop-control",
    }
    # Loop devices are block devices of major 7; nothing else (no sdX, no nbd, no mem).
    assert worker.get("device_cgroup_rules") == ["b 7:* rmw"]
    assert worker.get("cap_add") == ["SYS_ADMIN"]
    # Only the worker gets devices or capabilities.
    for name, service in services.items():
        if name != "worker":
            assert not service.get("devices") and not service.get("device_cgroup_rules"), name
            assert not service.get("cap_add"), name


def test_every_service_runs_with_no_new_privileges(services):
    for name, service in services.items():
        assert "no-new-privileges:true" in (service.get("security_opt") or []), name
    worker_opts = set(services["worker"]["security_opt"])
    # What mount(2) and bubblewrap need, and nothing that unmasks /proc or /sys.
    assert worker_opts <= {"no-new-privileges:true", "apparmor:unconfined", "seccomp:unconfined"}
    for name, service in services.items():
        for opt in service.get("security_opt") or []:
            assert not opt.startswith("systempaths"), name
            if name != "worker":
                assert not opt.endswith("unconfined"), name


def _stat_loops(dev: Path) -> dict[str, tuple[int, int, int, bool]]:
    out = {}
    for path in sorted(dev.glob("loop*")):
        st = path.lstat()
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        out[path.name] = (major, minor, stat.S_IMODE(st.st_mode), stat.S_ISBLK(st.st_mode))
    return out


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1)"
)
def test_worker_entrypoint_makes_the_loop_nodes_then_runs_the_worker(services, tmp_path):
    """The entrypoint as the container runs it, in a private mount namespace whose /dev
    is an empty tmpfs, as a container's /dev is before the devices are added."""
    worker = services["worker"]
    argv = [str(a) for a in worker["entrypoint"]]
    assert argv[:2] == ["sh", "-ec"]
    script = runtime_script(argv[2])
    out = tmp_path / "after"
    # Inside: an empty /dev, then the entrypoint with a probe as the "worker" command,
    # which copies what /dev holds to a real directory for the checks below.
    wrapper = (
        'mount -t tmpfs tmpfs /dev && exec sh -ec "$1" worker-entrypoint '
        "sh -c 'cp -a /dev/loop* \"$OUT\"/ && echo worker-ran'"
    )
    out.mkdir()
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", wrapper, "x", script],
        env={"PATH": os.environ["PATH"], "WORKER_LOOP_DEVICES": "5", "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "worker-ran"  # `exec "$@"`: the command ran last
    loops = _stat_loops(out)
    assert loops == {f"loop{i}": (7, i, 0o660, True) for i in range(5)}
    # The entrypoint's command line is the one compose runs: the worker's `command`.
    assert argv_of(worker)[:4] == ["celery", "-A", "vmcraft_tasks", "worker"]


def mount_options(service: dict[str, Any], target: str) -> set[str]:
    """The options of the volume at `target`: "src:target:ro,z" gives {"ro", "z"}; the
    long syntax's `read_only: true` gives {"ro"}."""
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("target") == target:
                return {"ro"} if volume.get("read_only") else set()
            continue
        text = str(volume)
        # Past the source, which may be a ${VAR:-default} holding a colon.
        rest = text.partition("}:")[2] if text.startswith("${") else text.partition(":")[2]
        path, _, options = rest.partition(":")
        if path == target:
            return set(filter(None, options.split(",")))
    raise AssertionError(f"no volume at {target}")


def test_worker_paths_match_its_mounts(services):
    worker = services["worker"]
    env, mounts = env_of(worker), mounts_of(worker)
    assert env["VMCRAFT_WORK_DIR"] in mounts
    for key in ("VMCRAFT_IMAGE_ROOTS", "VMCRAFT_OUTPUT_ROOTS"):
        for root in env[key].split(":"):
            assert root in mounts, key
    assert env["VMCRAFT_HOST_ID"].startswith("${HOSTNAME")


def test_sources_are_read_only_and_outputs_writable_wherever_mounted(services):
    for name in ("worker", "scheduler"):
        service = services[name]
        env = env_of(service)
        for root in env["VMCRAFT_IMAGE_ROOTS"].split(":"):
            assert "ro" in mount_options(service, root), (name, root)
        for root in env["VMCRAFT_OUTPUT_ROOTS"].split(":"):
            assert "ro" not in mount_options(service, root), (name, root)
        # Sources and outputs never share a folder: a read-only source stays so.
        assert not set(env["VMCRAFT_IMAGE_ROOTS"].split(":")) & set(
            env["VMCRAFT_OUTPUT_ROOTS"].split(":")
        )


def test_scheduler_sees_images_and_outputs_at_the_workers_paths(services):
    worker, scheduler = mounts_of(services["worker"]), mounts_of(services["scheduler"])
    assert scheduler["/data"] == worker["/data"]
    assert scheduler["/output"] == worker["/output"]
    for key in ("VMCRAFT_IMAGE_ROOTS", "VMCRAFT_OUTPUT_ROOTS"):
        assert env_of(services["scheduler"])[key] == env_of(services["worker"])[key]


def test_app_commands(services):
    assert argv_of(services["worker"])[:4] == ["celery", "-A", "vmcraft_tasks", "worker"]
    flower = argv_of(services["flower"])
    assert flower[:4] == ["celery", "-A", "vmcraft_tasks", "flower"]
    assert "--port=5555" in flower


# --------------------------------------------------------------------------- redis


def test_broker_redis_persists_and_never_evicts(services):
    argv = argv_of(services["redis"])
    assert argv[0] == "redis-server"
    assert option(argv, "--appendonly") == "yes"
    assert option(argv, "--maxmemory-policy") == "noeviction"
    assert "/data" in mounts_of(services["redis"])  # the append-only file outlives the container


def test_redis_publishes_no_port_and_lives_on_an_internal_network(compose, services):
    networks = compose.get("networks") or {}
    for name in REDISES:
        redis = services[name]
        assert not redis.get("ports"), f"{name} publishes a port"
        assert redis.get("networks"), name
        for network in redis["networks"]:
            assert (networks.get(network) or {}).get("internal") is True, (name, network)
    # Every client reaches Redis on that network.
    for name in CLIENTS:
        assert set(services["redis"]["networks"]) & set(services[name]["networks"]), name


def test_only_flower_publishes_a_port_and_only_on_the_loopback(services):
    for name, service in services.items():
        if name != "flower":
            assert not service.get("ports"), name
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]


def test_redis_password_comes_from_the_env_file_never_from_a_command_line(services):
    for name in REDISES:
        redis = services[name]
        env = env_of(redis)
        assert env["REDIS_PASSWORD"].startswith(PASSWORD_REF), name
        assert env["REDISCLI_AUTH"].startswith(PASSWORD_REF), name
        # Compose-time "${REDIS_PASSWORD}" in a command would show in the host's `ps`.
        for key in ("command", "entrypoint"):
            for arg in redis.get(key) or []:
                assert "${REDIS_PASSWORD" not in str(arg).replace("$${", ""), (name, key)
                runtime_script(str(arg))
        for arg in redis["healthcheck"]["test"]:
            assert "${REDIS_PASSWORD" not in str(arg), name
        script = runtime_script(str(redis["entrypoint"][2]))
        assert "requirepass $REDIS_PASSWORD" in script
        assert 'exec docker-entrypoint.sh "$@" -' in script  # "-": config from stdin


class _Redis:
    def __init__(self, proc: subprocess.Popen[Any], port: int, password: str) -> None:
        self.proc, self.port, self.password = proc, port, password

    def cli(self, *args: str, password: str | None = None) -> str:
        env = {"PATH": os.environ["PATH"]}
        if password:
            env["REDISCLI_AUTH"] = password
        proc = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return (proc.stdout + proc.stderr).strip()


def _fake_image_entrypoint(bindir: Path) -> None:
    """The official image's docker-entrypoint.sh drops to the redis user, then runs its
    arguments; here only the second part, on this machine's redis-server."""
    bindir.mkdir(exist_ok=True)
    script = bindir / "docker-entrypoint.sh"
    script.write_text('#!/bin/sh\nexec "$@"\n')
    script.chmod(0o755)


def _start_redis_as_compose_does(
    service: dict[str, Any], tmp_path: Path, password: str
) -> tuple[subprocess.Popen[str], int]:
    bindir = tmp_path / "bin"
    _fake_image_entrypoint(bindir)
    port = free_port()
    entrypoint = [runtime_script(str(a)) for a in service["entrypoint"]]
    # The service's own command, kept private to this test: a free port, loopback only,
    # its files in tmp_path.
    command = [*argv_of(service), "--port", str(port), "--bind", "127.0.0.1"]
    command += ["--dir", str(tmp_path)]
    env = {
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "REDIS_PASSWORD": password,
        "REDISCLI_AUTH": password,
    }
    proc = subprocess.Popen(
        [*entrypoint, *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, port


@pytest.fixture
def compose_redis(services, tmp_path) -> Iterator[_Redis]:
    """The `redis` service's entrypoint and command, run on this machine."""
    password = "a" * 8 + "-Good.Password~0123456789"
    proc, port = _start_redis_as_compose_does(services["redis"], tmp_path, password)
    redis = _Redis(proc, port, password)
    try:
        deadline = time.monotonic() + 10
        while redis.cli("ping", password=password) != "PONG":
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)
        yield redis
    finally:
        proc.terminate()
        proc.wait(timeout=10)


needs_redis = pytest.mark.skipif(
    not (shutil.which("redis-server") and shutil.which("redis-cli")),
    reason="needs redis-server and redis-cli",
)


@needs_redis
def test_the_redis_entrypoint_starts_a_redis_that_requires_the_password(compose_redis):
    assert compose_redis.cli("ping").startswith("NOAUTH")
    assert "WRONGPASS" in compose_redis.cli("ping", password="not-the-password-at-all-x")
    assert compose_redis.cli("ping", password=compose_redis.password) == "PONG"
    # Nothing in its command line names the password (host users can read argv).
    with open(f"/proc/{compose_redis.proc.pid}/cmdline", "rb") as fh:
        assert compose_redis.password.encode() not in fh.read()
    # The service's own settings still hold: persistence, no eviction.
    config = compose_redis.cli("config", "get", "appendonly", password=compose_redis.password)
    assert config.split() == ["appendonly", "yes"]


def _healthcheck(service: dict[str, Any], port: int, password: str, tmp_path: Path) -> int:
    """The service's healthcheck command, with redis-cli pointed at the test's port."""
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    bindir = tmp_path / "cli"
    bindir.mkdir(exist_ok=True)
    cli = bindir / "redis-cli"
    cli.write_text(f'#!/bin/sh\nexec {shutil.which("redis-cli")} -p {port} "$@"\n')
    cli.chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "REDISCLI_AUTH": password}
    return subprocess.run(["sh", "-c", test[1]], env=env, timeout=20, check=False).returncode


@needs_redis
def test_the_healthcheck_passes_only_for_a_redis_that_requires_the_password(
    services, compose_redis, tmp_path
):
    redis = services["redis"]
    assert _healthcheck(redis, compose_redis.port, compose_redis.password, tmp_path) == 0
    # The same check against a Redis without a password fails: no client would start.
    port = free_port()
    bare = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 10
        while _Redis(bare, port, "").cli("ping") != "PONG":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _healthcheck(redis, port, compose_redis.password, tmp_path) != 0
    finally:
        bare.terminate()
        bare.wait(timeout=10)


@needs_redis
@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("short-password", "at least 24 characters"),
        ("a-long-enough-password-but@with/url:chars", "use only"),
        ("a long enough password with spaces in it", "use only"),
        ("", "at least 24 characters"),
    ],
)
def test_the_redis_entrypoint_refuses_weak_or_unusable_passwords(
    services, tmp_path, password, reason
):
    proc, _ = _start_redis_as_compose_does(services["redis-cache"], tmp_path, password)
    try:
        output, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 64
    assert f"REDIS_PASSWORD: {reason}" in output


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
    env = env_of(services["flower"])
    value = env.get("FLOWER_BASIC_AUTH", "")
    assert value.startswith("${FLOWER_BASIC_AUTH")
    # Required (":?"), never a default password written in this file (":-").
    assert ":?" in value
    assert ":-" not in value
    assert "FLOWER_UNAUTHENTICATED_API" not in env


def test_flower_has_no_capabilities(services):
    assert services["flower"].get("cap_drop") == ["ALL"]


# --------------------------------------------------------------------------- .env.example


def env_example_names() -> dict[str, str]:
    """NAME -> value of every `NAME=value` line of .env.example."""
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if match:
            out[match.group(1)] = match.group(2)
    return out


def test_env_example_documents_every_variable_compose_reads():
    used = set(COMPOSE_VAR.findall(COMPOSE.read_text()))
    assert {"REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "IMAGES_DIR"} <= used  # regex sanity
    documented = env_example_names()
    assert used <= set(documented), f"not in .env.example: {sorted(used - set(documented))}"
    assert set(documented) <= used, f"not read by compose: {sorted(set(documented) - used)}"


def test_env_example_holds_no_secret():
    values = env_example_names()
    assert values["REDIS_PASSWORD"] == ""
    assert values["FLOWER_BASIC_AUTH"] == ""
    # Each variable is explained by a comment above it.
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Za-z_]+=", line):
            assert lines[i - 1].startswith("#"), line


# --------------------------------------------------------------------------- image


def test_dockerfile_bakes_in_no_secret():
    for word, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if word in ("ENV", "ARG"):
            assert not re.search(r"PASS|SECRET|TOKEN|AUTH", args, re.I), args
        if word in ("COPY", "ADD"):
            assert ".env" not in args.split()[:-1], args


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
