"""Every input a job names may be gs://: the checkpoint (fetched once per node into a local cache,
verified by sha256), the AOI file and the points file; and on a cluster of more than one node a
node-local path is refused before anything runs (issue 12)."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest

from gum_ray.errors import CheckpointError, CheckpointNotFoundError, InputError, NotFoundError
from gum_ray.store import fs
from tests.conftest import TEST_BUCKET


@pytest.fixture()
def bucket_prefix(gcs_emulator):
    return f"gs://{TEST_BUCKET}/remote-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def ckpt(tmp_path):
    from gum_ray.model import ModelSpec, random_checkpoint

    path = tmp_path / "tiny.pth"
    random_checkpoint(path, ModelSpec(10, 8, 4), seed=3)
    return path


def test_remote_checkpoint_is_fetched_once_verified_and_loaded(tmp_path, monkeypatch, bucket_prefix, ckpt):
    from gum_ray.network import load_model
    from gum_ray.store.checkpoints import local_checkpoint

    monkeypatch.setenv("GUM_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    url = f"{bucket_prefix}/gum.pth"
    fs.write_bytes(url, ckpt.read_bytes())
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    got = local_checkpoint(url)  # the driver: fetch, find the sha
    assert got == tmp_path / "cache" / f"{sha}.pth" and got.read_bytes() == ckpt.read_bytes()
    assert load_model(got).provenance()["checkpoint_sha256"] == sha
    # an actor with the driver's sha uses the node's copy (no second download)
    fs.remove(url)
    assert local_checkpoint(url, sha) == got
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [got.name]
    # the object replaced during the run: a clear error on a node that has no copy yet
    fs.write_bytes(url, b"x" * 100)
    got.unlink()
    with pytest.raises(CheckpointError, match="sha256 is .* but this run started with"):
        local_checkpoint(url, sha)
    assert not any(p.suffix == ".pth" for p in (tmp_path / "cache").iterdir())  # nothing half-cached
    with pytest.raises(CheckpointNotFoundError, match="no such object"):
        local_checkpoint(f"{bucket_prefix}/missing.pth")
    # a local path: returned as it is, checked when a sha is given
    assert local_checkpoint(str(ckpt), sha) == ckpt
    with pytest.raises(CheckpointError, match="replaced during the run"):
        local_checkpoint(str(ckpt), "0" * 64)


def test_gum_map_with_a_gs_checkpoint_and_a_gs_aoi(tmp_path, monkeypatch, bucket_prefix, ckpt):
    """The path the README shows: `gum map --checkpoint gs://...` (it was mangled to gs:/...)."""
    from gum_ray.cli import main

    monkeypatch.setenv("GUM_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    fs.write_bytes(f"{bucket_prefix}/gum.pth", ckpt.read_bytes())
    w, s, e, n = 8.571, 47.371, 8.579, 47.379
    aoi = {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}
    fs.write_bytes(f"{bucket_prefix}/aoi.geojson", json.dumps(aoi).encode())
    rc = main(["map", "--aoi", f"{bucket_prefix}/aoi.geojson", "--year", "2020",
               "--checkpoint", f"{bucket_prefix}/gum.pth", "--data-dir", f"{bucket_prefix}/data",
               "--cell-deg", "0.01", "--chunk-px", "40", "--halo", "32", "--quiet", "--no-preview"])
    assert rc == 0
    from gum_ray.store.manifest import Manifest

    assert len(Manifest(f"{bucket_prefix}/data/product.zarr").done(2020)) == 1


def test_remote_aoi_and_points_files(bucket_prefix):
    from gum_ray.aoi import load_geojson
    from gum_ray.patches import read_points

    pts = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "a", "properties": {}, "geometry": {"type": "Point", "coordinates": [8.5, 47.3]}}]}
    fs.write_bytes(f"{bucket_prefix}/pts.geojson", json.dumps(pts).encode())
    assert [p.id for p in read_points(f"{bucket_prefix}/pts.geojson")] == ["a"]
    with pytest.raises(NotFoundError, match="no such object"):
        read_points(f"{bucket_prefix}/nope.geojson")
    with pytest.raises(NotFoundError, match="AOI file .*: no such object"):
        load_geojson(f"{bucket_prefix}/nope.geojson")
    fs.write_bytes(f"{bucket_prefix}/bad.geojson", b"{not json")
    with pytest.raises(InputError, match="not readable GeoJSON"):
        load_geojson(f"{bucket_prefix}/bad.geojson")


def test_node_local_paths_refused_on_a_multi_node_cluster():
    from gum_ray.grid import parse_aoi
    from gum_ray.mapping.job import MapJob
    from gum_ray.mapping.runner import check_shared_paths

    job = MapJob(aoi=parse_aoi(bbox=(8.57, 47.37, 8.58, 47.38)), years=(2020,),
                 product="gs://b/p.zarr", cache="gs://b/cache")
    check_shared_paths(job, "/home/me/gum.pth", 1)  # one node: local paths are fine
    check_shared_paths(job, "gs://b/gum.pth", 3)
    with pytest.raises(InputError, match=r"checkpoint /home/me/gum.pth is on this node only, but the "
                                         r"Ray cluster has 3 nodes: .*gs://BUCKET/gum.pth"):
        check_shared_paths(job, "/home/me/gum.pth", 3)
    local = MapJob(aoi=job.aoi, years=(2020,), product="gum-data/product.zarr", cache="gs://b/cache")
    with pytest.raises(InputError, match="product .*product.zarr is on this node only.*--data-dir"):
        check_shared_paths(local, "gs://b/gum.pth", 2)
