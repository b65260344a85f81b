import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gum_ray.errors import InputError
from gum_ray.inference import (CROP, InferenceEngine, InferenceSettings, crop_starts,
                               probability_to_uint8, window_2d)
from gum_ray.model import ModelSpec, build_model, randomize

TINY = ModelSpec(10, 8, 4)


@pytest.fixture(scope="module")
def tiny_model():
    return randomize(build_model(TINY), 7)


def _engine(model, **kw):
    kw.setdefault("precision", "fp32")
    kw.setdefault("device", "cpu")
    return InferenceEngine(model, InferenceSettings(**kw))


def _scene(h, w, c=10, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (c, h, w)).astype(np.float32)


@pytest.mark.parametrize("n,s", [(256, 256), (947, 256), (931, 192), (1000, 128), (257, 200), (300, 1)])
def test_crop_starts_follow_mmseg_slide_rule(n, s):
    h_grids = max(n - CROP + s - 1, 0) // s + 1
    expected = [max(min(i * s + CROP, n) - CROP, 0) for i in range(h_grids)]
    starts = crop_starts(n, s)
    assert starts == expected
    covered = np.zeros(n, bool)
    for a in starts:
        covered[a:a + CROP] = True
    assert covered.all() and starts[-1] == n - CROP


@pytest.mark.parametrize("h,w", [(1, 1), (17, 300), (120, 120), (255, 257), (300, 31), (513, 260)])
def test_any_size_works(tiny_model, h, w):
    pred = _engine(tiny_model, stride=192, batch_size=3).predict(_scene(h, w))
    assert pred.probability.shape == (h, w) and pred.label.shape == (h, w)
    assert np.isfinite(pred.probability).all()
    assert ((pred.probability >= 0) & (pred.probability <= 1)).all()
    np.testing.assert_array_equal(pred.label, (pred.probability > 0.5).astype(np.uint8))


def test_overlap_blend_is_a_weighted_mean_of_crop_probabilities(tiny_model):
    x = _scene(300, 300, seed=1)
    eng = _engine(tiny_model, stride=44, batch_size=5)
    pred = eng.predict(x)
    # reference: every crop separately, window-weighted softmax mean
    win = window_2d("hann")
    num = np.zeros((300, 300)); den = np.zeros((300, 300))
    with torch.inference_mode():
        for y in crop_starts(300, 44):
            for xx in crop_starts(300, 44):
                crop = torch.from_numpy(x[None, :, y:y + CROP, xx:xx + CROP].copy())
                logits = tiny_model.encode_decode(crop, [dict(img_shape=(CROP, CROP))])
                p = torch.softmax(logits, 1)[0, 1].numpy()
                num[y:y + CROP, xx:xx + CROP] += p * win
                den[y:y + CROP, xx:xx + CROP] += win
    np.testing.assert_allclose(pred.probability, num / den, atol=2e-5)
    assert eng.crops_run == len(crop_starts(300, 44)) ** 2


def test_streaming_equals_in_memory_and_bounds_rows(tiny_model):
    x = _scene(1100, 270, seed=2)
    eng = _engine(tiny_model, stride=128, batch_size=4)
    full = eng.predict(x)
    reads = []

    def read_rows(a, b):
        reads.append((a, b))
        return x[:, a:b]

    prob = np.full((1100, 270), np.nan, np.float32)
    last = 0
    for y0, p, lab in eng.predict_rows(read_rows, 1100, 270):
        assert y0 == last  # consecutive blocks, top to bottom
        prob[y0:y0 + p.shape[0]] = p
        last = y0 + p.shape[0]
    assert last == 1100
    np.testing.assert_array_equal(prob, full.probability)
    # rows are read once each, in order, in small blocks: memory does not grow with the scene
    assert reads[0][0] == 0 and all(b1 == a2 for (_, b1), (a2, _) in zip(reads, reads[1:]))
    assert max(b - a for a, b in reads) <= CROP + 128


def test_deterministic_and_batch_size_invariant(tiny_model):
    x = _scene(400, 400, seed=3)
    a = _engine(tiny_model, batch_size=1).predict(x)
    b = _engine(tiny_model, batch_size=1).predict(x)
    c = _engine(tiny_model, batch_size=7).predict(x)
    np.testing.assert_array_equal(a.probability, b.probability)
    np.testing.assert_allclose(a.probability, c.probability, atol=1e-5)


def test_bf16_autocast_close_to_fp32(tiny_model):
    x = _scene(256, 256, seed=4)
    p32 = _engine(tiny_model).predict(x).probability
    p16 = _engine(tiny_model, precision="bf16").predict(x).probability
    assert np.abs(p32 - p16).max() < 0.05


