"""Static checks of the deployment files: Dockerfile, docker-compose.yml and .dockerignore.

No Docker engine is needed. The mistakes caught here are the ones that otherwise show up only on a
GPU host at `docker compose up`: a build target or stage that does not exist, a COPY of a path
that is missing or ignored, a dependency on a service that cannot become healthy, two workers on
one GPU, a setting name the service does not read, a root process, a secret with a default, a store
reachable from outside, a package index named in the repository.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"

CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


# ---------------------------------------------------------------- Dockerfile parsing


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        logical.append(current)
        current = ""
    if current:
        logical.append(current)
    pairs = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        pairs.append((instruction.upper(), args.strip()))
    return pairs


def parse_stages(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for instruction, args in dockerfile_instructions(text):
        if instruction == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2].lower() if len(words) == 3 and words[1].lower() == "as" else None
            assert len(words) in (1, 3), f"unreadable FROM line: FROM {args}"
            stages.append(Stage(name=name, base=words[0]))
        elif stages:
            stages[-1].instructions.append((instruction, args))
    return stages


def flags(args: str) -> tuple[dict[str, str], list[str]]:
    """`--from=x --chown=y a b c` -> ({'from': 'x', 'chown': 'y'}, ['a', 'b', 'c'])."""
    options, rest = {}, []
    for word in shlex.split(args):
        if word.startswith("--") and not rest:
            key, _, value = word[2:].partition("=")
            options[key] = value
        else:
            rest.append(word)
    return options, rest


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec (JSON) form so signals reach the process: {args}"
    return yaml.safe_load(args)


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    parsed = parse_stages(DOCKERFILE.read_text())
    assert parsed, "the Dockerfile has no FROM"
    return {s.name: s for s in parsed if s.name}


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    out = [stages[name]]
    while out[-1].base.lower() in stages:
        out.append(stages[out[-1].base.lower()])
    return out


def last(stages: dict[str, Stage], name: str, instruction: str) -> str | None:
    """The value of the last INSTRUCTION that applies to stage NAME (inherited from its bases)."""
    for stage in chain(stages, name):
        values = [args for ins, args in stage.instructions if ins == instruction]
        if values:
            return values[-1]
    return None


# ---------------------------------------------------------------- compose parsing


# Compose's interpolation: $$ (a literal $), $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
# ${VAR:?error}, ${VAR?error}, ${VAR:+alternative}, ${VAR+alternative}.
VARIABLE = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)")


class MissingVariable(Exception):
    """What `docker compose up` stops on: a required variable unset or empty."""


def strings_in(node) -> list[str]:
    """Every string value in the parsed file (comments are gone, so an example in one is no reference)."""
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings_in(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings_in(value)]
    return [node] if isinstance(node, str) else []


def references(node) -> list[tuple[str, str | None]]:
    """(variable, operator) for each interpolation in the compose file."""
    return [(m["braced"] or m["bare"], m["op"]) for text in strings_in(node) for m in VARIABLE.finditer(text)
            if m.group(0) != "$$"]


def sample_environment() -> dict[str, str]:
    """A value for each variable the compose file requires, as an operator's .env gives them."""
    required = {name for name, op in references(yaml.safe_load(COMPOSE.read_text())) if op in (":?", "?")}
    return {name: f"{name.lower().replace('_', '-')}-value" for name in sorted(required)}


