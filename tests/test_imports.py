"""The repository's packages shadow PyPI names (kernels, data, memory, train): they must resolve here.
And `import model` stays light: no lightning."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ["kernels", "memory", "data", "train", "model"]


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def _inside_repo(path: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(ROOT) + os.sep)


def test_packages_resolve_to_repo():
    code = f"import json, {', '.join(PACKAGES)}; print(json.dumps({{n: __import__(n).__file__ for n in {PACKAGES}}}))"
    files = json.loads(_run(code))
    for name in PACKAGES:
        assert files[name] and _inside_repo(files[name]), f"{name} resolves to {files[name]}, not {ROOT}"


def test_packages_resolve_to_repo_in_process():
    for name in PACKAGES:
        mod = __import__(name)
        assert _inside_repo(mod.__file__), f"{name} -> {mod.__file__}"


def test_import_model_does_not_import_lightning():
    code = ("import sys, json, model, model.model, model.config; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning', 'lightning_fabric', 'transformers'))))")
    assert json.loads(_run(code)) == []


def _imports(path: str) -> set[str]:
    """Top-level package names a Python file imports (anywhere in it: lazy imports count)."""
    import ast

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


# Layers point down: kernels <- model <- memory; data uses model's leaf modules; train/ is on top.
FORBIDDEN = {"kernels": {"model", "memory", "data", "train", "lightning", "pytorch_lightning", "lightning_fabric"},
             "model": {"memory", "data", "train", "lightning", "pytorch_lightning", "lightning_fabric"},
             "memory": {"data", "train", "lightning", "pytorch_lightning", "lightning_fabric"},
             "data": {"memory", "train", "kernels", "lightning", "pytorch_lightning", "lightning_fabric"}}


def test_lower_layers_never_import_train_or_lightning():
    bad = []
    for pkg, forbidden in FORBIDDEN.items():
        for root, _, files in os.walk(os.path.join(ROOT, pkg)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    hit = _imports(path) & forbidden
                    if hit:
                        bad.append(f"{os.path.relpath(path, ROOT)} imports {sorted(hit)}")
    assert not bad, bad


def test_no_capability_probing_with_hasattr():
    """memlm's own objects declare what callers use (model.interface.LanguageModel, memory.bank.Bank):
    no hasattr() in train/ and model/; the two left elsewhere probe foreign objects (a transformers config,
    the mmap module)."""
    import re

    found = []
    for pkg in ("train", "model", "memory"):
        for root, _, files in os.walk(os.path.join(ROOT, pkg)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    with open(path, encoding="utf-8") as f:
                        for i, line in enumerate(f, 1):
                            if re.search(r"\bhasattr\(", line):
                                found.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    allowed = ("hasattr(config, \"quantization_config\")", "hasattr(mmap, ")  # stdlib platform flags, not our objects
    assert [f for f in found if not any(a in f for a in allowed)] == []