def test_settings_validation(tiny_model):
    with pytest.raises(InputError, match="stride"):
        InferenceSettings(stride=0)
    with pytest.raises(InputError, match="stride"):
        InferenceSettings(stride=300)
    with pytest.raises(InputError, match="batch"):
        InferenceSettings(batch_size=0)
    with pytest.raises(InputError, match="fp16 needs a CUDA"):
        _engine(tiny_model, precision="fp16")
    with pytest.raises(InputError, match="channels"):
        _engine(tiny_model).predict(_scene(10, 10, c=11))


def test_probability_to_uint8():
    p = np.array([[0.0, 0.004, 0.5, 1.0, np.nan]], np.float32)
    valid = np.array([[True, True, True, False, True]])
    np.testing.assert_array_equal(probability_to_uint8(p, valid), [[0, 0, 50, 255, 255]])


@pytest.mark.parametrize("n,s,origin", [(700, 192, 0), (700, 192, 5), (1000, 128, 12345), (256, 64, 7)])
def test_crop_starts_on_a_global_lattice(n, s, origin):
    starts = crop_starts(n, s, origin=origin)
    assert starts[0] == 0 and starts[-1] == n - CROP and starts == sorted(set(starts))
    inner = starts[1:-1]
    assert all((a + origin) % s == 0 for a in inner)
    covered = np.zeros(n, bool)
    for a in starts:
        covered[a:a + CROP] = True
    assert covered.all()


def test_overlapping_scenes_agree_when_crops_share_a_lattice(tiny_model):
    """Two windows of one big scene (as neighbouring cells with halos): with the lattice origin they
    predict the same values where both see every crop; with mmseg's rule they do not."""
    big = _scene(900, 960, seed=8)
    a_rows, b_rows = slice(0, 800), slice(100, 900)
    a_cols, b_cols = slice(0, 900), slice(37, 960)
    eng = _engine(tiny_model, stride=128, batch_size=1)
    pa = eng.predict(big[:, a_rows, a_cols], origin=(0, 0)).probability
    pb = eng.predict(big[:, b_rows, b_cols], origin=(100, 37)).probability
    # the core both windows hold with a full crop of margin around it: rows 356-544, cols 293-644
    ra, ca = slice(100 + CROP, 800 - CROP), slice(37 + CROP, 900 - CROP)
    rb, cb = slice(CROP, 700 - CROP), slice(CROP, 863 - CROP)
    np.testing.assert_allclose(pa[ra, ca], pb[rb, cb], atol=1e-5)
    qa = eng.predict(big[:, a_rows, a_cols]).probability
    qb = eng.predict(big[:, b_rows, b_cols]).probability
    diff = np.abs(qa[ra, ca] - qb[rb, cb])
    assert diff.max() > 1e-3


def test_crop_hits_equal_a_check_of_every_crop():
    """Crops with no valid pixel are skipped: the one-pass rule equals looking into every crop,
    for masks with holes at crop borders, empty and full masks, and one-crop scenes."""
    from gum_ray.inference import crop_hits

    rng = np.random.default_rng(5)
    for h, w, density in [(700, 900, 1e-5), (700, 900, 0.0), (700, 900, 1.0), (256, 256, 1e-4),
                          (1000, 300, 2e-5), (257, 1200, 3e-5)]:
        mask = torch.from_numpy(rng.random((h, w)) < density)
        mask[h // 2, 255] = density > 0  # a lone pixel on a crop's last column
        ys, xs = crop_starts(h, 192), crop_starts(w, 192)
        want = [bool(mask[y : y + CROP, x : x + CROP].any()) for y in ys for x in xs]
        assert crop_hits(mask, ys, xs) == want


ARENA_PROBE = r"""
import resource, sys, threading
import numpy as np
sys.path.insert(0, {repo!r})
if {one_arena}:
    from gum_ray.inference import one_malloc_arena
    one_malloc_arena()
faults = []

def reader():
    for _ in range(6):  # a cell's worth of arrays, made, filled and freed, as a reader thread does
        f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        arrays = [np.ones((4, 3064, 2002), np.uint16), np.ones((2, 3064, 2002), np.int16),
                  np.ones((4, 3064, 2002), np.uint8), np.ones((3, 3064, 2002), np.uint8), bytes(30_000_000)]
        del arrays
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)

t = threading.Thread(target=reader)
t.start()
t.join()
print(max(faults[2:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's arenas")
def test_reader_threads_reuse_freed_memory_with_one_malloc_arena():
    """A reader thread's arrays and compressed objects (a 0.25 degree cell's: 190 MB) freed and
    made again fault no page in once the process has one malloc arena (a model actor beside a GPU,
    before its readers start); in a thread arena of its own each cell's memory faults in afresh."""
    repo = str(Path(__file__).resolve().parents[1])
    run = lambda one: int(subprocess.run([sys.executable, "-c", ARENA_PROBE.format(repo=repo, one_arena=one)],
                                         capture_output=True, text=True, check=True).stdout)
    with_one = run(True)
    assert with_one < 500, with_one
    without = run(False)
    assert without > 20 * max(with_one, 1) or without > 5000, (without, with_one)