DEPLOY_ENV = sample_environment()


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """VALUE as compose interpolates it with ENV (default: the required variables set, nothing else)."""
    env = DEPLOY_ENV if env is None else env

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m["braced"] or m["bare"], m["op"] or "", m["arg"] or ""
        current = env.get(name)
        missing = not current if op.startswith(":") else current is None
        if op.endswith("-"):
            return arg if missing else str(current)
        if op.endswith("?"):
            if missing:
                raise MissingVariable(f"{name}: {arg}")
            return str(current)
        if op.endswith("+"):
            return "" if missing else arg
        return current or ""

    return VARIABLE.sub(one, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_of(service: dict, env: dict[str, str] | None = None) -> dict[str, str]:
    values = service.get("environment") or {}
    if isinstance(values, list):
        values = dict(item.partition("=")[::2] for item in values)
    return {k: interpolate(str(v), env) for k, v in values.items()}


def built(services: dict) -> dict[str, dict]:
    return {name: s for name, s in services.items() if "build" in s}


def workers(services: dict) -> dict[str, dict]:
    return {name: s for name, s in built(services).items() if s["build"]["target"] == "worker"}


def as_list(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


# ---------------------------------------------------------------- Dockerfile


def test_every_stage_used_is_defined_before_use():
    seen: set[str] = set()
    for stage in parse_stages(DOCKERFILE.read_text()):
        base = stage.base.lower()
        # A bare word that is not an image path or tag must be an earlier stage.
        if not re.search(r"[/:$]", base) and base != "scratch":
            assert base in seen, f"FROM {stage.base}: no stage of that name above it"
        for instruction, args in stage.instructions:
            if instruction in ("COPY", "ADD") or (instruction == "RUN" and "--mount" in args):
                for ref in re.findall(r"--from=(\S+)", args):
                    if not re.search(r"[/:$]", ref) and not ref.isdigit():
                        assert ref.lower() in seen, f"{instruction} --from={ref}: no stage of that name above it"
        if stage.name:
            assert stage.name not in seen, f"two stages named {stage.name}"
            seen.add(stage.name)


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: a pattern excludes a path or any folder above it; `!` re-includes."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = [pattern]
        if pattern.startswith("**/"):
            candidates.append(pattern[3:])
        pattern_matches = any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates)
        if pattern_matches:
            result = not negate
    return result


def test_every_copied_path_exists_and_is_in_the_build_context(stages):
    patterns = dockerignore_patterns()
    copied = []
    for stage in stages.values():
        for instruction, args in stage.instructions:
            if instruction not in ("COPY", "ADD"):
                continue
            options, words = flags(args)
            if "from" in options:
                continue
            if words[0].startswith("["):
                words = yaml.safe_load(args[args.index("["):])
            *sources, _destination = words
            for source in sources:
                matches = glob.glob(str(ROOT / source))
                assert matches, f"{instruction} {source}: no such path in the repository"
                relative = str(Path(source))
                assert not ignored(relative, patterns), f"{instruction} {source}: excluded by .dockerignore"
                copied.append(relative)
    # What the images need to run `qlora serve`, `qlora worker` and `qlora migrate`.
    for needed in ("app", "worker", "migrations", "alembic.ini", "pyproject.toml", "README.md"):
        assert needed in copied, f"no stage copies {needed}"


def test_heavy_and_secret_paths_stay_out_of_the_build_context():
    patterns = dockerignore_patterns()
    for path in (".git/HEAD", ".venv/bin/python", "models/llama/model.safetensors", ".env",
                 "tests/conftest.py", "demo/train.jsonl", "bench/results/x.json", "app/__pycache__/x.pyc"):
        assert ignored(path, patterns), f"{path} would be sent to the Docker build"


def test_final_targets_run_as_a_non_root_user(stages, services):
    for target in {s["build"]["target"] for s in built(services).values()}:
        user = last(stages, target, "USER")
        assert user is not None, f"target {target} sets no USER: it would run as root"
        assert user.split(":")[0] not in ("root", "0"), f"target {target} runs as {user}"


def test_api_image_serves_on_8000_without_a_worker_and_is_health_checked(stages):
    cmd = exec_form(last(stages, "api", "CMD"))
    assert cmd[:2] == ["qlora", "serve"] and "--no-worker" in cmd
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0", "inside a container the API must listen on all interfaces"
    assert "8000" in (last(stages, "api", "EXPOSE") or "").split()
    healthcheck = last(stages, "api", "HEALTHCHECK")
    assert healthcheck and "127.0.0.1:8000/health" in healthcheck


def test_worker_image_entrypoint_takes_worker_options(stages):
    assert exec_form(last(stages, "worker", "ENTRYPOINT")) == ["qlora", "worker"]


def runs_behind(stages: dict[str, Stage], target: str) -> str:
    """Every RUN that went into TARGET: its own stages and those it copies /opt/venv from."""
    involved = chain(stages, target)
    for stage in list(involved):
        for instruction, args in stage.instructions:
            options, words = flags(args) if instruction == "COPY" else ({}, [])
            if options.get("from") in stages and any(w.startswith("/opt/venv") for w in words[:-1]):
                involved += chain(stages, options["from"])
    return "\n".join(args for stage in involved for instruction, args in stage.instructions if instruction == "RUN")


def test_api_gets_the_cpu_torch_build_and_the_worker_the_cuda_one(stages, services):
    api, worker = runs_behind(stages, "api"), runs_behind(stages, "worker")
    # The API never imports torch: the CPU wheel keeps its image a fraction of the CUDA one's size. It
    # comes from the index the builder names (a build arg without a default: no host in the repository).
    assert re.search(r'pip install torch==\S+ --index-url "\$\{?TORCH_INDEX_URL\}?"', api), api
    declared = [args for stage in chain(stages, "api-build") for ins, args in stage.instructions if ins == "ARG"]
    assert "TORCH_INDEX_URL" in declared, f"api-build must declare ARG TORCH_INDEX_URL (without a default): {declared}"
    assert re.search(r"pip install torch==", worker) and "TORCH_INDEX_URL" not in worker, worker
    for name, service in built(services).items():
        if service["build"]["target"] == "api":
            assert "TORCH_INDEX_URL" in (service["build"].get("args") or {}), f"{name} does not pass TORCH_INDEX_URL"


def test_no_package_index_host_is_named_in_the_repository():
    """Which index serves torch is the installing machine's business: pip's configuration, or
    TORCH_INDEX_URL (README, Development). A URL given to an index option is a host named here."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    assert "Makefile" in files and "Dockerfile" in files
    index_option = re.compile(r"(--(extra-)?index-url|--find-links|\bPIP_(EXTRA_)?INDEX_URL)[= ]+[\"']?\w+://")
    known_indexes = re.compile(r"download\.pytorch\.org|pypi\.org/simple|pypi\.ngc\.nvidia\.com")
    for name in files:
        path = ROOT / name
        if name == "tests/test_deploy_files.py" or not path.is_file() or path.stat().st_size > 1_000_000:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            assert not index_option.search(line) and not known_indexes.search(line), f"{name}:{number}: {line.strip()}"


# ---------------------------------------------------------------- compose


def test_compose_file_has_no_version_key(compose):
    assert "version" not in compose, "the Compose spec has no `version:`; current docker compose warns on it"


def test_every_dependency_exists_and_can_be_met(services, stages):
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        if isinstance(depends_on, list):
            depends_on = {d: {"condition": "service_started"} for d in depends_on}
        for target, spec in depends_on.items():
            assert target in services, f"{name} depends on {target}, which is not a service"
            assert target != name
            condition = spec.get("condition", "service_started")
            assert condition in CONDITIONS, f"{name} -> {target}: unknown condition {condition}"
            dependency = services[target]
            if condition == "service_healthy":
                image_check = ("build" in dependency and last(stages, dependency["build"]["target"], "HEALTHCHECK"))
                compose_check = dependency.get("healthcheck", {})
                assert not compose_check.get("disable"), f"{name} waits for {target} to be healthy, but its check is off"
                assert compose_check.get("test") or image_check, (
                    f"{name} waits for {target} to be healthy, but {target} has no healthcheck")
            if condition == "service_completed_successfully":
                assert dependency.get("restart", "no") == "no", f"{target} is a one-shot step: restart must be \"no\""


def test_build_targets_are_dockerfile_stages(services, stages):
    assert built(services), "no service builds the Dockerfile"
    for name, service in built(services).items():
        build = service["build"]
        assert isinstance(build, dict) and "target" in build, f"{name} builds without naming a target"
        assert build["target"] in stages, f"{name}: target {build['target']} is not a stage in the Dockerfile"
        assert (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def test_named_volumes_are_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = interpolate(volume).split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts volume {source}, not declared under volumes:"


def test_qlora_variables_are_settings_the_service_reads(services):
    known = {f"QLORA_{field.upper()}" for field in Settings.model_fields}
    used = set()
    for name, service in services.items():
        for key in env_of(service):
            if key.startswith("QLORA_"):
                assert key in known, f"{name} sets {key}, which app.config.Settings does not read (known: {sorted(known)})"
                used.add(key)
    assert {"QLORA_DATABASE_URL", "QLORA_BROKER_URL", "QLORA_STORAGE_URL"} <= used


def test_api_migrate_and_workers_share_one_configuration(services):
    envs = {name: env_of(s) for name, s in built(services).items()}
    reference = envs["api"]
    for name, env in envs.items():
        for key in ("QLORA_DATABASE_URL", "QLORA_BROKER_URL", "QLORA_STORAGE_URL", "QLORA_S3_ENDPOINT_URL",
                    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env.get(key) == reference.get(key), f"{name} and api disagree on {key}"


def test_urls_point_at_the_services_that_serve_them(services):
    env = env_of(services["api"])
    postgres = env_of(services["postgres"])
    db = urlsplit(env["QLORA_DATABASE_URL"])
    assert db.scheme == "postgresql+psycopg", "psycopg 3 is the driver the package installs"
    assert db.hostname in services and db.port == 5432
    assert (db.username, db.password, db.path.lstrip("/")) == (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"])

    broker = urlsplit(env["QLORA_BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname in services

    s3 = urlsplit(env["QLORA_S3_ENDPOINT_URL"])
    assert s3.hostname in services


def test_api_serves_on_8000_without_a_worker(services, stages):
    api = services["api"]
    command = as_list(api["command"]) if "command" in api else exec_form(last(stages, api["build"]["target"], "CMD"))
    assert "--no-worker" in command, "training belongs in the GPU workers, never in the API container"
    assert any(str(p).split(":")[-2:] == ["8000", "8000"] for p in api.get("ports", [])), api.get("ports")


def test_migrate_runs_before_the_api_and_the_workers(services):
    assert as_list(services["migrate"]["command"]) == ["qlora", "migrate"]
    for name in ["api", *workers(services)]:
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", f"{name} may start before the schema exists"


def test_each_worker_has_exactly_one_gpu_of_its_own(services):
    found = workers(services)
    assert len(found) >= 1
    host_gpus = []
    for name, service in found.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, f"{name}: one device reservation"
        device = devices[0]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert "count" not in device, f"{name}: reserve a device id, not a count, so no two workers share a GPU"
        assert len(device["device_ids"]) == 1, f"{name}: one worker per GPU"
        host_gpu = str(device["device_ids"][0])
        host_gpus.append(host_gpu)

        args = as_list(service["command"])
        assert args[0].startswith("--"), f"{name}: the image's entrypoint is `qlora worker`; pass options only"
        # The container sees only its reserved GPU, and CUDA numbers it 0 whatever its host index:
        # `--gpu 1` inside worker-gpu1 would set CUDA_VISIBLE_DEVICES=1, a device it does not have.
        assert args[args.index("--gpu") + 1] == "0", f"{name}: inside the container its GPU is index 0"
        worker_name = interpolate(args[args.index("--name") + 1])
        assert worker_name.endswith(f"gpu{host_gpu}"), f"{name}: --name {worker_name} does not name host GPU {host_gpu}"
        assert name.endswith(f"gpu{host_gpu}"), f"service {name} reserves host GPU {host_gpu}"
        assert "--gpu-class" in args
    assert len(set(host_gpus)) == len(host_gpus), f"two workers reserve the same GPU: {host_gpus}"


@pytest.mark.parametrize("gpu_class", [None, "a100"])
def test_the_api_default_class_is_one_the_workers_serve(services, gpu_class):
    """A job that names no class goes to the default class's queue: some worker must serve it."""
    env = {**sample_environment(), **({"GPU_CLASS": gpu_class} if gpu_class else {})}
    default = env_of(services["api"], env).get("QLORA_DEFAULT_GPU_CLASS", "default")
    served = {interpolate(args[args.index("--gpu-class") + 1], env)
              for args in (as_list(s["command"]) for s in workers(services).values())}
    assert default in served, f"the API sends unclassed jobs to {default!r}; workers serve {sorted(served)}"


def stop_grace_period_s(name: str, service: dict) -> int:
    """The service's time between SIGTERM and SIGKILL (compose's default: 10 s)."""
    grace = str(service.get("stop_grace_period", "10s"))
    units = re.findall(r"(\d+)(h|m|s)", grace)
    assert units and "".join(n + u for n, u in units) == grace, f"{name}: stop_grace_period {grace!r}"
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in units)


