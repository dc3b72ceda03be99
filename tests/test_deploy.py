"""The deployment files, checked as far as a machine without a Docker engine or Kubernetes can:
`docker-compose config` resolves the compose file (Debian's docker-compose), the Dockerfile's
inputs exist and its dependency step works on this pyproject, and the KubeRay RayJob's
placement resources match its entrypoint, whose overrides are valid opgrpo settings.

The compose topology itself runs as processes in tests/test_compose_topology.py."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import ray
import yaml

from opgrpo.cli import build_parser
from opgrpo.config import load_config

REPO = Path(__file__).resolve().parents[1]
COMPOSE = shutil.which("docker-compose")


def _compose_dir(tmp_path: Path, env_file: bool = True) -> Path:
    """The compose file in a scratch directory with an env file, as a user's checkout has it
    after `cp deploy/cluster.env.example deploy/cluster.env`."""
    shutil.copy(REPO / "docker-compose.yml", tmp_path / "docker-compose.yml")
    (tmp_path / "deploy").mkdir()
    if env_file:
        example = (REPO / "deploy" / "cluster.env.example").read_text()
        (tmp_path / "deploy" / "cluster.env").write_text(
            example.replace("change-me-to-a-long-random-string", "s3cret-pw")
            .replace("\nRAY_AUTH_TOKEN=\n", "\nRAY_AUTH_TOKEN=t0ken-t0ken\n"))
    return tmp_path


def _config(directory: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    assert COMPOSE, "docker-compose is missing: `make test` installs it (apt-get)"
    base = {"PATH": "/usr/bin:/bin", **(env or {})}
    return subprocess.run([COMPOSE, *args, "config"], cwd=directory, env=base,
                          capture_output=True, text=True, timeout=120)


def test_compose_config_resolves(tmp_path):
    run = _config(_compose_dir(tmp_path), env={"RAY_HEAD_CPUS": "3", "RAY_WORKER_CPUS": "5"})
    assert run.returncode == 0, run.stderr
    spec = yaml.safe_load(run.stdout)
    services = spec["services"]
    assert set(services) == {"redis", "ray-head", "ray-worker", "ray-worker-gpu"}
    assert services["ray-worker-gpu"]["profiles"] == ["gpu"]  # started only with --profile gpu
    assert all("profiles" not in services[name] for name in ("redis", "ray-head", "ray-worker"))

    redis = services["redis"]
    assert "ports" not in redis  # not published to the host
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--requirepass" in command
    assert "redis-data:/data:rw" in redis["volumes"]
    assert redis["environment"]["REDIS_PASSWORD"] == "s3cret-pw"  # from the env file

    head, worker = services["ray-head"], services["ray-worker"]
    assert "--head" in head["command"] and "--num-cpus=3" in head["command"]
    assert head["ports"] == ["127.0.0.1:8265:8265/tcp"]  # the host reaches it, no one else
    assert head["depends_on"]["redis"]["condition"] == "service_healthy"
    argv = shlex.split(worker["command"])
    assert "--address=ray-head:6379" in argv and "--num-cpus=5" in argv
    resources = json.loads(next(a for a in argv if a.startswith("--resources="))
                           .split("=", 1)[1])
    assert resources == {"rollout_slot": 2}
    for node in (head, worker, services["ray-worker-gpu"]):
        # Ray's token authentication: on for every node, the token from the env file
        assert node["environment"]["RAY_AUTH_MODE"] == "token"
        assert node["environment"]["RAY_AUTH_TOKEN"] == "t0ken-t0ken"
    for node in (head, worker):
        assert node["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert node["environment"]["REDIS_PASSWORD"] == "s3cret-pw"
        assert node["shm_size"] == "4gb"
        assert "runs:/runs:rw" in node["volumes"]
    assert {"runs", "redis-data"} <= set(spec["volumes"])


def test_compose_dashboard_bind_and_gpu_profile(tmp_path):
    run = _config(_compose_dir(tmp_path), "--profile", "gpu",
                  env={"DASHBOARD_BIND": "0.0.0.0", "RAY_WORKER_GPUS": "2"})
    assert run.returncode == 0, run.stderr
    services = yaml.safe_load(run.stdout)["services"]
    assert services["ray-head"]["ports"] == ["0.0.0.0:8265:8265/tcp"]
    gpu = services["ray-worker-gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and str(device["count"]) == "2"
    argv = shlex.split(gpu["command"])
    assert "--num-gpus=2" in argv and '--resources={"rollout_slot": 2}' in argv


def test_env_file_example_leaves_the_secrets_to_the_user():
    """The example holds no usable token (an empty one stops a node from starting, see
    tests/test_security.py) and says how to make both secrets and what clients need."""
    example = (REPO / "deploy" / "cluster.env.example").read_text()
    values = dict(line.split("=", 1) for line in example.splitlines()
                  if line and not line.startswith("#"))
    assert values == {"REDIS_PASSWORD": "change-me-to-a-long-random-string",
                      "RAY_AUTH_TOKEN": ""}
    assert "openssl rand -hex 32" in example and "export RAY_AUTH_MODE=token" in example


def test_compose_without_env_file_names_it(tmp_path):
    run = _config(_compose_dir(tmp_path, env_file=False))
    assert run.returncode != 0
    assert "cluster.env" in run.stderr


def _dockerfile() -> str:
    return (REPO / "deploy" / "Dockerfile").read_text()


def test_dockerfile_inputs_exist_and_ray_matches():
    text = _dockerfile()
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY "):
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            sources += words[:-1]
    assert sources, "no COPY lines"
    for source in sources:
        assert (REPO / source).exists(), f"deploy/Dockerfile copies {source}, which is missing"
    version = re.search(r"^ARG RAY_VERSION=(\S+)", text, re.M).group(1)
    assert version == ray.__version__, "image and client Ray versions must match"
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", text, re.M))
    assert {"base-cpu", "base-cuda"} <= stages
    assert re.search(r"^FROM base-\$\{VARIANT\}", text, re.M)


def _instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            out.append((keyword.upper(), rest))
            current = ""
    return out


def test_dockerfile_runs_as_a_user_without_sudo():
    steps = _instructions(_dockerfile())
    users = [i for i, (keyword, _) in enumerate(steps) if keyword == "USER"]
    assert users, "the image must name its user"
    last = users[-1]
    assert steps[last][1] not in ("root", "0", "0:0"), "the image must not run as root"
    after = " ".join(rest for _, rest in steps[last:])
    assert "sudo" not in after, "nothing after the last USER may use sudo"
    # the last root step takes the base image's passwordless sudo away and checks it
    assert users[-2:-1] and steps[users[-2]][1] == "root"
    root_step = " ".join(rest for keyword, rest in steps[users[-2]:last] if keyword == "RUN")
    for removal in ("sed -i '/NOPASSWD/d' /etc/sudoers", "rm -rf /etc/sudoers.d/*",
                    "gpasswd -d ray sudo", "chmod u-s", "! sudo -n true"):
        assert removal in root_step, removal
    # and no step of the image runs a command through sudo (it is root where it must be)
    for keyword, rest in steps:
        if keyword == "RUN":
            assert not re.search(r"(^|[;&|(]\s*)sudo\s", rest), f"RUN {rest[:60]} uses sudo"


def test_dockerfile_dependency_step_runs_on_this_pyproject(tmp_path):
    """The image installs the project's dependencies minus torch and ray (those come from the
    base image and the torch index): run that exact step on the real pyproject."""
    text = _dockerfile()
    snippet = re.search(r'python -c "(import tomllib.*?)" \\\n', text, re.S).group(1)
    snippet = snippet.replace("\\\n", "")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    wanted = [line for line in run.stdout.splitlines() if line]
    assert wanted and not any(w.startswith(("torch", "ray")) for w in wanted)
    assert any(w.startswith("diffusers") for w in wanted)
    assert any(w.startswith("deepspeed") for w in wanted)


def test_rayjob_placement_matches_entrypoint():
    job = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"rollout", "learner"}

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "opgrpo", "train"]
    args = build_parser().parse_args(argv[3:])
    config = load_config(REPO / args.config, args.set)  # the shipped config + the overrides
    assert config.run.output_dir == "/runs"
    assert config.rollout.num_gpus == 1 and config.learner.num_gpus == 1
    # separate GPU groups: rollout and learner overlap (the shipped config shares GPUs: sync)
    assert config.train.mode == "async" and config.shared_gpu_warning() is None
    learner_gpus = int(groups["learner"]["rayStartParams"]["num-gpus"])
    assert learner_gpus * groups["learner"]["replicas"] >= config.learner.num_ranks

    def advertised(group) -> dict:
        raw = group["rayStartParams"].get("resources", '"{}"')
        return json.loads(json.loads(raw))  # KubeRay wants the JSON quoted once more

    placement = {"rollout": config.rollout.resources, "learner": config.learner.resources}
    for name, wanted in placement.items():
        assert wanted, f"the entrypoint sets no {name}.resources"
        for resource in wanted:
            holders = [g for g in groups if resource in advertised(groups[g])]
            assert holders == [name], f"{resource} is advertised by {holders}, not {name}"
    assert "resources" not in cluster["headGroupSpec"]["rayStartParams"]
    # Every pod reaches Redis with the same URL and the password from one secret.
    pods = [cluster["headGroupSpec"]] + list(groups.values())
    for pod in pods:
        container = pod["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["REDIS_URL"].startswith("redis://")
        assert container["envFrom"] == [{"secretRef": {"name": "opgrpo-redis"}}]


def test_rayjob_turns_token_authentication_on_everywhere():
    """The job API listens on 0.0.0.0 in the head pod: Ray's token authentication must be on
    for the operator (authOptions, KubeRay 1.6+), the head, both worker groups and the pod
    that runs `ray job submit`, with the token of one Secret."""
    spec = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayjob.yaml").read_text())["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "opgrpo-ray-auth"}
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    templates = ([cluster["headGroupSpec"]["template"], spec["submitterPodTemplate"]]
                 + [g["template"] for g in cluster["workerGroupSpecs"]])
    assert len(templates) == 4
    token = {"secretKeyRef": {"name": "opgrpo-ray-auth", "key": "auth_token"}}
    for template in templates:
        container = template["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert env["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN", "valueFrom": token}
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    assert "command" not in submitter["containers"][0]  # KubeRay supplies `ray job submit`


def test_docker_build_context_leaves_out_secrets_and_the_venv():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"deploy/cluster.env", ".venv", "runs", ".git"} <= ignored
    copied = {w for line in _dockerfile().splitlines() if line.startswith("COPY ")
              for w in line.split()[1:-1] if not w.startswith("--")}
    assert not copied & ignored, "the Dockerfile copies something the context leaves out"
