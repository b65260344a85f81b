"""The Earth Engine source against the loopback emulator, through the real ``ee`` client."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
from odc.geo.geobox import GeoBox

from gum_ray.errors import GumError, InputError
from gum_ray.sources import earthengine as E
from gum_ray.sources.earthengine import client as EC
from gum_ray.sources import get_source
from gum_ray.sources.ee_emulator import Faults, find_markers, start_emulator
from gum_ray.sources.synthetic import SyntheticSource

google_credentials = pytest.importorskip("google.oauth2.credentials")

FAST = dict(backoff_s=0.002, backoff_max_s=0.05)


@pytest.fixture(scope="module")
def emulator():
    emu = start_emulator(max_seconds=600)
    yield emu
    emu.stop()
    EC._INIT_KEY = None


@pytest.fixture
def emu(emulator):
    """The shared emulator with no faults and fresh statistics."""
    emulator.set_faults(**{k: v for k, v in Faults().__dict__.items()})
    emulator.reset_stats()
    yield emulator
    emulator.set_faults(**{k: v for k, v in Faults().__dict__.items()})
    deadline = time.monotonic() + 10  # requests a client gave up on may still be served: let them end
    while emulator.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture(scope="module")
def creds():
    # a bearer token the client attaches to every request (the emulator does not check it)
    return google_credentials.Credentials(token="emulator-fake-token")


def ee_source(emu, creds, **kw):
    kw = {**FAST, **kw}
    return E.EarthEngineSource(project="gum-emulator", credentials=creds, url=emu.url, **kw)


def _eq(a, b):
    return np.array_equal(a, b, equal_nan=True)


PLACES = {
    "utm32N-zurich": GeoBox.from_bbox((467190, 5246400, 469750, 5248960), "EPSG:32632", resolution=10),
    "utm17N-florida": GeoBox.from_bbox((400000, 3100000, 401920, 3101280), "EPSG:32617", resolution=10),
    "utm55S-victoria": GeoBox.from_bbox((320000, 5810000, 321280, 5811920), "EPSG:32755", resolution=10),
    "utm60N-antimeridian": GeoBox.from_bbox((833000, 7240000, 834600, 7241600), "EPSG:32660", resolution=10),
    "latlon-across-180": GeoBox.from_bbox((179.985, -16.81, 180.015, -16.79), "EPSG:4326", resolution=1 / 12000),
    "utm33N-65N": GeoBox.from_bbox((420000, 7210000, 421600, 7211600), "EPSG:32633", resolution=10),
    "latlon-71N": GeoBox.from_bbox((25.0, 71.0, 25.05, 71.01), "EPSG:4326", resolution=1 / 12000),
}


@pytest.mark.parametrize("place", list(PLACES), ids=list(PLACES))
def test_ee_client_returns_exactly_the_synthetic_world(emu, creds, place):
    geobox = PLACES[place]
    with_products = place == "utm32N-zurich"
    # small requests: every modality comes in several tiles that must land in the right place
    src = ee_source(emu, creds, max_request_bytes=120_000, with_products=with_products, max_in_flight=8)
    got = src.fetch(geobox, 2022)
    want = SyntheticSource(with_products=with_products).fetch(geobox, 2022)
    assert got.export.shape == want.export.shape
    assert _eq(got.export, want.export)
    assert all(m.all() for m in got.masks.values())
    assert src.last_stats.requests > len(got.masks)  # tiled
    assert emu.stats()["compute_pixels_ok"] == src.last_stats.requests
    if place == "utm32N-zurich":
        assert got.provenance["collections"]["s2"][0] == "COPERNICUS/S2_SR_HARMONIZED"


def test_pixels_are_at_the_right_places(emu, creds):
    """A grid shifted by (5, 7) pixels returns the same pixels shifted by (5, 7)."""
    base = PLACES["utm32N-zurich"][:200, :200]
    shifted = PLACES["utm32N-zurich"][5:205, 7:207]
    src = ee_source(emu, creds, max_request_bytes=60_000)
    a = src.fetch(base, 2021).export
    b = src.fetch(shifted, 2021).export
    assert _eq(a[:, 5:, 7:], b[:, :-5, :-7])
    assert not _eq(a, b)
    truth = SyntheticSource().ground_truth(base, 2021)
    assert 0 < truth.mean() < 1  # the place holds town and country: a misplaced tile would show


def test_200_requests_under_30pc_429_and_5pc_5xx_lose_nothing_and_respect_the_cap(emu, creds):
    emu.set_faults(rate_429=0.30, rate_5xx=0.05, latency_s=0.01, seed=7)
    geobox = PLACES["utm32N-zurich"][:80, :160]
    src = ee_source(emu, creds, with_products=True, tile_side=16, max_in_flight=8, max_attempts=30)
    assert len(src.plan(geobox)) == 200
    got = src.fetch(geobox, 2023)
    st = emu.stats()
    assert _eq(got.export, SyntheticSource(with_products=True).fetch(geobox, 2023).export)
    assert src.last_stats.requests == 200 and st["compute_pixels_ok"] == 200
    assert st["faults"].get("429", 0) > 30 and st["faults"].get("500", 0) + st["faults"].get("503", 0) > 0
    assert st["max_in_flight"] <= 8 and src.last_stats.max_in_flight <= 8
    assert src.last_stats.max_in_flight == 8  # the cap is used, not just respected
    retries = sum(src.last_stats.retries.values())
    assert src.last_stats.attempts == 200 + retries
    assert retries >= st["compute_pixels"] - 200 > 30  # every failed request was retried


def test_truncated_bodies_are_retried(emu, creds):
    emu.set_faults(rate_truncate=0.25, seed=3)
    geobox = PLACES["utm32N-zurich"][:64, :64]
    src = ee_source(emu, creds, tile_side=16, max_in_flight=4, max_attempts=30)
    got = src.fetch(geobox, 2021)
    assert emu.stats()["faults"].get("truncated", 0) > 0
    assert _eq(got.export, SyntheticSource().fetch(geobox, 2021).export)


@pytest.mark.parametrize(
    "faults, word",
    [
        (dict(max_request_bytes=50_000), "oversize"),
        (dict(memory_limit_pixels=2_000), "memory"),
        (dict(timeout_pixels=1_500), "timeout"),
    ],
)
def test_too_large_memory_and_timeout_failures_are_split_and_complete(emu, creds, faults, word):
    emu.set_faults(**faults)
    geobox = PLACES["utm32N-zurich"][:100, :130]
    src = ee_source(emu, creds, max_in_flight=4)  # plans 48 MiB requests: one per modality
    assert len(src.plan(geobox)) == 3
    got = src.fetch(geobox, 2021)
    assert emu.stats()["faults"].get(word, 0) > 0
    assert src.last_stats.splits > 0
    assert _eq(got.export, SyntheticSource().fetch(geobox, 2021).export)


def test_oversize_wording_is_earth_engines(emu, creds):
    emu.set_faults(max_request_bytes=1000)
    E.initialize_ee(url=emu.url, project="gum-emulator", credentials=creds)
    import ee

    img = E.encode_image(ee, ee.Image.constant([0.1, 0.1, 0.1, 0.1]).rename(["B4", "B3", "B2", "B8"]), "s2", 2021)
    with pytest.raises(ee.EEException) as exc:
        ee.data.computePixels({"expression": img, "fileFormat": "NUMPY_NDARRAY",
                               "grid": E.grid_params(PLACES["utm32N-zurich"][:100, :100])})
    assert str(exc.value) == "Total request size (120000 bytes) must be less than or equal to 1000 bytes."
    assert E.classify_error(exc.value) == E.SPLIT


def test_planner_keeps_requests_within_earth_engines_limits():
    for h, w, bpp in [(3300, 3300, 12), (32768, 32768, 12), (100, 30000, 12), (30000, 7, 9), (5000, 4096, 6), (1, 1, 12)]:
        tiles = E.plan_tiles(h, w, bpp)
        cover = np.zeros((min(h, 400), min(w, 400)), np.int32)
        area = 0
        for r0, r1, c0, c1 in tiles:
            assert (r1 - r0) * (c1 - c0) * bpp <= E.MAX_REQUEST_BYTES
            assert 0 < r1 - r0 <= E.MAX_GRID_SIDE and 0 < c1 - c0 <= E.MAX_GRID_SIDE
            area += (r1 - r0) * (c1 - c0)
            cover[r0:r1, c0:c1] += 1
        assert area == h * w and (cover == 1).all()
    assert len(E.plan_tiles(3300, 3300, 12)) == 4
    assert len(E.plan_tiles(100, 30000, 12)) == 1
    # the S2 request of a 1650 x 1650 tile counts 4 x (2 + 1) bytes a pixel
    assert E.request_bytes_per_pixel(E.band_codes("s2")) == 12
    assert E.wire_bytes_per_pixel(E.band_codes("s2")) + E.wire_bytes_per_pixel(E.band_codes("s1")) + \
        E.wire_bytes_per_pixel(E.band_codes("terrain")) == 22  # vs 44 as float32


def test_bad_input_is_a_clear_error(emu, creds):
    src = ee_source(emu, creds)
    geobox = PLACES["utm32N-zurich"][:10, :10]
    with pytest.raises(InputError, match="2017"):
        src.fetch(geobox, 2015)
    with pytest.raises(InputError, match="future"):
        src.fetch(geobox, 2099)
    with pytest.raises(InputError, match="empty"):
        src.fetch(GeoBox((0, 5), geobox.affine, geobox.crs), 2021)
    with pytest.raises(InputError, match="32768 px a side"):
        E.plan_tiles(40_000, 100, 12)
    huge = GeoBox((10, 40_000), geobox.affine, geobox.crs)
    never = E.EarthEngineSource(project="p-unused", url="http://127.0.0.1:9", credentials="anonymous")
    with pytest.raises(InputError, match="40000 x 10 px.*split the area"):
        never.fetch(huge, 2021)  # refused before any request


def test_missing_credentials_say_what_to_set(emu, monkeypatch, tmp_path):
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    monkeypatch.setattr(EC, "_INIT_KEY", None)
    src = E.EarthEngineSource(project="gum-emulator", url=emu.url)
    with pytest.raises(GumError, match="GOOGLE_APPLICATION_CREDENTIALS.*earthengine authenticate"):
        src.fetch(PLACES["utm32N-zurich"][:10, :10], 2021)
    bad = E.EarthEngineSource(project="gum-emulator", url=emu.url, credentials=str(tmp_path / "nope.json"))
    with pytest.raises(GumError, match="nope.json.*does not exist"):
        bad.fetch(PLACES["utm32N-zurich"][:10, :10], 2021)
    (tmp_path / "junk.json").write_text("{}")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "junk.json"))
    with pytest.raises(GumError, match="GOOGLE_APPLICATION_CREDENTIALS.*junk.json.*not a usable"):
        E.EarthEngineSource(project="gum-emulator", url=emu.url).fetch(PLACES["utm32N-zurich"][:10, :10], 2021)


def test_service_account_key_file_works_offline_and_is_never_logged(emu, monkeypatch, tmp_path, caplog):
    """A service-account key whose token_uri is the emulator: the real google-auth JWT flow."""
    rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    from cryptography.hazmat.primitives import serialization

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info = {
        "type": "service_account", "project_id": "gum-emulator", "private_key_id": "k1",
        "private_key": pem, "client_email": "gum@gum-emulator.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": emu.url + "/token",
    }
    path = tmp_path / "key.json"
    path.write_text(json.dumps(info))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    monkeypatch.setattr(EC, "_INIT_KEY", None)
    caplog.set_level(logging.DEBUG)
    src = E.EarthEngineSource(url=emu.url, **FAST)  # project from the key file
    got = src.fetch(PLACES["utm33N-65N"][:40, :40], 2020)
    assert _eq(got.export, SyntheticSource().fetch(PLACES["utm33N-65N"][:40, :40], 2020).export)
    assert emu.stats()["routes"].get("token", 0) >= 1
    assert got.provenance["project"] == "gum-emulator"
    text = caplog.text + repr(src) + json.dumps(got.provenance)
    assert "PRIVATE KEY" not in text and "emulator-token" not in text and str(path) not in repr(src)


def test_recipe_is_the_gum_recipe(emu, creds):
    E.initialize_ee(url=emu.url, project="gum-emulator", credentials=creds)
    import ee

    recipe = E.build_recipe(ee, PLACES["utm32N-zurich"], 2019, with_products=True)
    s2 = json.dumps(ee.serializer.encode(recipe["s2"]))
    for word in ["COPERNICUS/S2_SR_HARMONIZED", "COPERNICUS/S2_CLOUD_PROBABILITY", "s2cloudless",
                 "directionalDistanceTransform", "focalMin", "focalMax", "reduce.median", "MEAN_SOLAR_AZIMUTH_ANGLE",
                 "CLOUDY_PIXEL_PERCENTAGE", "2019-01-01", "2020-01-01"]:
        assert word in s2, word
    s1 = json.dumps(ee.serializer.encode(recipe["s1"]))
    for word in ["COPERNICUS/S1_GRD", "ASCENDING", "DESCENDING", "reduce.mean", "IW", "EW", "bilinear"]:
        assert word in s1, word
    terrain = json.dumps(ee.serializer.encode(recipe["terrain"]))
    for word in ["USGS/SRTMGL1_003", "USGS/GMTED2010_FULL", "be75", "Terrain.products"]:
        assert word in terrain, word
    products = json.dumps(ee.serializer.encode(recipe["products"]))
    for word in ["ESA/WorldCover/v100", "GISA_1972_2019", "WSF_2019"]:
        assert word in products, word
    enc = ee.serializer.encode(E.encode_image(ee, recipe["terrain"], "terrain", 2019))
    assert find_markers(enc) == {"gum_modality": "terrain", "gum_year": 2019, "gum_encoding": "compact"}
    assert "Image.toUint16" in json.dumps(enc) and "Image.toInt16" in json.dumps(enc)


def test_image_counts_in_provenance(emu, creds):
    src = ee_source(emu, creds, count_images=True)
    got = src.fetch(PLACES["utm32N-zurich"][:20, :20], 2021)
    assert got.provenance["image_counts"] == {"s2": 71, "s1_ascending": 31, "s1_descending": 30}


def test_error_classification():
    c = E.classify_error
    assert c(Exception("Total request size (56623104 bytes) must be less than or equal to 50331648 bytes.")) == E.SPLIT
    assert c(Exception("User memory limit exceeded.")) == E.SPLIT
    assert c(Exception("Computation timed out.")) == E.SPLIT
    assert c(Exception("Too many concurrent aggregations.")) == E.RETRY
    assert c(Exception("Quota exceeded for quota metric 'Number of read requests'")) == E.RETRY
    assert c(Exception("An internal error has occurred.")) == E.RETRY
    assert c(ConnectionError("Connection broken: IncompleteRead")) == E.RETRY
    assert c(TimeoutError("HTTPConnectionPool(host='x', port=1): Read timed out. (read timeout=0.4)")) == E.RETRY
    assert c(Exception("Image.select: Pattern 'B4' did not match any bands.")) == E.FATAL
    assert c(Exception("Image.load: Image asset 'X' not found (does not exist or caller does not have access).")) == E.FATAL


def test_backoff_grows_exponentially_with_jitter():
    src = E.EarthEngineSource(project="p-unused", credentials="anonymous", backoff_s=1.0, backoff_max_s=30.0)
    d = [[src._backoff(a) for _ in range(200)] for a in range(7)]
    for a, ds in enumerate(d):
        cap = min(30.0, 2.0**a)
        assert min(ds) >= cap / 2 and max(ds) <= cap
        assert len(set(ds)) > 150  # jittered
    assert np.mean(d[3]) > 3 * np.mean(d[0])


def test_get_source_picks_earth_engine():
    src = get_source("ee", project="my-project", credentials="anonymous", max_in_flight=12)
    assert isinstance(src, E.EarthEngineSource) and src.max_in_flight == 12
    assert "credentials" not in repr(src)
    with pytest.raises(InputError, match="bad options"):
        get_source("ee", colour="blue")
    # KEY=VALUE strings from the command line become the option's type
    src = get_source("ee", project="p-x", credentials="anonymous", max_in_flight="8", with_products="yes",
                     tile_side="256", backoff_s="0.5")
    assert (src.max_in_flight, src.with_products, src.tile_side, src.backoff_s) == (8, True, 256, 0.5)
    with pytest.raises(InputError, match="max_in_flight='lots' is not a valid int"):
        get_source("ee", max_in_flight="lots")


@pytest.mark.slow
def test_cluster_wide_cap_through_a_ray_actor(emu, creds):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        emu.set_faults(latency_s=0.05)
        geobox = PLACES["utm32N-zurich"][:64, :64]
        # two sources (as two workers would have), one cluster-wide cap of 3
        a = ee_source(emu, creds, tile_side=16, max_in_flight=3, threads=6, limiter_scope="cluster")
        b = ee_source(emu, creds, tile_side=16, max_in_flight=3, threads=6, limiter_scope="cluster")
        from gum_ray.mapping.limits import RayLimiter, limiter_for

        for s in (a, b):  # what a job does: one limiter for the source's request limit, shared
            s.use_limiter(limiter_for(s.request_limit()))
        assert isinstance(a.limiter, RayLimiter)
        import threading

        out = {}
        ts = [threading.Thread(target=lambda s=s, k=k: out.__setitem__(k, s.fetch(geobox, 2021))) for k, s in (("a", a), ("b", b))]
        [t.start() for t in ts]
        [t.join(120) for t in ts]
        want = SyntheticSource().fetch(geobox, 2021).export
        assert _eq(out["a"].export, want) and _eq(out["b"].export, want)
        assert emu.stats()["max_in_flight"] <= 3
        assert a.limiter.stats()["max_in_flight"] == 3
        ray.kill(a.limiter._actor)
    finally:
        ray.shutdown()


def test_emulator_serves_the_ee_packages_discovery_document(emu):
    import urllib.error
    import urllib.request

    doc = json.loads(urllib.request.urlopen(emu.url + "/$discovery/rest?version=v1", timeout=10).read())
    assert doc["rootUrl"] == emu.url + "/" and doc["version"] == "v1"
    assert "v1/projects/{projectsId}/image:computePixels" in json.dumps(doc)
    algos = json.loads(urllib.request.urlopen(emu.url + "/v1/projects/gum-emulator/algorithms", timeout=10).read())
    assert any(a["name"] == "algorithms/Image.select" for a in algos["algorithms"])
    # a method the document declares but the emulator does not implement: 501, not 404
    req = urllib.request.Request(emu.url + "/v1/projects/gum-emulator/table:computeFeatures", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 501
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(emu.url + "/nothing/here", timeout=10)
    assert exc.value.code == 404


def test_emulator_in_a_child_process_and_a_pickled_source(creds):
    import pickle

    from gum_ray.sources.ee_emulator import start_emulator_process

    with start_emulator_process(max_seconds=120, rate_429=0.2, seed=1) as emu:
        src = E.EarthEngineSource(project="gum-emulator", credentials="anonymous", url=emu.url, tile_side=32, **FAST)
        src = pickle.loads(pickle.dumps(src))  # as Ray ships it to a worker
        geobox = PLACES["latlon-71N"][:64, :64]
        got = src.fetch(geobox, 2021)
        assert _eq(got.export, SyntheticSource().fetch(geobox, 2021).export)
        st = emu.stats()
        assert st["compute_pixels_ok"] == 12 and st["faults"].get("429", 0) > 0
        pickle.dumps(src)  # still picklable after a fetch


def test_stalled_requests_time_out_and_are_retried(emu, creds):
    emu.set_faults(latency_jitter_s=0.8, seed=5)  # latency uniform in [0, 0.8] s
    geobox = PLACES["utm17N-florida"][:64, :64]
    src = ee_source(emu, creds, tile_side=32, max_in_flight=8, max_attempts=40, timeout_s=0.4)
    got = src.fetch(geobox, 2021)
    assert _eq(got.export, SyntheticSource().fetch(geobox, 2021).export)
    assert src.last_stats.requests == 12 and src.last_stats.retries.get("transport", 0) > 0
