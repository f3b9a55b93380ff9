"""Shared fixtures: a real S3 API on loopback, small real images, GPU skipping."""
from __future__ import annotations

import uuid

import pytest
import torch

import lmim  # noqa: F401  (before any test module imports timm: see lmim/_torchvision_compat.py)

from tests.s3server import aws_env, apply_env, restore_env, start_s3_server


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a loopback port, with the standard AWS variables pointing at it."""
    info, server = start_s3_server()
    old = apply_env(aws_env(info.endpoint_url))
    try:
        yield info
    finally:
        server.shutdown()
        restore_env(old)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket; returns its name. The request log is cleared."""
    import boto3

    name = f"lmim-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url).create_bucket(Bucket=name)
    s3_server.clear()
    return name
