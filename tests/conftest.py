"""Shared fixtures: tiny random-weight checkpoints, written once per test session."""

import pytest
import torch

from glmv.testing import make_tiny_checkpoint

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
