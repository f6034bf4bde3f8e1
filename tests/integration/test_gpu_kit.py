"""The kit for a lease of a bare GPU machine (bench/gpu_kit.sh, bench/gpu_check.sh --kit), tested where no GPU is.

- Every import the check makes: an AST scan of bench/gpu_check.py, bench/step.py, the code the check runs with
  `python -c`, the modules it runs with `python -m` and every trainer/shards module those import at module level,
  checked against bench/gpu_kit_manifest.txt: what the kit brings plus what the GPU machine has installed.
- `bash bench/gpu_check.sh --kit` refuses in one line (exit 2) on a machine without CUDA, installing nothing.
- The parts of the kit that need no network: its shard set (built, then left as it is on a second run), the
  manifest's own rules, and the one-line refusal when pip reaches no registry. Fetching the wheels needs the
  registry and is run by hand (docs/gpu_check.md).
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "bench" / "gpu_kit_manifest.txt"
CHECK_FILES = (REPO / "bench" / "gpu_check.py", REPO / "bench" / "step.py")
PROJECT = ("trainer", "shards", "usercli")
# Commands the check runs that the kit runs on the CPU machine instead: the shard builder (spaCy stays here).
BUILT_BY_THE_KIT = {"shards"}
# In this Python's standard library but not in 3.12's, the GPU machine's.
GONE_IN_312 = {"distutils", "imp", "asynchat", "asyncore", "smtpd"}
# Where the GPU machine's wheels are chosen: CPython 3.12 on Linux x86-64.
GPU_MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


# ------------------------------------------------------------------------------------------ the manifest
def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def manifest_sections() -> dict[str, list[str]]:
    """Section name -> its lines, comments and blank lines dropped."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in MANIFEST.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        elif line:
            current.append(line)
    return sections


def kit_entries() -> list[tuple[Requirement, list[str], bool]]:
    """[kit]: (requirement, module names, built from source)."""
    entries = []
    for line in manifest_sections()["kit"]:
        req, *flags = line.split()
        imports = [f.split("=", 1)[1].split(",") for f in flags if f.startswith("import=")]
        requirement = Requirement(req)
        entries.append((requirement, imports[0] if imports else [normalise(requirement.name)], "sdist" in flags))
    return entries


def gpu_entries() -> dict[str, list[str]]:
    """[gpu]: installed distribution (normalised) -> its module names."""
    out = {}
    for token in " ".join(manifest_sections()["gpu"]).split():
        dist, _, imports = token.partition("=")
        out[normalise(dist)] = imports.split(",") if imports else [normalise(dist)]
    return out


def provided_modules() -> set[str]:
    return {m for _, mods, _ in kit_entries() for m in mods} | {m for mods in gpu_entries().values() for m in mods}


def optional_modules() -> set[str]:
    return {line.split()[0] for line in manifest_sections()["optional"]}


# ------------------------------------------------------------------------------------------ the scan
def module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def imports_of(tree: ast.AST, package: str) -> list[tuple[str, bool]]:
    """(module name, imported at module level) for every import statement; function bodies are 'lazy'."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, not lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join([*parent, *([child.module] if child.module else [])])
                found.append((base, not lazy))
                found.extend((f"{base}.{a.name}", not lazy) for a in child.names if module_file(f"{base}.{a.name}"))
            visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def check_entry_points() -> tuple[list[tuple[str, ast.AST, str]], set[str]]:
    """What the check runs: its two scripts, every string of gpu_check.py that is Python code with imports
    (the collectives probe it runs with -c) and every module it runs with -m."""
    entries = [(str(path.relative_to(REPO)), ast.parse(path.read_text()), "bench") for path in CHECK_FILES]
    modules = set()
    for node in ast.walk(entries[0][1]):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            if re.search(r"^(import|from) ", node.value.value, re.M):
                entries.append((f"gpu_check.py:{node.targets[0].id}", ast.parse(node.value.value), ""))
        if isinstance(node, ast.List):
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            modules |= {items[i + 1] for i, item in enumerate(items[:-1]) if item == "-m"}
    return entries, modules


def scan_check() -> dict[str, dict[str, set[str]]]:
    """Third-party top-level module -> {"top": importers at module level, "lazy": importers inside functions},
    over the check's entry points and the project modules they import at module level (lazy imports of project
    modules are not followed: the style allows none, and bench/step.py's shard builder runs only without
    --shards)."""
    entries, modules = check_entry_points()
    todo = [(name, tree, package) for name, tree, package in entries]
    todo += [(m, None, "") for m in modules if m.split(".")[0] not in BUILT_BY_THE_KIT]
    seen: set[str] = set()
    found: dict[str, dict[str, set[str]]] = {}
    while todo:
        name, tree, package = todo.pop()
        if tree is None:
            if name in seen or module_file(name) is None:
                continue
            seen.add(name)
            path = module_file(name)
            tree, package = ast.parse(path.read_text()), name if path.name == "__init__.py" else name.rpartition(".")[0]
            parents = name.split(".")
            todo += [(".".join(parents[:i]), None, "") for i in range(1, len(parents))]
        for module, top_level in imports_of(tree, package):
            top = module.split(".")[0]
            if top in PROJECT:
                if top_level:
                    todo.append((module, None, ""))
            elif top and top != "__future__" and (top not in sys.stdlib_module_names or top in GONE_IN_312):
                found.setdefault(top, {"top": set(), "lazy": set()})["top" if top_level else "lazy"].add(name)
    return found


def test_the_scan_sees_the_check() -> None:
    found = scan_check()
    for module in ("torch", "deepspeed", "webdataset", "yaml", "numpy"):
        assert module in found, f"the scan lost {module}: it no longer follows the check's imports"
    _, modules = check_entry_points()
    assert "trainer.train" in modules


def test_every_import_of_the_check_is_in_the_kit_or_on_the_gpu_machine() -> None:
    provided, optional = provided_modules(), optional_modules()
    missing = {m: sorted(where["top"]) for m, where in scan_check().items() if where["top"] and m not in provided}
    assert not missing, (f"imported at module level by the check but neither in the kit nor installed on the GPU "
                         f"machine: {missing}; add a [kit] line to {MANIFEST.name} (or a [gpu] one, if KINDS.md "
                         f"lists it)")
    lazy = {m: sorted(where["lazy"]) for m, where in scan_check().items()
            if where["lazy"] and not where["top"] and m not in provided | optional}
    assert not lazy, f"imported inside functions, not provided and not marked [optional] in {MANIFEST.name}: {lazy}"


def test_the_kits_wheels_bring_what_they_need() -> None:
    """Each wheel is installed with --no-deps there, so whatever it requires (on CPython 3.12 Linux, no extras)
    must be in the kit or on the machine. Read from this environment's copy of the same release."""
    have = {normalise(r.name) for r, _, _ in kit_entries()} | set(gpu_entries())
    checked = 0
    for requirement, _, _ in kit_entries():
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version not in requirement.specifier:
            continue
        checked += 1
        for needed in map(Requirement, dist.requires or []):
            if needed.marker is None or needed.marker.evaluate(GPU_MARKER_ENV):
                assert normalise(needed.name) in have, f"{requirement} needs {needed}, which the kit lacks"
    assert checked >= 3, "too few of the kit's releases are installed here to check their requirements"