def api_processes(services: dict, stages: dict[str, Stage]) -> int:
    """How many API processes the api service runs: `--workers` in its command, else QLORA_API_WORKERS."""
    api = services["api"]
    command = as_list(api["command"]) if "command" in api else exec_form(last(stages, api["build"]["target"], "CMD"))
    if "--workers" in command:
        return int(command[command.index("--workers") + 1])
    return int(env_of(api).get("QLORA_API_WORKERS", Settings.model_fields["api_workers"].default))


def test_the_api_runs_several_processes_and_gives_them_time_to_stop(services, stages):
    from app.cli.processes import GRACEFUL_SHUTDOWN_S
    from app.operations.lease import STOP_WAIT_S

    assert api_processes(services, stages) > 1, "one API process leaves the host's other cores idle"
    # Each process finishes open requests, then stops its background loops and releases their leases; killed sooner,
    # the lease outlives it and the next container waits for it to expire.
    loops = 2  # the reaper and the scheduler, stopped one after the other
    assert stop_grace_period_s("api", services["api"]) > GRACEFUL_SHUTDOWN_S + loops * STOP_WAIT_S


def test_postgres_admits_every_connection_the_processes_may_open(services, stages):
    """Each API process and each worker has connection pools of its own (app/db.py); at a peak they may
    all be full. Past max_connections, Postgres refuses new connections and requests fail."""
    from app import db

    command = " ".join(as_list(services["postgres"].get("command", [])))
    found = re.search(r"max_connections=(\d+)", command)
    max_connections = int(found.group(1)) if found else 100  # Postgres' default
    per_worker = db.POOL_SIZE + db.MAX_OVERFLOW
    # An API process also has the async pool of its hot reads, where app/db.py has one.
    per_api_process = per_worker + getattr(db, "ASYNC_POOL_SIZE", 0) + getattr(db, "ASYNC_MAX_OVERFLOW", 0)
    # Beyond the pools: superuser_reserved_connections (3), `qlora migrate`, an admin's `qlora admin`.
    needed = api_processes(services, stages) * per_api_process + len(workers(services)) * per_worker + 3 + 5
    assert needed <= max_connections, f"max_connections must be at least {needed} in the postgres service's command"


