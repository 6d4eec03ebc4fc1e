import importlib
import sys


def test_packages_import_without_ray_in_glmv():
    sys.modules.pop("glmv", None)
    glmv = importlib.import_module("glmv")
    assert glmv.__version__
    assert "ray" not in glmv.__dict__


def test_the_driver_imports_no_torch():
    """The job's driver lists, tracks and writes; torch is for decode tasks and model actors. Importing it there
    cost ~3.5 s of every start and ~630 MiB of driver memory."""
    import subprocess

    code = ("import sys, jobs.caption, pipeline.run, pipeline.report; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('glmv')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(importlib.import_module("pipeline").__path__[0] + "/.."))
    assert out.stdout.strip() == "[]", out.stdout