def test_the_manifest_pins_every_wheel_and_brings_no_torch() -> None:
    names = [normalise(r.name) for r, _, _ in kit_entries()]
    assert len(names) == len(set(names)), "one version of each package: two stop the install on the GPU machine"
    for requirement, _, _ in kit_entries():
        assert len(requirement.specifier) == 1 and next(iter(requirement.specifier)).operator == "==", requirement
        assert not re.match(r"(torch|nvidia)", normalise(requirement.name)), \
            f"{requirement}: the GPU machine's own torch and CUDA libraries are what the check measures"
    assert {"deepspeed", "webdataset"} <= set(names)
    assert "torch" in gpu_entries()


# ------------------------------------------------------------------------------------------ the scripts
def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_one_line_refusal(result: subprocess.CompletedProcess, prog: str, words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and words in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_gpu_check_with_a_kit_refuses_without_cuda(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    (kit / "wheels").mkdir(parents=True)
    # no device visible to torch, on a GPU machine too: the refusal is tested everywhere
    result = run_script("gpu_check.sh", "--kit", str(kit), env={"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert_one_line_refusal(result, "gpu_check", "no CUDA device")
    assert result.stdout == "" and not (kit / "site").exists(), "nothing may be installed without CUDA"
    no_torch = tmp_path / "python"
    no_torch.write_text("#!/bin/sh\nexit 1\n")
    no_torch.chmod(0o755)
    result = run_script("gpu_check.sh", "--kit", ".gpukit", env={"PYTHON": str(no_torch)})
    assert_one_line_refusal(result, "gpu_check", "cannot import torch")


def test_gpu_kit_refuses_in_one_line_when_pip_reaches_no_registry(tmp_path: Path) -> None:
    offline = {"PYTHON": sys.executable, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
               "PIP_FIND_LINKS": str(tmp_path)}
    result = run_script("gpu_kit.sh", "--kit", str(tmp_path / "kit"), env=offline)
    assert_one_line_refusal(result, "gpu_kit", "pip could not fetch")
    assert not (tmp_path / "kit" / "shards").exists()


@pytest.mark.slow
def test_the_kits_shard_set_builds_once(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    first = run_script("gpu_kit.sh", "--kit", str(kit), "--shards-only", env={"PYTHON": sys.executable})
    assert first.returncode == 0, first.stdout + first.stderr
    shards = kit / "shards"
    assert (shards / "manifest.json").is_file() and (shards / ".gpu_check-shards").is_file()
    assert len(list(shards.glob("builtin-train-*.tar"))) == 8  # 2048 pictures in shards of 256
    assert sum(f.stat().st_size for f in shards.iterdir()) < 16 * 2**20
    assert re.search(r"gpu_kit: .*MiB in all", first.stdout), first.stdout
    stamp = (shards / "manifest.json").stat().st_mtime_ns
    again = run_script("gpu_kit.sh", "--kit", str(kit), "--shards-only", env={"PYTHON": sys.executable})
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout + again.stderr
    assert (shards / "manifest.json").stat().st_mtime_ns == stamp
