"""Unit tests for JPEG header checks, crop windows and the DALI decoder on CPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mixflow.data.jpeg_header import JpegError, JpegInfo, jpeg_info
from mixflow.decode.crop_windows import random_resized_crop_windows
from mixflow.decode.device import resolve_decode_device


def smooth_image(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth, non-symmetric test picture (JPEG-friendly, so decoders agree closely)."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    fx, _, ph = r.uniform(1, 3), r.uniform(1, 3), r.uniform(0, 6)
    red = 127 + 120 * np.sin(2 * np.pi * fx * xx / w + ph)
    green = 255 * yy / max(1, h - 1)
    blue = 255 * (xx + 2 * yy) / (w + 2 * h)
    arr = np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    return im.convert(mode) if mode != "RGB" else im


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, format="JPEG", **kw)
    return out.getvalue()


# --------------------------------------------------------------------------- jpeg_info


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1), ("CMYK", 4)])
@pytest.mark.parametrize("kw", [{}, {"progressive": True}, {"optimize": True, "quality": 60},
                                {"subsampling": 0, "quality": 98}])
def test_jpeg_info_sizes(mode, channels, kw):
    for h, w in ((37, 81), (120, 33), (1, 1)):
        data = jpeg_bytes(smooth_image(h, w, mode=mode), **kw)
        info = jpeg_info(data)
        assert isinstance(info, JpegInfo)
        assert info == (h, w, channels)
        assert (info.height, info.width, info.channels) == (h, w, channels)
        assert jpeg_info(memoryview(data)) == info


def test_jpeg_info_with_exif_and_trailing_newline():
    im = smooth_image(50, 70)
    exif = Image.Exif()
    exif[0x010F] = "test-camera"
    data = jpeg_bytes(im, exif=exif.tobytes())
    assert jpeg_info(data) == (50, 70, 3)
    assert jpeg_info(data + b"\n") == (50, 70, 3)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_info_truncated(mode):
    data = jpeg_bytes(smooth_image(64, 48, mode=mode), progressive=True)
    for cut in (len(data) // 2, len(data) - 1, 10):
        with pytest.raises(JpegError, match="truncated"):
            jpeg_info(data[:cut])


def test_jpeg_info_not_a_jpeg():
    png = io.BytesIO()
    smooth_image(20, 20).save(png, format="PNG")
    r = np.random.default_rng(0)
    junk = r.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    junk = b"\x00" + junk[1:]
    for data in (png.getvalue(), junk, b"", b"\xff\xd8", b"GIF89a" + b"\x00" * 50):
        with pytest.raises(JpegError, match="not a JPEG"):
            jpeg_info(data)
    assert issubclass(JpegError, ValueError)


def test_jpeg_info_no_frame_header():
    # SOI, a comment segment, then a scan and EOI but no SOF
    data = b"\xff\xd8" + b"\xff\xfe\x00\x05abc" + b"\xff\xda\x00\x02" + b"\x00" * 8 + b"\xff\xd9"
    with pytest.raises(JpegError, match="no frame header"):
        jpeg_info(data)


# --------------------------------------------------------------------------- crop windows


def _fallback(h, w, ratio):
    in_ratio = w / h
    if in_ratio < ratio[0]:
        fw, fh = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(h * ratio[1]), h
    else:
        fw, fh = w, h
    return ((w - fw) // 2, (h - fh) // 2), (fw, fh)


@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.1, 0.5), (1.5, 2.5)),
                                         ((0.2, 0.5), (0.5, 0.8))])
def test_crop_windows_inside_and_within_bounds(scale, ratio):
    r = np.random.default_rng(0)
    b = 400
    heights = r.integers(150, 600, b)
    widths = r.integers(150, 600, b)
    anchors, shapes = random_resized_crop_windows(heights, widths, scale, ratio, np.random.default_rng(1))
    assert anchors.shape == (b, 2) and shapes.shape == (b, 2)
    assert anchors.dtype == np.float32 and shapes.dtype == np.float32
    x, y = anchors[:, 0], anchors[:, 1]
    cw, ch = shapes[:, 0], shapes[:, 1]
    assert np.all(anchors == np.round(anchors)) and np.all(shapes == np.round(shapes))
    assert np.all(x >= 0) and np.all(y >= 0) and np.all(cw >= 1) and np.all(ch >= 1)
    assert np.all(x + cw <= widths) and np.all(y + ch <= heights)
    fallbacks = 0
    for i in range(b):
        fa, fs = _fallback(heights[i], widths[i], ratio)
        if (x[i], y[i]) == fa and (cw[i], ch[i]) == fs:
            fallbacks += 1
            continue
        area = float(heights[i]) * float(widths[i])
        w_, h_ = float(cw[i]), float(ch[i])
        # w = round(sqrt(t*a)), h = round(sqrt(t/a)) with t/area in scale and a in ratio
        assert (w_ - 0.5) * (h_ - 0.5) <= scale[1] * area + 1e-6
        assert (w_ + 0.5) * (h_ + 0.5) >= scale[0] * area - 1e-6
        assert (w_ - 0.5) / (h_ + 0.5) <= ratio[1] + 1e-9
        assert (w_ + 0.5) / (h_ - 0.5) >= ratio[0] - 1e-9
    assert fallbacks < b // 10
    # the anchors use the whole free range (not always the corner or the centre)
    assert len(np.unique(x)) > b // 4 and len(np.unique(y)) > b // 4


def test_crop_windows_fallback_centre_crop():
    # scale (1, 1) with ratio 2 can never fit a square: centre crop with the ratio clamped
    anchors, shapes = random_resized_crop_windows(np.array([100]), np.array([100]), (1.0, 1.0), (2.0, 2.0),
                                                  np.random.default_rng(0))
    assert anchors.tolist() == [[0.0, 25.0]]
    assert shapes.tolist() == [[100.0, 50.0]]
    # wide image, ratio 1: a centred square of the full height
    anchors, shapes = random_resized_crop_windows(np.array([100]), np.array([400]), (1.0, 1.0), (1.0, 1.0),
                                                  np.random.default_rng(0))
    assert anchors.tolist() == [[150.0, 0.0]] and shapes.tolist() == [[100.0, 100.0]]
    # tall image, ratio 1
    anchors, shapes = random_resized_crop_windows(np.array([301]), np.array([100]), (1.0, 1.0), (1.0, 1.0),
                                                  np.random.default_rng(0))
    assert anchors.tolist() == [[0.0, 100.0]] and shapes.tolist() == [[100.0, 100.0]]
    # ratio 2..3 on a 90x100 image: 100 x round(100/2)
    anchors, shapes = random_resized_crop_windows(np.array([90]), np.array([100]), (1.0, 1.0), (2.0, 3.0),
                                                  np.random.default_rng(0))
    assert anchors.tolist() == [[0.0, 20.0]] and shapes.tolist() == [[100.0, 50.0]]
    # image already within the ratio: the whole image (by fallback or by an exact hit)
    for seed in range(20):
        anchors, shapes = random_resized_crop_windows(np.array([100]), np.array([100]), (1.0, 1.0), (0.5, 2.0),
                                                      np.random.default_rng(seed))
        assert anchors.tolist() == [[0.0, 0.0]] and shapes.tolist() == [[100.0, 100.0]]


def test_crop_windows_full_scale_full_ratio_is_whole_image():
    h = np.array([50, 80, 64])
    w = np.array([50, 80, 64])
    anchors, shapes = random_resized_crop_windows(h, w, (1.0, 1.0), (1.0, 1.0), np.random.default_rng(3))
    assert anchors.tolist() == [[0, 0]] * 3
    assert shapes.tolist() == [[50, 50], [80, 80], [64, 64]]


def test_crop_windows_deterministic_per_seed():
    h = np.full(64, 300)
    w = np.full(64, 400)
    a1, s1 = random_resized_crop_windows(h, w, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(5))
    a2, s2 = random_resized_crop_windows(h, w, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(5))
    a3, s3 = random_resized_crop_windows(h, w, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(6))
    assert np.array_equal(a1, a2) and np.array_equal(s1, s2)
    assert not (np.array_equal(a1, a3) and np.array_equal(s1, s3))
    assert len({tuple(v) for v in s1}) > 50


# --------------------------------------------------------------------------- device choice


def test_resolve_decode_device():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_decode_device("gpu", gpus_available=False)
    assert resolve_decode_device("auto", gpus_available=False) == "cpu"
    assert resolve_decode_device("auto", gpus_available=True) == "gpu"
    assert resolve_decode_device("cpu", gpus_available=True) == "cpu"
    assert resolve_decode_device("gpu", gpus_available=True) == "gpu"
    with pytest.raises(ValueError, match="auto, cpu, gpu"):
        resolve_decode_device("tpu", gpus_available=False)


# --------------------------------------------------------------------------- DALI decoder (CPU)


H, W = 48, 64


@pytest.fixture(scope="module")
def images():
    """Five different pictures of H x W as (PIL RGB decode, JPEG bytes)."""
    out = []
    for i in range(5):
        data = jpeg_bytes(smooth_image(H, W, seed=i), quality=95)
        out.append((np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), data))
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["dali_resize", "opencv_resize"])
def decoder(request):
    """The CPU decoder, resizing in DALI or (the default fast path) with OpenCV on the host."""
    from mixflow.decode.dali_image_decoder import DaliImageDecoder

    return DaliImageDecoder((H, W), max_batch=5, device="cpu", antialias=False, host_resize=request.param)


def full_windows(n, h=H, w=W):
    return np.zeros((n, 2), np.float32), np.tile(np.array([w, h], np.float32), (n, 1))


def as_buffers(datas):
    return [np.frombuffer(d, dtype=np.uint8) for d in datas]


def test_dali_full_window_matches_pil(decoder, images):
    pil = np.stack([p for p, _ in images])
    anchors, shapes = full_windows(5)
    out = decoder.decode(as_buffers([d for _, d in images]), anchors, shapes, np.zeros(5))
    assert out.shape == (5, H, W, 3) and out.dtype == np.uint8
    diff = np.abs(out.astype(np.int16) - pil.astype(np.int16))
    assert diff.mean() < 3
    # the samples are not mixed up: each is closest to its own reference
    for i in range(5):
        errs = [np.abs(out[i].astype(np.int16) - pil[j]).mean() for j in range(5)]
        assert int(np.argmin(errs)) == i


def test_dali_flip_is_exact_mirror(decoder, images):
    anchors, shapes = full_windows(5)
    datas = as_buffers([d for _, d in images])
    plain = decoder.decode(datas, anchors, shapes, np.zeros(5))
    flips = np.array([1, 0, 1, 1, 0])
    mixed = decoder.decode(datas, anchors, shapes, flips)
    for i in range(5):
        expected = plain[i, :, ::-1] if flips[i] else plain[i]
        assert np.array_equal(mixed[i], expected)
    assert not np.array_equal(mixed[0], plain[0])


def test_dali_variable_batch_sizes(decoder, images):
    datas = as_buffers([d for _, d in images])
    a5, s5 = full_windows(5)
    five = decoder.decode(datas, a5, s5, np.zeros(5))
    a3, s3 = full_windows(3)
    three = decoder.decode(datas[2:], a3, s3, np.zeros(3))
    assert three.shape == (3, H, W, 3)
    assert np.array_equal(three, five[2:])
    one = decoder.decode(datas[:1], *full_windows(1), np.ones(1))
    assert np.array_equal(one[0], five[0, :, ::-1])
    again = decoder.decode(datas, a5, s5, np.zeros(5))
    assert np.array_equal(again, five)
    with pytest.raises(ValueError, match="expected 1..5"):
        decoder.decode(datas + datas[:1], *full_windows(6), np.zeros(6))
    with pytest.raises(ValueError, match="expected 1..5"):
        decoder.decode([], *full_windows(0), np.zeros(0))


def test_dali_crop_window_axis_order():
    """Windows are (x, y) / (w, h): a non-square crop of a non-square image matches PIL's crop."""
    from mixflow.decode.dali_image_decoder import DaliImageDecoder

    data = jpeg_bytes(smooth_image(90, 120, seed=7), quality=95)
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    x0, y0, cw, ch = 40, 16, 56, 32
    dec = DaliImageDecoder((ch, cw), max_batch=2, device="cpu")
    out = dec.decode(as_buffers([data]), np.array([[x0, y0]], np.float32), np.array([[cw, ch]], np.float32),
                     np.zeros(1))
    assert out.shape == (1, ch, cw, 3)
    ref = pil[y0:y0 + ch, x0:x0 + cw]
    assert np.abs(out[0].astype(np.int16) - ref).mean() < 3
    # the transposed window would be clearly different
    wrong = pil[x0:x0 + ch, y0:y0 + cw]
    assert np.abs(out[0].astype(np.int16) - wrong).mean() > 10