def test_workers_can_train(services):
    for name, service in workers(services).items():
        mounts = [interpolate(v) for v in service["volumes"]]
        assert any(m.endswith(":/models:ro") for m in mounts), f"{name}: registered --path models live in /models"
        home = env_of(service)["QLORA_HOME"]
        assert any(m.split(":")[1] == home for m in mounts), f"{name}: QLORA_HOME {home} must be a volume"
        size = re.fullmatch(r"(\d+)\s*([kmg])b?", str(service["shm_size"]).lower())
        assert size, f"{name}: shm_size {service['shm_size']!r}"
        shm_bytes = int(size.group(1)) * 1024 ** "kmg".index(size.group(2)) * 1024
        assert shm_bytes >= 1 << 30, f"{name}: dataloader workers need more than {service['shm_size']} of /dev/shm"
        grace = stop_grace_period_s(name, service)
        assert grace >= 60, f"{name}: stop_grace_period {service['stop_grace_period']} is too short to finish a checkpoint"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_redis_persists_queued_messages(services):
    command = " ".join(as_list(services["redis"]["command"]))
    assert re.search(r"--appendonly\s+yes", command)
    assert any(str(v).endswith(":/data") for v in services["redis"]["volumes"])


def test_the_requirements_stage_writes_what_the_images_install(stages, tmp_path):
    """Runs the requirements stage's RUN line on pyproject.toml, as `docker build` would: the runtime
    dependencies for both images, and the GPU extra (Liger's kernels) for the worker's alone."""
    import shutil
    import subprocess
    import sys
    import tomllib

    run = next(args for instruction, args in stages["requirements"].instructions if instruction == "RUN")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    python = str(Path(sys.executable).parent)  # `python` in the image is the stage's interpreter
    subprocess.run(["sh", "-c", run], cwd=tmp_path, check=True, env={"PATH": f"{python}:/usr/bin:/bin"})
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert (tmp_path / "requirements.txt").read_text().split("\n")[:-1] == project["dependencies"]
    gpu = (tmp_path / "requirements-gpu.txt").read_text().split("\n")[:-1]
    assert gpu == project["optional-dependencies"]["gpu"] and any(r.startswith("liger-kernel==") for r in gpu)
    worker, api = runs_behind(stages, "worker"), runs_behind(stages, "api")
    assert "-r /tmp/requirements-gpu.txt" in worker and "requirements-gpu" not in api


