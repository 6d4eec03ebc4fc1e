import importlib
import sys


def test_packages_import_without_ray_in_glmv():
    sys.modules.pop("glmv", None)
    glmv = importlib.import_module("glmv")
    assert glmv.__version__
    assert "ray" not in glmv.__dict__
