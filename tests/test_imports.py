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
