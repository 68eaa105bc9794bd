"""The cluster files in cluster/ are what `ray up`, `kubectl apply` and `docker build` accept.

- ``cluster/ray-cluster.yaml`` against Ray's own cluster-launcher schema
  (``ray/autoscaler/ray-schema.json``, shipped with Ray) and Ray's start-command check.
- ``cluster/kuberay-rayjob.yaml`` / ``cluster/kuberay-raycluster.yaml`` against the KubeRay CRDs'
  ``openAPIV3Schema`` (``shared/reference/kuberay/``, beside or above the repository), with
  unknown fields refused as ``kubectl apply``'s strict field validation refuses them.
- ``cluster/Dockerfile`` by its structure (no docker here): the Ray it pins is the manifests'
  ``rayVersion``, it ships the pipeline specs where the manifests look for them, and its command
  is the package's console script.

Each checker returns a list of problems; the tests check the real files give none and that a
broken copy gives the expected one, so a checker that can never fail fails its test.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
RAYCLUSTER = CLUSTER / "kuberay-raycluster.yaml"
STORAGE = CLUSTER / "kuberay-storage.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
SHARED_ACCESS = {"ReadWriteMany", "ReadOnlyMany"}


# --------------------------------------------------------------------------- helpers

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 13,000+ lines


def _load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_Loader)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _console_script() -> tuple[str, str]:
    """The one console script of [project.scripts]: (name, target)."""
    scripts = _pyproject()["project"]["scripts"]
    assert len(scripts) == 1, scripts
    return next(iter(scripts.items()))


def _kuberay_reference() -> Path:
    """shared/reference/kuberay in the repository or in a folder above it (CI: beside the clone)."""
    for base in (REPO, *REPO.parents):
        candidate = base / "shared" / "reference" / "kuberay"
        if all((candidate / name).is_file() for name in CRD_FILES.values()):
            return candidate
    pytest.skip("no shared/reference/kuberay (ray.io_rayjobs.yaml, ray.io_rayclusters.yaml) in or above "
                f"{REPO}: the KubeRay CRD schemas to validate the manifests against are not on this machine")


def _error_lines(validator, instance) -> list[str]:
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))]


# --------------------------------------------------------------------------- Dockerfile

def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, continuation lines joined."""
    instructions, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        current = ""
    return instructions


def dockerfile_args(instructions) -> dict[str, str | None]:
    """Every ARG's default (None without one), before or after FROM."""
    args = {}
    for word, rest in instructions:
        if word == "ARG":
            name, eq, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"') if eq else None
    return args