# ---------------------------------------------------------------- secrets and exposure

SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY$|ROOT_USER")


def test_secrets_have_no_default_so_compose_refuses_to_start_without_them(compose):
    """`${VAR:?message}` stops `docker compose up` when VAR is unset or empty; a default here would be
    a credential every reader of this repository knows."""
    found = references(compose)
    secrets = {name for name, _ in found if SECRET_NAME.search(name)}
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"} <= secrets, secrets
    for name, op in found:
        if name in secrets:
            assert op == ":?", f"${{{name}}} is used with {op or 'no operator'}: write ${{{name}:?...}}"
    for name in secrets:
        without = {k: v for k, v in DEPLOY_ENV.items() if k != name}
        with pytest.raises(MissingVariable, match=name):
            [interpolate(text, without) for text in strings_in(compose)]


def test_env_example_documents_every_variable(compose):
    """Each variable the compose file reads appears in .env.example; the required ones uncommented and
    empty, so a copy of the example starts nothing until each secret is filled in."""
    lines = [line.strip() for line in ENV_EXAMPLE.read_text().splitlines()]
    assigned = dict(line.split("=", 1) for line in lines if re.match(r"[A-Za-z_]\w*=", line))
    mentioned = {m.group(1) for line in lines for m in [re.match(r"#\s*([A-Za-z_]\w*)=", line)] if m}
    for name in {name for name, _ in references(compose)}:
        assert name in assigned or name in mentioned, f"{name} is not in .env.example"
    for name in DEPLOY_ENV:
        assert assigned.get(name) == "", f".env.example must list {name}= with an empty value"


