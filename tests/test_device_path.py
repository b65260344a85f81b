"""The device path (DESIGN decision 13): compact integers in, the model's preprocessing as tensor ops,
crops cut and blended on the engine's device, uint8 out. Same classes as the numpy path."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gum_ray import bands
from gum_ray.inference import InferenceEngine, InferenceSettings
from gum_ray.model import Gum1, ModelSpec, build_model, randomize
from gum_ray.unet import InterpConv

TINY = ModelSpec(10, 8, 4)
TINY13 = ModelSpec(13, 8, 4)


@pytest.fixture(scope="module")
def tiny():
    return Gum1.from_module(randomize(build_model(TINY), 5))


def fake_export(h, w, n=11, seed=0):
    rng = np.random.default_rng(seed)
    x = np.empty((n, h, w), np.float32)
    x[0:4] = rng.uniform(-0.05, 1.2, (4, h, w))
    x[4:8] = rng.uniform(-35, 3, (4, h, w))
    x[8] = rng.uniform(-10, 3000, (h, w))
    x[9] = rng.uniform(0, 95, (h, w))
    x[10] = rng.uniform(0, 360, (h, w))
    if n == 14:
        x[11:14] = rng.integers(0, 2, (3, h, w))
    x[0:4, :40, :50] = np.nan  # no Sentinel-2: no data
    x[1, 60, 70] = np.nan
    x[6:8, -30:] = np.nan  # no descending pass
    x[9, 5, 5] = np.inf
    return x


@pytest.mark.parametrize("n", [11, 14])
def test_torch_preprocess_and_decode_equal_numpy_bit_for_bit(n):
    export = fake_export(70, 90, n)
    ref = bands.preprocess(export)
    got = bands.preprocess(torch.from_numpy(export))
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), ref)
    parts = bands.encode_compact(export)
    dec_ref = bands.decode_compact(parts)
    dec = bands.decode_compact({k: torch.from_numpy(v) for k, v in parts.items()})
    np.testing.assert_array_equal(dec.numpy(), dec_ref)  # NaNs in the same places too
    rows = bands.decode_compact({k: torch.from_numpy(v) for k, v in parts.items()}, slice(10, 33))
    np.testing.assert_array_equal(rows.numpy(), dec_ref[:, 10:33])
    np.testing.assert_array_equal(bands.validity_mask(dec).numpy(), bands.validity_mask(dec_ref))


@pytest.mark.parametrize("spec", [TINY, TINY13])
@pytest.mark.parametrize("by_mask", [True, False], ids=["cpu branches", "gpu branchless"])
@pytest.mark.parametrize("rows_per_block", [64, 1])
@pytest.mark.parametrize("channels_last", [True, False], ids=["pixel-major", "channel-major"])
def test_table_lookup_equals_decode_and_preprocess_for_every_code(spec, rows_per_block, by_mask, channels_last):
    """GUM 1 decodes and preprocesses compact integers by table lookup (bands.code_tables): every
    code of every band, absent, present and mixed, gives the values and validity of decode_compact
    followed by the model's preprocessing, bit for bit; in blocks of one row too, where a CPU
    takes each band's block by what its mask holds (all absent, all present, mixed). A CPU engine
    running channels_last holds the input pixel-major ((H, W, C) in memory, so crops copy
    without a transpose); the values are the same either way."""
    model = Gum1.from_module(build_model(spec))
    n = 65536
    rng = np.random.default_rng(1)
    mixed = rng.integers(0, 2, (4, n))
    parts = {"s2": np.broadcast_to(np.arange(n).astype(np.uint16), (4, 3, n)).copy()}
    for part, k in (("s1", 4), ("terrain", 3)):
        parts[part] = np.broadcast_to((np.arange(n) - 32768).astype(np.int16), (k, 3, n)).copy()
    for part, k in (("s2", 4), ("s1", 4), ("terrain", 3)):
        m = np.zeros((k, 3, n), np.uint8)
        m[:, 1] = 1  # row 0: absent, row 1: present, row 2: some of each
        m[:, 2] = mixed[:k]
        parts[part + "_mask"] = m
    if spec.with_products:
        parts["products"] = np.broadcast_to((np.arange(n) % 256).astype(np.uint8), (3, 3, n)).copy()
    export = bands.decode_compact(parts)
    engine = InferenceEngine(model, InferenceSettings(device="cpu", channels_last=channels_last))
    engine._by_mask = by_mask  # the way a GPU engine looks bands up, run on the CPU
    x, valid = engine.prepare_compact(parts, rows_per_block=rows_per_block)
    assert engine._code_tables() is not None  # the lookup ran
    assert (x.permute(1, 2, 0) if channels_last else x).is_contiguous()
    np.testing.assert_array_equal(x.numpy(), model.preprocess(export))
    np.testing.assert_array_equal(valid.numpy(), model.validity(export))


@pytest.mark.parametrize("spec", [TINY, TINY13])
@pytest.mark.parametrize("by_mask", [True, False], ids=["cpu branches", "gpu branchless"])
def test_parts_read_as_just_the_bands_the_engine_reads_give_the_same_input(spec, by_mask):
    """GUM 1 reads no elevation (terrain band 0): the engine says so (compact_bands), the cache
    then decompresses only terrain bands 1-2, and parts that hold just those give the input,
    validity and quality of whole parts; a family that reads every band asks for all."""
    from gum_ray.gum2 import Gum2

    model = Gum1.from_module(build_model(spec))
    engine = InferenceEngine(model, InferenceSettings(device="cpu"))
    engine._by_mask = by_mask
    bands_read = engine.compact_bands()
    want = {"s2": slice(0, 4), "s1": slice(0, 4), "terrain": slice(1, 3)}
    if spec.with_products:
        want["products"] = slice(0, 3)
    assert bands_read == want
    parts = bands.encode_compact(fake_export(130, 90, n=spec.in_channels + 1, seed=2))
    parts["terrain_mask"][0, 5:9] = 0  # elevation alone absent somewhere: quality sees it
    parts["terrain_mask"][2, 20:22] = 0
    partial = {k: (v[bands_read[k]].copy() if k in bands_read else v) for k, v in parts.items()}
    assert partial["terrain"].shape[0] == 2
    got, whole = engine.prepare_compact(partial, quality=True), engine.prepare_compact(parts, quality=True)
    for a, b in zip(got, whole):
        assert torch.equal(a, b)
    assert InferenceEngine(Gum2.random(8, seed=2, size=32), InferenceSettings(device="cpu")).compact_bands() is None


def test_code_tables_refuse_a_preprocessing_that_mixes_bands():
    def mixing(export):
        out = bands.preprocess(export)
        out[0] = out[0] + out[1]
        return out

    with pytest.raises(ValueError, match="mixes bands"):
        bands.code_tables(mixing, bands.GUM1_CHANNEL_SOURCES[:10])


def test_compact_input_equals_float_export_input(tiny):
    export = bands.decode_compact(bands.encode_compact(fake_export(300, 280)))
    engine = InferenceEngine(tiny, InferenceSettings.seed(device="cpu", batch_size=3))
    x, valid = engine.prepare_compact(bands.encode_compact(export))
    np.testing.assert_array_equal(x.numpy(), tiny.preprocess(export))
    np.testing.assert_array_equal(valid.numpy(), tiny.validity(export))
    got = engine.predict_compact(bands.encode_compact(export), origin=(3, 7))
    ref = engine.predict(tiny.preprocess(export), origin=(3, 7))
    v = tiny.validity(export)
    np.testing.assert_array_equal(got.label[v], ref.label[v])
    np.testing.assert_array_equal(got.probability[v], ref.probability[v])
    assert np.isnan(got.probability[~v]).all()


def test_device_path_classes_equal_the_numpy_path_at_seed_settings(tiny):
    """The old path: numpy preprocessing, crops stacked on the host, mmseg's logits average."""
    export = fake_export(300, 300, seed=3)
    x = bands.preprocess(export)
    engine = InferenceEngine(tiny, InferenceSettings.seed(device="cpu"))
    got = engine.predict(torch.from_numpy(x))
    acc = np.zeros((2, 300, 300), np.float32)
    cnt = np.zeros((300, 300), np.float32)
    with torch.inference_mode():
        for y in (0, 44):
            for xx in (0, 44):
                logits = tiny.forward(torch.from_numpy(x[None, :, y:y + 256, xx:xx + 256].copy()))[0].numpy()
                acc[:, y:y + 256, xx:xx + 256] += logits
                cnt[y:y + 256, xx:xx + 256] += 1
    mean = acc / cnt
    np.testing.assert_array_equal(got.label, (mean[1] > mean[0]).astype(np.uint8))