def check_dockerfile(text: str, scripts: tuple[str, str], extras: dict) -> list[str]:
    """What the cluster manifests rely on the image for."""
    problems = []
    ins = parse_dockerfile(text)
    words = [w for w, _ in ins]
    if "FROM" not in words:
        return ["no FROM"]
    first_from = words.index("FROM")
    before = dockerfile_args(ins[:first_from])
    after = dockerfile_args(ins[first_from:])
    # base image: a build arg whose default is a CPU Python image, replaceable by a CUDA base
    base_ref = re.fullmatch(r"\$\{?(\w+)\}?(\s+AS\s+\w+)?", ins[first_from][1], re.I)
    if not base_ref or base_ref.group(1) not in before:
        problems.append(f"FROM {ins[first_from][1]!r} is not a build arg declared before it (--build-arg BASE=...)")
    elif not (before[base_ref.group(1)] or "").startswith("python:"):
        problems.append(f"the base image's default {before[base_ref.group(1)]!r} is not a CPU Python image")
    # an ARG declared only before FROM is empty after it: each ${VAR} a RUN uses must be (re)declared
    # after FROM or be an ENV
    env_names = set()
    for word, rest in ins[first_from:]:
        if word == "ENV":
            env_names.update(m.group(1) for m in re.finditer(r"(\w+)=", rest))
        if word == "RUN":
            for name in re.findall(r"\$\{?(\w+)\}?", rest):
                if name.isupper() and name not in after and name not in env_names and name != "PATH":
                    problems.append(f"RUN uses ${name}, which is not an ARG after FROM (nor an ENV): it is empty there")
    runs = [(i, rest) for i, (word, rest) in enumerate(ins) if word == "RUN"]
    torch_at = next((i for i, r in runs if re.search(r"pip install\s+\"?torch==", r)), None)  # torch alone, first
    mixflow_at = next((i for i, r in runs if re.search(r"pip install\b.*\[[^\]]*pipeline", r)), None)
    if torch_at is None:
        problems.append("no RUN installs torch")
    elif not re.search(r"--(index-url|extra-index-url)[ =]\"?\$\{?TORCH_INDEX\}?", ins[torch_at][1]):
        problems.append("torch is not installed from the TORCH_INDEX build arg")
    if (after.get("TORCH_INDEX") or "").rstrip("/").rsplit("/", 1)[-1] != "cpu":
        problems.append(f"TORCH_INDEX defaults to {after.get('TORCH_INDEX')!r}, not the CPU wheel index")
    if mixflow_at is None:
        problems.append("no RUN installs mixflow with its [pipeline,...] extras")
    else:
        if torch_at is not None and torch_at > mixflow_at:
            problems.append("mixflow is installed before torch (it would pull the default, CUDA, torch)")
        wanted = re.search(r"\[([^\]]*pipeline[^\]]*)\]", ins[mixflow_at][1]).group(1).split(",")
        for extra in ("pipeline", "cluster"):
            if extra not in wanted:
                problems.append(f"mixflow is installed without the [{extra}] extra")
        for extra in wanted:
            if extra not in extras:
                problems.append(f"extra [{extra}] is not in pyproject's optional-dependencies")
        if not re.search(r"ray\[default\]==\$\{?RAY_VERSION\}?", ins[mixflow_at][1]):
            problems.append("Ray is not pinned to RAY_VERSION in the step that installs mixflow")
        if not re.search(r"torch==\$\{?TORCH_VERSION\}?", ins[mixflow_at][1]):
            problems.append("torch is not pinned to TORCH_VERSION in the step that installs mixflow "
                            "(the resolver may swap the CPU wheel for the CUDA one)")
    if not re.fullmatch(r"\d+\.\d+\.\d+", after.get("RAY_VERSION") or ""):
        problems.append(f"RAY_VERSION has no x.y.z default after FROM: {after.get('RAY_VERSION')!r}")
    copies = [rest.split() for word, rest in ins if word == "COPY"]
    if not any(c[:1] == ["pipelines"] and c[-1].rstrip("/") == "/opt/mixflow/pipelines" for c in copies):
        problems.append("pipelines/ is not copied to /opt/mixflow/pipelines")
    users = [rest for word, rest in ins if word == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image runs as root (no USER, or USER root last)")
    cmds = [rest for word, rest in ins if word == "CMD"]
    name, _ = scripts
    if not cmds or json.loads(cmds[-1]) != [name, "--help"]:
        problems.append(f"CMD is {cmds[-1] if cmds else None!r}, not [{name!r}, '--help']")
    return problems


def dockerfile_copy_sources(text: str) -> list[str]:
    return [src for word, rest in parse_dockerfile(text) if word == "COPY" and not rest.startswith("--from")
            for src in rest.split()[:-1] if not src.startswith("--")]


def dockerfile_ray_version() -> str:
    return dockerfile_args(parse_dockerfile(DOCKERFILE.read_text()))["RAY_VERSION"]


def test_dockerfile_structure():
    scripts = _console_script()
    assert scripts == ("mixflow", "mixflow.cli:main")
    extras = _pyproject()["project"]["optional-dependencies"]
    assert check_dockerfile(DOCKERFILE.read_text(), scripts, extras) == []


def test_dockerfile_checker_catches_broken_copies():
    text = DOCKERFILE.read_text()
    scripts, extras = _console_script(), _pyproject()["project"]["optional-dependencies"]

    def problems(broken: str) -> str:
        assert broken != text, "the break did not change the Dockerfile"
        return "\n".join(check_dockerfile(broken, scripts, extras))

    assert "pipelines/ is not copied" in problems(re.sub(r"(?m)^COPY pipelines .*$", "", text))
    assert "without the [cluster] extra" in problems(text.replace("[pipeline,cluster]", "[pipeline]"))
    assert "runs as root" in problems(re.sub(r"(?m)^USER .*$", "USER root", text))
    assert "not ['mixflow', '--help']" in problems(text.replace('CMD ["mixflow", "--help"]', 'CMD ["ray", "--help"]'))
    assert "not pinned to RAY_VERSION" in problems(text.replace('"ray[default]==${RAY_VERSION}"', '"ray[default]"'))
    assert "not pinned to TORCH_VERSION" in problems(text.replace(' "torch==${TORCH_VERSION}" "/opt', ' "/opt'))
    # an ARG moved above FROM is empty in the RUNs below it
    moved = re.sub(r"(?m)^ARG RAY_VERSION=.*\n", "", text).replace("FROM ${BASE}", "ARG RAY_VERSION=2.60.0\nFROM ${BASE}")
    assert "$RAY_VERSION, which is not an ARG after FROM" in problems(moved)
    torch = re.search(r"(?m)^RUN pip install \"torch.*\n", text).group(0)
    assert "installed before torch" in problems(text.replace(torch, "") + torch)


def test_dockerfile_copies_exist_and_are_not_ignored():
    """What the Dockerfile copies is in the build context (the repo root) and not excluded."""
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for src in dockerfile_copy_sources(DOCKERFILE.read_text()):
        assert (REPO / src).exists(), f"COPY {src}: not in the repository root (the build context)"
        assert not any(Path(src).match(pattern) or src == pattern for pattern in ignored), (src, ignored)
    assert ".venv" in ignored and ".git" in ignored


def test_cluster_extra_brings_ray_job_submit():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert "mixflow[pipeline]" in extras["cluster"]
    assert any(re.match(r"ray\[default\]", req) for req in extras["cluster"]), extras["cluster"]


# --------------------------------------------------------------------------- mixflow run commands

def check_run_command(command: str, mounts: dict[str, Path], data_roots: tuple[str, ...],
                      results_roots: tuple[str, ...]) -> list[str]:
    """A `mixflow run` command line as a cluster runs it: the console script (bare or a venv's),
    a spec the image/checkout ships (``mounts``: remote folder -> local folder), absolute
    data.shards and run_dir under the given roots; the spec loads with its overrides."""
    from mixflow.cli import build_parser
    from mixflow.config import load_spec

    name, _ = _console_script()
    argv = shlex.split(command)
    if not argv or Path(argv[0]).name != name:
        return [f"{command!r} does not run the {name!r} console script"]
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        return [f"{command!r}: mixflow's parser refuses it"]
    if args.command != "run":
        return [f"{command!r} is not `{name} run`"]
    problems = []
    if not args.spec.startswith("/"):
        problems.append(f"spec {args.spec!r} is relative: the job's working directory is not the checkout")
    local = next((mounts[m] / Path(args.spec).relative_to(m) for m in mounts if args.spec.startswith(m + "/")), None)
    if local is None or not local.is_file():
        problems.append(f"spec {args.spec!r} is not a file of {sorted(mounts)} (-> {local})")
        local = None
    sets = dict(item.split("=", 1) for item in args.set)
    if sets.get("runtime.address") != "auto":
        problems.append("no --set runtime.address=auto: the run would start its own local Ray")
    for field, roots in (("data.shards", data_roots), ("run_dir", results_roots)):
        value = sets.get(field, "")
        if not value.startswith("/") or not any(value.startswith(r.rstrip("/") + "/") for r in roots):
            problems.append(f"--set {field}={value!r} is not an absolute path under {roots}")
    try:
        if local is not None:
            load_spec(local, args.set)
    except Exception as exc:  # a field name the spec does not have, a bad value
        problems.append(f"the spec does not load with {args.set}: {exc}")
    return problems


def _commented_commands(path: Path, marker: str) -> list[str]:
    """Commands in a file's comments that contain ``marker`` (text after the marker's '-- ')."""
    found = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#") and marker in line:
            found.append(line.lstrip("#").split("   #")[0].strip())
    return found


# --------------------------------------------------------------------------- Ray cluster launcher

def _ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def check_launcher_schema(config: dict) -> list[str]:
    return _error_lines(jsonschema.Draft7Validator(_ray_schema()), config)


def _segments(command: str) -> list[list[str]]:
    """Shell words of each simple command (split at ; && || |), leading VAR=... dropped."""
    out = []
    for part in re.split(r";|&&|\|\||\|", command):
        words = shlex.split(part, comments=False)
        while words and re.match(r"^\w+=", words[0]):
            words.pop(0)
        if words and words[0] == "export":
            continue
        if words:
            out.append(words)
    return out


def check_launcher_commands(config: dict) -> list[str]:
    """Ray and mixflow live in a venv: every ray/pip/python/mixflow call names the venv's
    (SSH shells do not activate it), the venv is the one setup_commands creates, the head starts
    the autoscaler, and Ray and the extras installed are those the image uses."""
    problems = []
    setup = config.get("setup_commands", [])
    venvs = {w[-1] for c in setup for w in _segments(c) if w[:3] == ["python3", "-m", "venv"]}
    if len(venvs) != 1:
        return [f"setup_commands create {len(venvs)} venvs ({sorted(venvs)}), not one"]
    venv_bin = venvs.pop().rstrip("/") + "/bin/"
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        for command in config.get(key, []):
            for words in _segments(command):
                program = words[0]
                if Path(program).name in ("ray", "pip", "python", "mixflow") and not program.startswith(venv_bin):
                    problems.append(f"{key}: {command!r} calls {program!r}, not {venv_bin}{Path(program).name}")
    head = [c for c in config.get("head_start_ray_commands", []) if "ray start" in c]
    if not head or not any("--autoscaling-config=~/ray_bootstrap_config.yaml" in w
                           for c in head for s in _segments(c) for w in s):
        problems.append("the head's `ray start` lacks --autoscaling-config=~/ray_bootstrap_config.yaml")
    if not any("ray stop" in c for c in config.get("head_start_ray_commands", [])):
        problems.append("the head does not `ray stop` first")
    installs = " ".join(setup)
    pin = f"ray[default]=={dockerfile_ray_version()}"
    if pin not in installs:
        problems.append(f"setup_commands do not pin {pin} (the image's Ray)")
    if not re.search(r"mixflow\[pipeline,cluster\]", installs):
        problems.append("setup_commands do not install mixflow[pipeline,cluster]")
    return problems


def test_ray_cluster_yaml_matches_ray_schema():
    config = _load(LAUNCHER)
    assert check_launcher_schema(config) == []
    # what `ray up` does with it: fill in the defaults (local provider: node types), validate
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_start_ray_commands"] == config["head_start_ray_commands"]
    assert prepared["max_workers"] == len(config["provider"]["worker_ips"])


def test_ray_schema_catches_broken_copies():
    config = _load(LAUNCHER)
    typo = dict(config, max_worker=2)
    assert any("max_worker" in e for e in check_launcher_schema(typo))
    no_provider = {k: v for k, v in config.items() if k != "provider"}
    assert any("provider" in e for e in check_launcher_schema(no_provider))
    not_a_list = dict(config, head_start_ray_commands="ray start --head")
    assert any(e.startswith("head_start_ray_commands") for e in check_launcher_schema(not_a_list))
    bad_auth = dict(config, auth={"ssh_username": "ubuntu"})
    assert any(e.startswith("auth") for e in check_launcher_schema(bad_auth))


def test_ray_cluster_commands():
    assert check_launcher_commands(_load(LAUNCHER)) == []


def test_launcher_command_checks_catch_broken_copies():
    config = _load(LAUNCHER)
    bare_stop = copy.deepcopy(config)
    bare_stop["worker_start_ray_commands"][0] = "ray stop"
    assert any("calls 'ray'" in p for p in check_launcher_commands(bare_stop))
    no_autoscaler = copy.deepcopy(config)
    no_autoscaler["head_start_ray_commands"] = [c.replace(" --autoscaling-config=~/ray_bootstrap_config.yaml", "")
                                                for c in config["head_start_ray_commands"]]
    assert no_autoscaler != config
    assert any("--autoscaling-config" in p for p in check_launcher_commands(no_autoscaler))
    old_pin = copy.deepcopy(config)
    old_pin["setup_commands"] = [c.replace(dockerfile_ray_version(), "2.9.0") for c in config["setup_commands"]]
    assert any("do not pin" in p for p in check_launcher_commands(old_pin))


def test_ray_own_start_command_check(monkeypatch):
    """Ray's warning 'The head node will not launch any workers' stays silent for the file, and
    speaks for a copy without --autoscaling-config."""
    from ray.autoscaler._private import commands

    warnings: list[str] = []
    monkeypatch.setattr(commands.cli_logger, "warning", lambda msg, *a, **k: warnings.append(msg))
    head = _load(LAUNCHER)["head_start_ray_commands"]
    commands.warn_about_bad_start_command(head)
    assert warnings == []
    commands.warn_about_bad_start_command([c.replace("--autoscaling-config", "--no-such-flag") for c in head])
    assert any("will not launch any workers" in w for w in warnings), warnings


def test_launcher_run_instructions():
    """The file's own instructions: `ray exec` / `ray job submit` (never `ray submit`, which runs a
    Python script), running a spec of the synced checkout with absolute shard and result paths."""
    text = LAUNCHER.read_text()
    assert "ray submit" not in text
    config = _load(LAUNCHER)
    mounts = {remote.rstrip("/"): (REPO / local).resolve() for remote, local in config["file_mounts"].items()}
    assert (REPO / "pipelines").resolve() in {m / "pipelines" for m in mounts.values()}
    execs = _commented_commands(LAUNCHER, "ray exec ")
    jobs = _commented_commands(LAUNCHER, "ray job submit ")
    assert execs and jobs
    runs = [shlex.split(c.split("ray exec ", 1)[1])[1] for c in execs]
    runs += [c.split(" -- ", 1)[1] for c in jobs]
    for run in runs:
        assert check_run_command(run, mounts, ("/mnt/mixflow/shards",), ("/mnt/mixflow/results",)) == [], run
    # the checker refuses a relative spec and a relative run_dir
    broken = runs[0].replace("/home/ubuntu/mixflow/pipelines/", "pipelines/").replace("run_dir=/mnt/mixflow/results/", "run_dir=runs/")
    problems = "\n".join(check_run_command(broken, mounts, ("/mnt/mixflow/shards",), ("/mnt/mixflow/results",)))
    assert "is relative" in problems and "run_dir='runs/" in problems


# --------------------------------------------------------------------------- KubeRay

def k8s_to_jsonschema(schema):
    """A Kubernetes structural schema as JSON Schema: ``x-kubernetes-int-or-string`` allows an
    integer or a string, and objects with ``properties`` refuse other fields (what strict field
    validation in ``kubectl apply`` does; the API server would otherwise drop them silently)
    unless ``x-kubernetes-preserve-unknown-fields`` keeps them. CEL rules
    (``x-kubernetes-validations``) are not evaluated."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: k8s_to_jsonschema(s) for name, s in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = k8s_to_jsonschema(out["additionalProperties"])
    if "items" in out:
        out["items"] = k8s_to_jsonschema(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [k8s_to_jsonschema(s) for s in out[key]]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, api_version: str):
    group, _, version = api_version.partition("/")
    crd = _load(_kuberay_reference() / CRD_FILES[kind])
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    served = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    assert served, f"{kind} {api_version}: no served version {version!r} in the CRD"
    return jsonschema.Draft7Validator(k8s_to_jsonschema(served[0]["schema"]["openAPIV3Schema"]))


def check_crd(manifest: dict) -> list[str]:
    return _error_lines(crd_validator(manifest["kind"], manifest["apiVersion"]), manifest)


def _manifest(path: Path) -> dict:
    docs = [d for d in _docs(path) if d.get("apiVersion", "").startswith("ray.io/")]
    assert len(docs) == 1, f"{path.name}: {len(docs)} ray.io documents"
    return docs[0]


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def _groups(manifest: dict) -> list[tuple[str, dict]]:
    spec = _cluster_spec(manifest)
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * _UNITS[unit]


def check_pods(manifest: dict, storage: list[dict], ray_version: str, image: str) -> list[str]:
    """What the CRD cannot say: the image and Ray version, sizes that fit, claims that exist."""
    problems = []
    spec = _cluster_spec(manifest)
    if spec.get("rayVersion") != ray_version:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} is not the image's Ray {ray_version!r}")
    claims = {d["metadata"]["name"]: d for d in storage if d.get("kind") == "PersistentVolumeClaim"}
    for name, group in _groups(manifest):
        if name != "head":
            lo, n, hi = group.get("minReplicas"), group.get("replicas"), group.get("maxReplicas")
            if None in (lo, hi) or not lo <= (n if n is not None else lo) <= hi:
                problems.append(f"{name}: replicas {n} not within minReplicas {lo}..maxReplicas {hi}")
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        store = group.get("rayStartParams", {}).get("object-store-memory")
        if store is None:
            problems.append(f"{name}: no object-store-memory in rayStartParams (Ray would take most of /dev/shm)")
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            if container.get("image") != image:
                problems.append(f"{where}: image {container.get('image')!r} is not {image!r} (cluster/Dockerfile's)")
            res = container.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        problems.append(f"{where}: no resources.{kind}.{r}")
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            shm = volumes.get(mounts.get("/dev/shm", {}).get("name"), {}).get("emptyDir")
            if not shm or shm.get("medium") != "Memory" or "sizeLimit" not in shm:
                problems.append(f"{where}: /dev/shm is not a memory emptyDir with a sizeLimit")
            else:
                limit = quantity(res.get("limits", {}).get("memory", 0))
                if store is not None and not int(store) < quantity(shm["sizeLimit"]):
                    problems.append(f"{where}: object-store-memory {store} leaves no room in /dev/shm "
                                    f"({shm['sizeLimit']}) for the batch rings")
                if not quantity(shm["sizeLimit"]) < limit:
                    problems.append(f"{where}: /dev/shm {shm['sizeLimit']} is not below the memory limit")
            for path in ("/data/shards", "/results"):
                if path not in mounts:
                    problems.append(f"{where}: nothing mounted at {path}")
                    continue
                claim = volumes.get(mounts[path]["name"], {}).get("persistentVolumeClaim", {}).get("claimName")
                if claim not in claims:
                    problems.append(f"{where}: {path} is not a PVC of {STORAGE.name} (claim {claim!r})")
                elif not SHARED_ACCESS & set(claims[claim]["spec"].get("accessModes", [])):
                    problems.append(f"{where}: PVC {claim} has no shared access mode ({sorted(SHARED_ACCESS)}): "
                                    "pods on other nodes cannot mount it")
                elif path == "/results" and "ReadWriteMany" not in claims[claim]["spec"]["accessModes"]:
                    problems.append(f"{where}: results PVC {claim} is not ReadWriteMany (every rank writes there)")
    return problems


def _image_tag() -> str:
    """The tag the Dockerfile's build instructions give the image."""
    tags = re.findall(r"docker build -f cluster/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    assert tags, "no `docker build -f cluster/Dockerfile -t TAG .` in the Dockerfile's comments"
    return tags[0]


@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER], ids=lambda p: p.name)
def test_kuberay_manifest_matches_crd(path):
    manifest = _manifest(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert check_crd(manifest) == []


def test_crd_validator_catches_broken_copies():
    job = _manifest(RAYJOB)
    assert check_crd(job) == []

    def broken(edit) -> str:
        copy_ = copy.deepcopy(job)
        edit(copy_)
        return "\n".join(check_crd(copy_))

    workers = lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]  # noqa: E731
    head = lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]  # noqa: E731
    assert "'minReplicas' is a required property" in broken(lambda m: workers(m).pop("minReplicas"))
    assert "'maxReplicas' is a required property" in broken(lambda m: workers(m).pop("maxReplicas"))
    # rayStartParams values are strings
    assert "is not of type 'string'" in broken(lambda m: head(m)["rayStartParams"].update({"object-store-memory": 2**31}))
    # a misspelt field (strict field validation)
    assert "minReplica" in broken(lambda m: workers(m).update(minReplica=1))
    assert "rayVersio" in broken(lambda m: m["spec"]["rayClusterSpec"].update(rayVersio="2.60.0"))
    assert "'two' is not of type 'integer'" in broken(lambda m: workers(m).update(replicas="two"))
    # resource quantities are int-or-string with the Kubernetes quantity pattern
    container = lambda m: head(m)["template"]["spec"]["containers"][0]  # noqa: E731
    assert "does not match" in broken(lambda m: container(m)["resources"]["limits"].update(memory="16 GB"))
    assert broken(lambda m: container(m)["resources"]["limits"].update(cpu=4)) == ""  # an integer is fine
    assert "'containers' is a required property" in broken(lambda m: head(m)["template"]["spec"].pop("containers"))
    assert "'template' is a required property" in broken(lambda m: head(m).pop("template"))