def test_dali_grayscale_jpeg_gives_three_equal_channels(decoder):
    data = jpeg_bytes(smooth_image(H, W, seed=3, mode="L"), quality=95)
    pil = np.asarray(Image.open(io.BytesIO(data)))
    out = decoder.decode(as_buffers([data, data]), *full_windows(2), np.array([0, 1]))
    assert out.shape == (2, H, W, 3)
    assert np.array_equal(out[0, ..., 0], out[0, ..., 1]) and np.array_equal(out[0, ..., 1], out[0, ..., 2])
    assert np.abs(out[0, ..., 0].astype(np.int16) - pil).mean() < 3
    assert np.array_equal(out[1], out[0, :, ::-1])


def test_dali_resize_to_output_size(images):
    from mixflow.decode.dali_image_decoder import DaliImageDecoder

    dec = DaliImageDecoder((24, 40), max_batch=5, device="cpu", antialias=True)
    out = dec.decode(as_buffers([d for _, d in images]), *full_windows(5), np.zeros(5))
    assert out.shape == (5, 24, 40, 3)
    for i, (pil, _) in enumerate(images):
        ref = np.asarray(Image.fromarray(pil).resize((40, 24), Image.BILINEAR))
        assert np.abs(out[i].astype(np.int16) - ref).mean() < 6