def test_buffers_reused_across_calls_give_identical_results(tiny):
    x = bands.preprocess(fake_export(530, 300, seed=4))
    engine = InferenceEngine(tiny, InferenceSettings(device="cpu", precision="fp32", batch_size=3, stride=100))
    a = engine.predict(x)
    b = engine.predict(x)
    rows1 = list(engine.predict_rows(lambda s, e: x[:, s:e], 530, 300))
    rows2 = list(engine.predict_rows(lambda s, e: torch.from_numpy(x[:, s:e]), 530, 300))
    np.testing.assert_array_equal(a.probability, b.probability)
    for (y1, p1, l1), (y2, p2, l2) in zip(rows1, rows2):
        assert y1 == y2
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(p1, a.probability[y1:y1 + p1.shape[0]])
        np.testing.assert_array_equal(l1, a.label[y1:y1 + p1.shape[0]])


def test_scenes_batched_together_equal_scenes_alone(tiny):
    scenes = [bands.preprocess(fake_export(h, w, seed=s)) for s, (h, w) in enumerate([(300, 260), (120, 90), (256, 700)])]
    engine = InferenceEngine(tiny, InferenceSettings.seed(device="cpu", batch_size=4))
    together = {k: (p.numpy(), lab.numpy()) for k, p, lab in engine.predict_scenes(
        (i, x, None, None) for i, x in enumerate(scenes))}
    for i, x in enumerate(scenes):
        alone = InferenceEngine(tiny, InferenceSettings.seed(device="cpu", batch_size=1)).predict(x)
        np.testing.assert_array_equal(together[i][1], alone.label)
        np.testing.assert_allclose(together[i][0], alone.probability, atol=1e-4)  # batch 4 vs 1: rounding