def test_int_or_string_conversion():
    schema = k8s_to_jsonschema({"type": "object", "properties": {
        "port": {"x-kubernetes-int-or-string": True}, "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                                                             "properties": {"a": {"type": "string"}}}}})
    v = jsonschema.Draft7Validator(schema)
    assert v.is_valid({"port": 8265}) and v.is_valid({"port": "dashboard"}) and not v.is_valid({"port": 1.5})
    assert not v.is_valid({"other": 1}) and v.is_valid({"free": {"a": "x", "b": 2}})


@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER], ids=lambda p: p.name)
def test_kuberay_pods(path):
    problems = check_pods(_manifest(path), _docs(STORAGE), dockerfile_ray_version(), _image_tag())
    assert problems == []


def test_pod_checks_catch_broken_copies():
    job, storage = _manifest(RAYJOB), _docs(STORAGE)
    ray_version, image = dockerfile_ray_version(), _image_tag()

    def broken(edit, storage=storage) -> str:
        copy_ = copy.deepcopy(job)
        edit(copy_)
        return "\n".join(check_pods(copy_, storage, ray_version, image))

    spec = lambda m: m["spec"]["rayClusterSpec"]  # noqa: E731
    worker = lambda m: spec(m)["workerGroupSpecs"][0]  # noqa: E731
    assert "rayVersion '2.9.0'" in broken(lambda m: spec(m).update(rayVersion="2.9.0"))
    assert "no object-store-memory" in broken(lambda m: worker(m)["rayStartParams"].pop("object-store-memory"))
    assert "leaves no room in /dev/shm" in broken(
        lambda m: worker(m)["rayStartParams"].update({"object-store-memory": str(64 * 2**30)}))
    assert "is not 'mixflow:latest'" in broken(
        lambda m: worker(m)["template"]["spec"]["containers"][0].update(image="YOUR_REGISTRY/mixflow:0.1.0"))
    assert "not within minReplicas" in broken(lambda m: worker(m).update(replicas=5))
    assert "/dev/shm is not a memory emptyDir" in broken(
        lambda m: [v for v in worker(m)["template"]["spec"]["volumes"] if v["name"] == "dshm"][0]["emptyDir"].pop("sizeLimit"))
    assert "no resources.requests.cpu" in broken(
        lambda m: worker(m)["template"]["spec"]["containers"][0]["resources"]["requests"].pop("cpu"))
    rwo = copy.deepcopy(storage)
    for doc in rwo:
        doc["spec"]["accessModes"] = ["ReadWriteOnce"]
    assert "no shared access mode" in broken(lambda m: None, storage=rwo)
    assert "is not a PVC of" in broken(lambda m: None, storage=[])


def test_storage_claims():
    claims = {d["metadata"]["name"]: d for d in _docs(STORAGE)}
    assert set(claims) == {"mixflow-shards", "mixflow-results"}
    for claim in claims.values():
        assert claim["apiVersion"] == "v1" and claim["kind"] == "PersistentVolumeClaim"
        assert SHARED_ACCESS & set(claim["spec"]["accessModes"])
        assert quantity(claim["spec"]["resources"]["requests"]["storage"]) > 0


def test_kuberay_entrypoints():
    """The RayJob's entrypoint and the RayCluster's `ray job submit` line run the package's console
    script on a spec the image ships, with shards and run_dir on the mounted PVCs."""
    docker = DOCKERFILE.read_text()
    assert any(c.split()[:1] == ["pipelines"] and c.split()[-1].rstrip("/") == "/opt/mixflow/pipelines"
               for w, c in parse_dockerfile(docker) if w == "COPY")
    mounts = {"/opt/mixflow/pipelines": REPO / "pipelines"}
    job = _manifest(RAYJOB)["spec"]["entrypoint"]
    submits = [c.split(" -- ", 1)[1] for c in _commented_commands(RAYCLUSTER, "ray job submit ")]
    assert submits
    for command in [job, *submits]:
        assert check_run_command(command, mounts, ("/data/shards",), ("/results",)) == [], command
    # the checker refuses what the old manifest had: a spec outside the image, no run_dir
    old = "mixflow run pipelines/digits_mixup.yaml --set runtime.address=auto --set data.shards=/data/digits"
    problems = "\n".join(check_run_command(old, mounts, ("/data/shards",), ("/results",)))
    assert "is relative" in problems
    problems = "\n".join(check_run_command(job.replace("--set run_dir=/results/digits_mixup", ""), mounts,
                                           ("/data/shards",), ("/results",)))
    assert "run_dir=''" in problems
    assert check_run_command(job.replace("run_dir=", "rundir="), mounts, ("/data/shards",), ("/results",))
    assert check_run_command(job.replace("mixflow run", "python -m mixflow run"), mounts, ("/data/shards",), ("/results",))


def test_readme_cluster_commands():
    """The README's cluster commands name files that exist and run specs the way the manifests do."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## How to run on a cluster"):]
    section = section[:section.index("\n## ", 1)]
    assert not re.search(r"^\s*ray submit", section, re.M) and "mixflow[cluster]" in section
    for tool, flag in (("kubectl apply", "-f"), ("ray up", ""), ("docker build", "-f")):
        named = re.findall(rf"{tool} {flag}\s*(cluster/\S+)", section)
        assert named, f"the README's cluster section has no `{tool} {flag} cluster/...`"
        for path in named:
            assert (REPO / path.rstrip("`")).is_file(), path
    launcher = {r.rstrip("/"): (REPO / l).resolve() for r, l in _load(LAUNCHER)["file_mounts"].items()}
    image = {"/opt/mixflow/pipelines": REPO / "pipelines"}
    runs = re.findall(r"(mixflow run /\S+(?: --[\w-]+(?: [^-\s'`]\S*)?)*)", section)
    assert len(runs) >= 3, runs
    for run in runs:
        run = run.rstrip("'`")
        if "/opt/mixflow/" in run:
            assert check_run_command(run, image, ("/data/shards",), ("/results",)) == [], run
        else:
            assert check_run_command(run, launcher, ("/mnt/mixflow/shards",), ("/mnt/mixflow/results",)) == [], run