def test_dali_normalize(decoder, images):
    from mixflow.decode.dali_image_decoder import DaliImageDecoder

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = DaliImageDecoder((H, W), max_batch=5, device="cpu", normalize=True, mean=mean, std=std,
                            host_resize=decoder.host_resize)
    datas = as_buffers([d for _, d in images])
    flips = np.array([0, 1, 0, 1, 1])
    anchors, shapes = full_windows(5)
    got = norm.decode(datas, anchors, shapes, flips)
    ref_u8 = decoder.decode(datas, anchors, shapes, flips)
    assert got.shape == (5, 3, H, W) and got.dtype == np.float32
    m = np.array(mean, np.float32).reshape(1, 3, 1, 1) * 255
    s = np.array(std, np.float32).reshape(1, 3, 1, 1) * 255
    expected = (ref_u8.transpose(0, 3, 1, 2).astype(np.float32) - m) / s
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


def test_dali_decoder_rejects_bad_device():
    from mixflow.decode.dali_image_decoder import DaliImageDecoder

    with pytest.raises(ValueError, match="'cpu' or 'gpu'"):
        DaliImageDecoder((8, 8), max_batch=1, device="tpu")
    with pytest.raises(ValueError, match="host_resize is the CPU path without antialias"):
        DaliImageDecoder((8, 8), max_batch=1, device="cpu", antialias=True, host_resize=True)


