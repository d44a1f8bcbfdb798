"""Static checks of the deployment files: Dockerfile, docker-compose.yml and .dockerignore.

No Docker engine is needed. The mistakes caught here are the ones that otherwise show up only on a
GPU host at `docker compose up`: a build target or stage that does not exist, a COPY of a path
that is missing or ignored, a dependency on a service that cannot become healthy, two workers on
one GPU, a setting name the service does not read, a root process.
"""

from __future__ import annotations

import fnmatch
import glob
import re
import shlex
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


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default}, ${VAR-default} and ${VAR} with nothing set: the defaults."""
    value = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)
    return value.replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


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


def test_api_gets_the_cpu_torch_build_and_the_worker_the_cuda_one(stages):
    api, worker = runs_behind(stages, "api"), runs_behind(stages, "worker")
    # The API never imports torch: the CPU wheel keeps its image a fraction of the CUDA one's size.
    assert re.search(r"pip install torch==\S+ --index-url https://download.pytorch.org/whl/cpu", api), api
    assert re.search(r"pip install torch==", worker) and "whl/cpu" not in worker, worker


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
    minio = env_of(services[s3.hostname])
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"])
    bucket = urlsplit(env["QLORA_STORAGE_URL"]).netloc
    init = " ".join(as_list(services["minio-init"]["command"]))
    assert re.search(rf"mc mb\b.*/{re.escape(bucket)}\b", init), f"minio-init does not create bucket {bucket}"


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
        grace = str(service["stop_grace_period"])
        units = re.findall(r"(\d+)(h|m|s)", grace)
        assert units and "".join(n + u for n, u in units) == grace, f"{name}: stop_grace_period {grace!r}"
        seconds = sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in units)
        assert seconds >= 60, f"{name}: stop_grace_period {grace} is too short to finish a checkpoint"
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
