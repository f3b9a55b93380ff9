"""The codebase's shape, as docs/ARCHITECTURE.md draws it: one installed package, layered imports.

Every `import` of an lmim module (top of file or inside a function) is read from the source and
checked against the layer table below: a module may import its own layer or a lower one, never
a higher one. The table is the one in docs/ARCHITECTURE.md; a new module falls under the longest
prefix that names it.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"lmim": "lmim", "pipeline": "lmim.pipeline", "model": "lmim.model", "train": "lmim.train",
           "tools": "lmim.tools"}

TINY_SYNTHETIC = [
    "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4", "model.grid_size=4",
    "model.patch_gap=0", "model.projector_hidden_dim=32", "model.decoder_dim=32", "model.decoder_depth=1",
    "model.decoder_num_heads=2", "data.num_visible=4", "data.batch_size=4", "device=cpu", "precision=no",
    "log_with=[]", "progress=false", "plots=false", "epochs=1", "data.loader=synthetic", "synthetic_batches=2",
]

# Lowest first. Longest matching prefix wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("package root", ("lmim", "lmim._torchvision_compat")),
    ("format, model, storage", ("lmim.pipeline.errors", "lmim.pipeline.format", "lmim.pipeline.storage",
                                "lmim.pipeline.forking", "lmim.model")),
    ("data and shard building", ("lmim.pipeline", "lmim.tools.shard", "lmim.tools.datasets",
                                 "lmim.tools.shapes", "lmim.tools.sample_images")),
    ("evaluation", ("lmim.train.evaluate",)),
    ("training", ("lmim.train",)),
    ("command line and benchmarks", ("lmim.tools", "lmim.tools.shard.cli")),
]


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    assert best is not None, f"{module} is in no layer; add it to LAYERS and docs/ARCHITECTURE.md"
    return best


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    parts[0] = FOLDERS[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def lmim_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names if n.split(".")[0] == "lmim"]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lmim"]
    return found


def source_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (REPO / folder).rglob("*.py"))


def test_no_module_imports_a_layer_above_its_own():
    modules = {module_name(p) for p in source_files()}
    violations = []
    for path in source_files():
        me = module_name(path)
        for line, target in lmim_imports(path):
            # `from lmim.x import name` names a module only when lmim/x/name.py exists
            if target not in modules and target.rsplit(".", 1)[0] in modules:
                target = target.rsplit(".", 1)[0]
            if layer_of(target) > layer_of(me):
                violations.append(f"{path.relative_to(REPO)}:{line} ({LAYERS[layer_of(me)][0]}) imports "
                                  f"{target} ({LAYERS[layer_of(target)][0]})")
    assert not violations, "imports that go up a layer:\n" + "\n".join(violations)


def test_no_code_uses_the_bare_folder_names():
    """Everything imports through `lmim.`: a bare `import model` would load a second copy."""
    bare = []
    for path in source_files() + sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            bare += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                     if n.split(".")[0] in ("pipeline", "model", "train", "tools")]
    assert not bare, "\n".join(bare)


def test_a_bare_package_import_is_refused_with_one_sentence():
    proc = subprocess.run([sys.executable, "-c", "import train"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "import lmim.train, not train" in proc.stderr


def test_import_lmim_prepares_timm_without_importing_it():
    """`import lmim` is cheap (no torchvision), and timm imports cleanly after it in a fresh process."""
    code = ("import sys, lmim; assert 'torchvision' not in sys.modules and 'timm' not in sys.modules; "
            "import timm; m = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0, img_size=32, "
            "patch_size=8); print(type(m).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "VisionTransformer"


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package_that_runs(tmp_path):
    """A non-editable install: build the wheel, install it into a folder, run the quickstart from it elsewhere."""
    # Build from a copy of the tracked files: setuptools writes build/ into the source tree.
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        if (REPO / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, source / rel)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("lmim-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
        names = set(zf.namelist())
    assert {t for t in tops if not t.endswith(".dist-info")} == {"lmim"}
    assert "lmim/train/configs/quickstart.yaml" in names and "lmim/tools/cli.py" in names

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    # Run from an empty folder holding a user's own `model/` and `train.py`: they must not shadow lmim.
    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)
    (work / "model" / "__init__.py").write_text("raise SystemExit('the user folder shadowed lmim')\n")
    (work / "train.py").write_text("raise SystemExit('the user file shadowed lmim')\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import lmim.model, lmim.train.pretrain; print(lmim.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    assert Path(where.stdout.strip()).is_relative_to(site)
    # The quickstart (shortened), as a user of the installed wheel runs it.
    run = subprocess.run([sys.executable, "-m", "lmim.tools.cli", "quickstart", "--dataset", "digits", "--data-dir",
                          str(work / "data"), "--run-dir", str(work / "run"), "max_steps=4", "progress=false"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "k-NN top-1" in run.stdout and (work / "run" / "quickstart.json").is_file()
    assert (work / "run" / "status.json").read_text().count('"completed"') == 1
    # the pretrain module runs from the wheel too, as `accelerate launch -m lmim.train.pretrain` would
    pre = subprocess.run([sys.executable, "-m", "lmim.train.pretrain", "--config", "quickstart", *TINY_SYNTHETIC,
                          f"run_dir={work / 'run2'}"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert pre.returncode == 0, pre.stderr[-3000:]
