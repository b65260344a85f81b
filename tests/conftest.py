"""Shared fixtures: a GCS emulator (fake-gcs-server on loopback) and store roots on local disk and gs://.

``store_root`` runs a test twice: once on a local folder, once on ``gs://`` against the emulator,
so every store is tested on both backends with the same code.
"""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

TEST_BUCKET = "gum-test"


@pytest.fixture(scope="session")
def gcs_emulator():
    """Start fake-gcs-server (``-backend memory``, 127.0.0.1, a free port) for the session.

    Sets ``STORAGE_EMULATOR_HOST`` (child processes inherit it), creates the bucket
    :data:`TEST_BUCKET`, yields the endpoint URL, and stops the server at the end.
    """
    from tests.gcs import FakeGCS

    old = os.environ.get("STORAGE_EMULATOR_HOST")
    server = FakeGCS().start()
    os.environ["STORAGE_EMULATOR_HOST"] = server.url
    try:
        server.create_bucket(TEST_BUCKET)
        yield server.url
    finally:
        server.stop()
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


@pytest.fixture(params=["local", "gcs"])
def store_root(request, tmp_path):
    """A fresh, empty root for a store: a local folder, or ``gs://gum-test/<unique prefix>``."""
    if request.param == "local":
        yield str(tmp_path / "store")
    else:
        request.getfixturevalue("gcs_emulator")
        yield f"gs://{TEST_BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def gum2_demo_model():
    """The GUM 2.0 demo model's checkpoint (trained once per machine and recipe, then cached; see
    :mod:`gum_ray.demo_gum2`): tests that need it share this one file."""
    from gum_ray.demo_gum2 import ensure_gum2_demo_model

    return ensure_gum2_demo_model()