def test_env_files_stay_out_of_git_and_docker():
    ignored_by_git = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT).returncode == 0
    assert ignored_by_git, ".env holds the deployment's secrets: add it to .gitignore"
    assert ignored(".env", dockerignore_patterns())
    assert subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=ROOT).returncode == 1


def run_minio_init(services: dict, tmp_path: Path,
                   env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, list]:
    """minio-init's script as its container runs it, with an `mc` that records each call (and the
    policy document it is given) instead of calling a server."""
    log = tmp_path / "mc-calls.jsonl"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    mc = bin_dir / "mc"
    mc.write_text(f"#!{sys.executable}\n"
                  "import json, pathlib, sys\n"
                  "args = sys.argv[1:]\n"
                  "if args[:3] == ['admin', 'policy', 'create']:\n"
                  "    args[-1] = json.loads(pathlib.Path(args[-1]).read_text())\n"
                  f"open({str(log)!r}, 'a').write(json.dumps(args) + '\\n')\n")
    mc.chmod(0o755)
    init = services["minio-init"]
    command = [interpolate(word, env) for word in [*as_list(init["entrypoint"]), *as_list(init["command"])]]
    container_env = {**env_of(init, env), "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(command, env=container_env, capture_output=True, text=True)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def test_api_and_workers_reach_the_store_with_a_key_limited_to_its_bucket(services, tmp_path):
    init = services["minio-init"]
    # The script is written against one mc release: `admin policy create/attach` replaced `policy
    # add/set` in 2023, and attaching a policy already attached succeeds only from late 2024 on
    # (minio/mc#5058), which a step run on every `up` needs.
    release = re.fullmatch(r"[\w./-]+/mc:RELEASE\.(\d{4}-\d\d-\d\d)T[\d-]+Z", interpolate(init["image"]))
    assert release and release.group(1) >= "2024-11-01", f"pin an mc release: {init['image']}"

    env = env_of(services["api"])
    key, secret = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    minio = env_of(services[urlsplit(env["QLORA_S3_ENDPOINT_URL"]).hostname])
    assert key != minio["MINIO_ROOT_USER"] and secret != minio["MINIO_ROOT_PASSWORD"]
    for name, service in built(services).items():
        raw = service.get("environment") or {}
        assert not any("MINIO_ROOT" in f"{k}={v}" for k, v in raw.items()), f"{name} is given MinIO's root credentials"
        assert (env_of(service)["AWS_ACCESS_KEY_ID"], env_of(service)["AWS_SECRET_ACCESS_KEY"]) == (key, secret)

    done, calls = run_minio_init(services, tmp_path)
    assert done.returncode == 0, done.stderr
    alias = calls[0][2]
    assert calls[0] == ["alias", "set", alias, env["QLORA_S3_ENDPOINT_URL"], minio["MINIO_ROOT_USER"],
                        minio["MINIO_ROOT_PASSWORD"]]
    bucket = urlsplit(env["QLORA_STORAGE_URL"]).netloc
    assert ["mb", "--ignore-existing", f"{alias}/{bucket}"] in calls, f"minio-init does not create bucket {bucket}"
    [create] = [c for c in calls if c[:3] == ["admin", "policy", "create"]]
    policy, document = create[4], create[5]
    user = ["admin", "user", "add", alias, key, secret]
    attach = ["admin", "policy", "attach", alias, policy, "--user", key]
    assert user in calls and attach in calls
    assert calls.index(create) < calls.index(attach) and calls.index(user) < calls.index(attach)

    statements = document["Statement"]
    resources = {r for s in statements for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])}
    actions = {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert all(s["Effect"] == "Allow" for s in statements)
    assert resources <= {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, resources
    assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
    # What app/storage/s3.py does: read, write (also in parts) and delete objects, list keys and open uploads.
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListBucket",
            "s3:ListBucketMultipartUploads"} <= actions

    # Given the root's own name as the service's key, the step refuses rather than hand out root.
    key_variable = VARIABLE.search(str(services["api"]["environment"]["AWS_ACCESS_KEY_ID"]))
    same = {**DEPLOY_ENV, key_variable["braced"] or key_variable["bare"]: minio["MINIO_ROOT_USER"]}
    done, calls = run_minio_init(services, tmp_path / "same", same)
    assert done.returncode != 0 and "must differ" in done.stderr
    assert not any(c[:2] == ["admin", "user"] for c in calls)


def published(service: dict) -> list[tuple[str, str]]:
    """(host address, container port) of each published port; compose binds every interface unless told."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((str(port.get("host_ip", "0.0.0.0")), str(port["target"])))
            continue
        parts = interpolate(str(port)).split("/")[0].rsplit(":", 2)
        out.append((parts[0].strip("[]") if len(parts) == 3 else "0.0.0.0", parts[-1]))
    return out


def test_only_the_api_is_published_on_every_interface(services):
    for name, service in services.items():
        for address, port in published(service):
            if (name, port) != ("api", "8000"):
                assert address in ("127.0.0.1", "::1", "localhost"), (
                    f"{name} publishes {port} on {address or 'every interface'}: bind it to loopback (or to a "
                    "private address an operator sets), or leave it unpublished")


def test_database_queue_and_one_shot_steps_live_on_an_internal_network(compose, services):
    networks = compose.get("networks") or {}
    internal = {n for n, spec in networks.items() if (spec or {}).get("internal")}
    assert internal, "declare a network with `internal: true` for what needs no route to the outside"

    def joined(service: dict) -> set[str]:
        found = service.get("networks") or ["default"]
        return set(found) if isinstance(found, list) else set(found)

    for name, service in services.items():
        assert joined(service) <= set(networks), f"{name} joins an undeclared network: {joined(service)}"
    for name in ("postgres", "redis", "migrate", "minio-init"):
        assert joined(services[name]) <= internal, f"{name} needs no route in or out: internal networks only"
    for name, service in services.items():
        if service.get("ports"):
            assert joined(service) - internal, f"{name} publishes ports: it needs a network that is not internal"
    # Everything a process is configured to reach shares a network with it.
    for name, service in built(services).items():
        for key, value in env_of(service).items():
            host = urlsplit(value).hostname if "://" in value and key != "QLORA_S3_PUBLIC_ENDPOINT_URL" else None
            if host in services:
                assert joined(service) & joined(services[host]), f"{name} cannot reach {host} ({key})"