@pytest.mark.parametrize("seed_settings", [False, True], ids=["defaults, stride 100", "seed settings"])
def test_crops_cut_by_gather_and_blended_by_scatter_equal_the_per_crop_path(tiny, seed_settings):
    """Off a CPU the engine cuts a batch's crops of a scene by one gather and blends them by one
    scatter-add (InferenceEngine._gather); run here on the CPU against the per-crop copies and adds:
    batches that span scenes, crops skipped where the mask holds nothing, three crops deep
    overlaps (stride 100), both merges. On one thread the scatter adds in crop order, bit for bit."""
    shapes = [(300, 260), (120, 90), (256, 700), (530, 300)]
    scenes = []
    for s, (h, w) in enumerate(shapes):
        export = fake_export(h, w, seed=10 + s)
        valid = np.ones((h, w), bool)
        valid[:, : w // 3] = False  # crops over the left third hold nothing: skipped
        scenes.append((s, torch.from_numpy(bands.preprocess(export)), torch.from_numpy(valid), (s, 2 * s)))
    make = (lambda: InferenceSettings.seed(device="cpu", batch_size=5)) if seed_settings else \
        (lambda: InferenceSettings(device="cpu", precision="fp32", batch_size=5, stride=100))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = []
        for gather in (False, True):
            engine = InferenceEngine(tiny, make())
            engine._gather = gather  # the way a GPU engine cuts and blends, run on the CPU
            results.append({k: (p.numpy(), lab.numpy()) for k, p, lab in engine.predict_scenes(iter(scenes))})
            assert engine.crops_run > 0
    finally:
        torch.set_num_threads(threads)
    per_crop, gathered = results
    assert sorted(per_crop) == sorted(gathered) == list(range(len(shapes)))
    for k in per_crop:
        np.testing.assert_array_equal(gathered[k][0], per_crop[k][0])
        np.testing.assert_array_equal(gathered[k][1], per_crop[k][1])
        assert np.isnan(gathered[k][0][:, : shapes[k][1] // 3]).all()


def test_rows_encoded_on_the_device_equal_the_host_encoding(tiny):
    from gum_ray.imagery import probability_to_uint8

    export = fake_export(400, 300, seed=6)
    x, valid = bands.preprocess(export), bands.validity_mask(export)
    engine = InferenceEngine(tiny, InferenceSettings(device="cpu", precision="fp32", batch_size=2))
    plain = engine.predict(x)
    p8 = np.empty((400, 300), np.uint8)
    c8 = np.empty((400, 300), np.uint8)
    for y0, a, b in engine.predict_rows(lambda s, e: (x[:, s:e], valid[s:e]), 400, 300, encode=True):
        p8[y0:y0 + a.shape[0]], c8[y0:y0 + a.shape[0]] = a, b
    np.testing.assert_array_equal(p8, probability_to_uint8(plain.probability, valid))
    np.testing.assert_array_equal(c8, np.where(valid, plain.label, 255))


def test_folded_batchnorm_and_channels_last_stay_close_and_leave_the_model_alone(tiny):
    x = bands.preprocess(fake_export(256, 256, seed=7))
    before = {k: v.clone() for k, v in tiny.module.state_dict().items()}
    exact = InferenceEngine(tiny, InferenceSettings.seed(device="cpu")).predict(x)
    fast = InferenceEngine(tiny, InferenceSettings(stride=256, window="none", merge="logits", precision="fp32",
                                                   device="cpu"))
    assert fast.folded > 0 and fast.memory_format == torch.channels_last
    ups = [m for m in fast.model.module.modules() if isinstance(m, InterpConv)]
    assert ups and all(m.conv_first for m in ups)  # folded: 1 x 1 conv before the upsampling
    assert not any(m.conv_first for m in tiny.module.modules() if isinstance(m, InterpConv))
    np.testing.assert_allclose(fast.predict(x).probability, exact.probability, atol=1e-4)
    after = tiny.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # folding worked on a copy
    seed = InferenceEngine(tiny, InferenceSettings.seed(device="cpu"))
    assert seed.folded == 0 and seed.memory_format == torch.contiguous_format
    assert not any(m.conv_first for m in seed.model.module.modules() if isinstance(m, InterpConv))


def test_13_channel_model_through_compact_parts():
    model = Gum1.from_module(randomize(build_model(TINY13), 2))
    export = fake_export(260, 270, 14)
    engine = InferenceEngine(model, InferenceSettings.seed(device="cpu"))
    x, _ = engine.prepare_compact(bands.encode_compact(export))
    np.testing.assert_array_equal(x.numpy(), model.preprocess(bands.decode_compact(bands.encode_compact(export))))


def test_cpu_supports_bf16_respects_an_avx2_cap():
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    code = ("from gum_ray.inference import cpu_supports_bf16, resolve_precision; import torch; "
            "print(cpu_supports_bf16(), resolve_precision('auto', torch.device('cpu')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "None"]


@pytest.mark.parametrize("notebook", [False, True])
def test_gum2_preprocessing_on_tensors_and_through_compact_parts(notebook):
    """GUM 2.0 on the device path: its preprocessing (the training's mask value where Sentinel-1 is
    missing, or the notebook's 0 dB) is the same on tensors as on numpy, to the bit, and a cell given
    as compact integers maps the same pixels, clouded ones (Sentinel-1 only) included."""
    from gum_ray.gum2 import Gum2, Gum2Spec

    model = Gum2.random(Gum2Spec(4, 1), seed=3)
    if notebook:
        model = model.as_notebook()
    export = fake_export(280, 300, 14, seed=4)
    export[4:8, 100:140, 200:260] = np.nan  # no Sentinel-1 at all here
    export = bands.decode_compact(bands.encode_compact(export))
    ref = model.preprocess(export)
    got = model.preprocess(torch.from_numpy(export))
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), ref)
    np.testing.assert_array_equal(model.validity(torch.from_numpy(export)).numpy(), model.validity(export))
    v = model.validity(export)
    assert v[:40, :50].all()  # no Sentinel-2 but Sentinel-1: GUM 2.0 maps it

    # default settings keep the model's own preprocessing (the seed settings would switch to the
    # notebook's); fp32 so the classes compare exactly
    engine = InferenceEngine(model, InferenceSettings(device="cpu", precision="fp32"))
    x, valid = engine.prepare_compact(bands.encode_compact(export))
    np.testing.assert_array_equal(x.numpy(), ref)
    np.testing.assert_array_equal(valid.numpy(), v)
    got_p = engine.predict_compact(bands.encode_compact(export), origin=(5, 9))
    want = engine.predict(ref, origin=(5, 9))
    np.testing.assert_array_equal(got_p.label[v], want.label[v])
    np.testing.assert_array_equal(got_p.probability[v], want.probability[v])


def test_input_quality_from_the_mask_bytes_on_the_device_equals_the_host_masks(tiny):
    """A model actor takes a cell's input quality from the uploaded mask bytes (bitwise ANDs on the
    device, prepare_compact(quality=True)): equal to input_quality of each modality's every-band
    mask, for mask bytes of every pattern (each band alone absent, all, none), numpy and torch."""
    from gum_ray.imagery import QUALITY_BITS, compact_input_quality, input_quality

    rng = np.random.default_rng(5)
    parts = bands.encode_compact(fake_export(64, 300, seed=9))
    for m, k in (("s2", 4), ("s1", 4), ("terrain", 3)):
        mask = (rng.random((k, 64, 300)) < 0.8).astype(np.uint8)
        mask[:, :8] = 1
        mask[:, 8:16] = 0
        for b in range(k):  # each band alone absent
            mask[:, 16 + 2 * b : 18 + 2 * b] = 1
            mask[b, 16 + 2 * b : 18 + 2 * b] = 0
        parts[m + "_mask"] = mask
    want = input_quality({m: parts[m + "_mask"].all(axis=0) for m in QUALITY_BITS})
    assert len(np.unique(want)) == 8  # every combination of the three bits occurs
    np.testing.assert_array_equal(compact_input_quality({m: parts[m + "_mask"] for m in QUALITY_BITS}), want)
    engine = InferenceEngine(tiny, InferenceSettings(device="cpu"))
    x, valid, quality = engine.prepare_compact({k: torch.from_numpy(v) for k, v in parts.items()}, quality=True)
    assert quality.dtype == torch.uint8
    np.testing.assert_array_equal(engine.to_host(quality), want)
    x2, valid2 = engine.prepare_compact(parts)  # without: the same input and validity
    assert torch.equal(x, x2) and torch.equal(valid, valid2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_results_downloaded_into_pinned_memory_equal_the_device_values(tiny):
    """On CUDA the results come back through page-locked memory (InferenceEngine.to_host) and
    stay valid after the tensor they came from is gone."""
    engine = InferenceEngine(tiny, InferenceSettings(device="cuda"))
    t = torch.rand((300, 257), device="cuda").half()
    want = t.cpu().numpy()
    got = engine.to_host(t)
    del t
    torch.cuda.synchronize()
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.float16 and got.shape == (300, 257)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shuffled", [False, True], ids=["arrays", "value parts still shuffled"])
def test_cells_uploaded_on_a_side_stream_equal_the_cpu_engine(tiny, shuffled):
    """On CUDA each cell's integers are copied from pinned memory on a stream of their own (value
    parts still byte-shuffled, as a GPU actor's reader leaves them, unshuffled on the compute
    stream after the copy), the cells queued back to back: every cell's input, validity and
    quality equal the CPU engine's."""
    from gum_ray.mapping.stages import TensorMemory
    from gum_ray.shuffled import ShuffledPart, shuffle

    cpu = InferenceEngine(tiny, InferenceSettings(device="cpu", precision="fp32", stride=192))
    gpu = InferenceEngine(tiny, InferenceSettings(device="cuda", precision="fp32", stride=192))
    cells = []
    for seed in range(3):
        parts = bands.encode_compact(fake_export(300, 420, seed=seed))
        memory = TensorMemory(pin=True)
        given = {}
        for k, v in parts.items():
            if not shuffled or v.dtype.itemsize == 1:
                given[k] = memory(v.shape, v.dtype)
                given[k][...] = v
                continue
            rows, blocksize = 64, 16_384  # chunks of 64 rows, the last padded; blocks and a shorter last one
            padded = np.zeros((v.shape[0], -(-v.shape[1] // rows) * rows, v.shape[2]), v.dtype)
            padded[:, : v.shape[1]] = v
            chunks = padded.reshape(-1, rows * v.shape[2])
            data = memory((len(chunks), chunks.shape[1] * v.dtype.itemsize), np.dtype(np.uint8))
            data[...] = [shuffle(c, blocksize) for c in chunks]
            given[k] = ShuffledPart(data, v.shape, v.dtype, rows, blocksize)
        cells.append((parts, {k: memory.tensor_of(a) for k, a in given.items()}))
    outs = [gpu.prepare_compact(t, quality=True) for _, t in cells]  # queued back to back, as an actor does
    for (parts, _), got in zip(cells, outs):
        for g, w in zip(got, cpu.prepare_compact(parts, quality=True)):
            assert torch.equal(g.cpu(), w)
