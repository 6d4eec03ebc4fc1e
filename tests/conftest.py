"""Shared fixtures: tiny random-weight checkpoints, written once per test session; an S3 endpoint and a local Ray
per test module that asks for them (a module with its own bucket set-up defines its own `s3`)."""

import pytest
import torch

from glmv.testing import make_tiny_checkpoint
from tests.pipeline_helpers import moto_s3

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_gqa(tmp_path_factory):
    """GQA, partial rotary 0.5, GLM-4.1V family (tokenizer, template and processor configs)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-gqa"), preset="gqa", family="glm41v", seed=0)


@pytest.fixture(scope="session")
def tiny_mha(tmp_path_factory):
    """Plain multi-head attention, full rotary, other head dims and depths."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-mha"), preset="mha", family="glm41v", seed=1)


@pytest.fixture(scope="session")
def tiny_glm46v(tmp_path_factory):
    """GLM-4.6V-Flash family: its chat template candidate and Glm46V processor configs."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-46v"), preset="gqa", family="glm46v", seed=2)


@pytest.fixture(scope="session")
def tiny_ocr(tmp_path_factory):
    """GLM-OCR (model_type glm_ocr): its tower and decoder switches, head_dim != hidden / heads, an MTP layer in the
    file, the GLM-4.6V processor family."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ocr"), preset="ocr", family="glm46v", seed=3)


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def local_ray(s3):
    import ray

    # after moto_s3 so that workers inherit the (fake) credentials from the environment
    from pipeline.run import stop_local_ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    stop_local_ray()   # ray.shutdown, without its 1 s wait on the autoscaler monitor
