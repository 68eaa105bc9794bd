"""The core install (``pip install mixflow``: torch, numpy, numba) is the mixing library.

``mixflow.mix`` and ``mixflow.mixture`` import nothing from the ``pipeline`` extra; the
``mixflow`` command on an install without it names the extra instead of an ImportError
traceback. Each check runs in a fresh interpreter, so what this test process has already
imported does not count.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import names of the pipeline extra's distributions (yaml is left out: numba imports it when present).
PIPELINE_IMPORTS = ("ray", "nvidia", "cv2", "pyarrow", "pydantic", "rich", "PIL", "sklearn", "pandas", "webdataset")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_mixing_library_imports_nothing_from_the_pipeline_extra():
    proc = run_python(f"""
import importlib, pkgutil, sys
import mixflow, mixflow.mix, mixflow.mixture
for pkg in (mixflow.mix, mixflow.mixture):
    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(pkg.__name__ + "." + m.name)
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({PIPELINE_IMPORTS!r})))
print("nvidia.dali" in sys.modules, "ray" in sys.modules)
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "False False"]


# A finder that makes these modules (and their submodules) missing, as on a core install.
BLOCK = """
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Missing())
"""


def test_cli_without_the_pipeline_extra_names_it():
    proc = run_python(BLOCK.format(blocked=PIPELINE_IMPORTS + ("yaml",)) + """
from mixflow.cli import main
sys.exit(main(["run", "pipelines/digits_mixup.yaml"]))
""")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("mixflow run: needs the pipeline extra (module 'rich' is not installed): "
                                   "pip install 'mixflow[pipeline]' (in a checkout: pip install -e '.[pipeline]')")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_missing_ray_alone_names_the_extra_too():
    proc = run_python(BLOCK.format(blocked=("ray",)) + """
from mixflow.cli import main
sys.exit(main(["run", "pipelines/digits_mixup.yaml"]))
""")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("mixflow run: needs the pipeline extra (module 'ray' is not installed)")
    assert "Traceback" not in proc.stderr


def test_cli_reraises_a_missing_module_that_is_not_the_extras():
    proc = run_python(BLOCK.format(blocked=("mixflow_nonexistent",)) + """
import mixflow.cli
def broken(args, console):
    import mixflow_nonexistent
mixflow.cli._cmd_shards = broken  # build_parser binds the command when main() calls it
sys.exit(mixflow.cli.main(["shards", "--demo", "digits", "--out", "/nonexistent"]))
""")
    assert proc.returncode == 1 and "ModuleNotFoundError: No module named 'mixflow_nonexistent'" in proc.stderr


def test_declared_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0] for d in project["dependencies"]}
    assert core == {"torch", "numpy", "numba"}
    extras = project["optional-dependencies"]
    pipeline = {d.split(">")[0].split("=")[0] for d in extras["pipeline"]}
    assert {"ray", "nvidia-dali-cuda120", "pyarrow", "pydantic", "pyyaml", "rich"} <= pipeline
    assert "pandas" not in pipeline | core  # declared before, never imported (Ray Train brings its own)
    assert "mixflow[pipeline]" in extras["test"] and "mixflow[pipeline]" in extras["train"]
    # shards in object storage: s3fs in the s3 extra; the tests bring it and moto's local S3 server
    assert any(d.startswith("s3fs") for d in extras["s3"]) and "mixflow[s3]" in extras["test"]
    assert any(d.startswith("moto[server]") for d in extras["test"])
