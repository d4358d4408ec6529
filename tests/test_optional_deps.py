"""timm is optional: `import rest` works without it, and a broken timm install only warns."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_import_rest_without_timm():
    # sys.modules[name] = None makes `import timm` raise ImportError, as if it were not installed
    out = run("import sys; sys.modules['timm'] = None\n"
              "import rest; assert 'rest.timm_integration' not in sys.modules; print(rest.rest_lite().num_classes)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1000"


def test_broken_timm_only_warns():
    out = run("import sys, types, warnings; sys.modules['timm'] = types.ModuleType('timm')\n"
              "with warnings.catch_warnings(record=True) as w:\n"
              "    warnings.simplefilter('always'); import rest\n"
              "assert any('registering ResT in it failed' in str(x.message) for x in w), [str(x.message) for x in w]\n"
              "print(rest.rest_lite().num_classes)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1000"