def test_opencv_resize_matches_dali_resize_on_random_crops():
    """The two resize paths sample the same pixel centres: on random crops (downscaled and
    upscaled, flipped or not) they differ by rounding only."""
    from mixflow.decode.dali_image_decoder import DaliImageDecoder

    datas = [jpeg_bytes(smooth_image(150 + 10 * i, 200 - 7 * i, seed=i), quality=95) for i in range(6)]
    heights, widths = np.array([150 + 10 * i for i in range(6)]), np.array([200 - 7 * i for i in range(6)])
    anchors, shapes = random_resized_crop_windows(heights, widths, (0.08, 1.0), (3 / 4, 4 / 3),
                                                  np.random.default_rng(5))
    flips = np.array([0, 1, 1, 0, 1, 0])
    outs = [DaliImageDecoder((96, 80), max_batch=6, device="cpu", host_resize=host).decode(
        as_buffers(datas), anchors, shapes, flips) for host in (False, True)]
    diff = np.abs(outs[0].astype(np.int16) - outs[1])
    assert diff.max() <= 1 and diff.mean() < 0.5
    assert (shapes[:, 0] < 80).any() and (shapes[:, 0] > 80).any(), "both up- and downscaling exercised"


def test_resize_choice_follows_device_and_antialias():
    from mixflow.config import DecodeSpec

    assert DecodeSpec().host_resize("cpu") and not DecodeSpec().host_resize("gpu")
    assert not DecodeSpec(antialias=True).host_resize("cpu")
    assert not DecodeSpec(resize="dali").host_resize("cpu")
    assert DecodeSpec(resize="opencv").host_resize("cpu")
    with pytest.raises(ValueError, match="resize 'opencv' is the CPU fast path"):
        DecodeSpec(resize="opencv", antialias=True)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_header_reads_the_exif_orientation(orientation):
    """Orientations 5-8 swap width and height: DALI decodes (and crops) the image as displayed."""
    from mixflow.data.jpeg_header import jpeg_header

    exif = Image.Exif()
    exif[0x010F] = "test-camera"
    exif[0x0112] = orientation
    header = jpeg_header(jpeg_bytes(smooth_image(50, 70), exif=exif.tobytes()))
    assert (header.height, header.width, header.orientation) == (50, 70, orientation)
    assert header.oriented_size == ((70, 50) if orientation >= 5 else (50, 70))
