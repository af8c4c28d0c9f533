"""Every decoder reads real parking codes from rendered lane frames and never crashes."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
from vision_support import CodeFactory, real_code

from gateway_firmware.hardware.decoders import (
    BACKENDS,
    DecoderUnavailable,
    PipelineDecoder,
    make_decoder,
    to_gray,
)
from gateway_firmware.hardware.interfaces import Decoder
from sim_devices.render import (
    BLUR_1_5,
    CLEAN,
    GLARE,
    LOW_CONTRAST,
    NOISY,
    ROTATED,
    TILTED,
    FrameVariant,
    render_frame,
)

FRAMES_PER_VARIANT = 20


def read_count(decoder: Decoder, variant: FrameVariant, n: int, seed: int) -> int:
    """How many of n frames (each a different code) decode to exactly their code."""
    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(n):
        text = real_code(seed * 1000 + i)
        hits += decoder.decode(render_frame(text, variant, rng)) == [text]
    return hits


def test_decoders_implement_the_decoder_interface(any_decoder: Decoder) -> None:
    assert isinstance(any_decoder, Decoder)
    assert any_decoder.name in BACKENDS


def test_each_backend_reads_clean_frames_of_real_codes(any_decoder: Decoder) -> None:
    # All three read 30/30 clean frames in bench/bench_decode.py; allow one miss.
    assert read_count(any_decoder, CLEAN, 10, seed=1) >= 9


@pytest.mark.parametrize(
    "variant",
    [BLUR_1_5, NOISY, TILTED, LOW_CONTRAST, ROTATED, GLARE],
    ids=lambda v: v.name,
)
def test_zxing_reads_degraded_frames(zxing: Decoder, variant: FrameVariant) -> None:
    hits = read_count(zxing, variant, FRAMES_PER_VARIANT, seed=2)
    assert hits >= FRAMES_PER_VARIANT - 2, f"{variant.name}: {hits}/{FRAMES_PER_VARIANT}"


def test_bgr_frames_read_like_grayscale(any_decoder: Decoder, code: CodeFactory) -> None:
    text = code(7)
    gray = render_frame(text, CLEAN, np.random.default_rng(7))
    assert any_decoder.decode(np.dstack([gray, gray, gray])) == [text]
    assert any_decoder.decode(gray[:, :, None]) == [text]


def test_non_contiguous_and_read_only_frames_are_read(zxing: Decoder, code: CodeFactory) -> None:
    text = code(8)
    bgr = np.dstack([render_frame(text, CLEAN, np.random.default_rng(8))] * 3)
    view = bgr[:, :, 1]  # strided view of a channel
    view.setflags(write=False)
    assert zxing.decode(view) == [text]


def test_frames_without_a_code_decode_to_nothing(any_decoder: Decoder) -> None:
    rng = np.random.default_rng(3)
    for _ in range(10):
        assert any_decoder.decode(render_frame(None, CLEAN, rng)) == []


GARBAGE = {
    "zeros": np.zeros((480, 640), np.uint8),
    "white": np.full((480, 640), 255, np.uint8),
    "noise": np.random.default_rng(0).integers(0, 256, (480, 640), dtype=np.uint8),
    "noise_bgr": np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8),
    "float32": np.random.default_rng(2).random((480, 640), dtype=np.float32),
    "uint16": np.zeros((480, 640), np.uint16),
    "bool": np.zeros((480, 640), np.bool_),
    "1x1": np.zeros((1, 1), np.uint8),
    "empty": np.zeros((0, 0), np.uint8),
    "1d": np.zeros(640, np.uint8),
    "2_channels": np.zeros((480, 640, 2), np.uint8),
    "4d": np.zeros((2, 480, 640, 3), np.uint8),
    "tiny_bgr": np.zeros((5, 5, 3), np.uint8),
    "one_row": np.zeros((1, 640), np.uint8),
    "not_an_array": "QP1.k1.not.a.frame",
    "none": None,
}


@pytest.mark.parametrize("frame", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_frames_decode_to_nothing_without_raising(
    any_decoder: Decoder, frame: object
) -> None:
    assert any_decoder.decode(frame) == []  # type: ignore[arg-type]


def test_an_unusable_frame_is_logged_once_as_a_warning(
    zxing: Decoder, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="gateway_firmware.hardware.decoders"):
        for _ in range(3):
            zxing.decode(np.zeros((480, 640), np.float32))
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "float32" in caplog.records[0].getMessage()


def _qr_frame(payload: bytes) -> np.ndarray:
    import qrcode

    qr = qrcode.QRCode(border=4)
    qr.add_data(payload)
    qr.make(fit=True)
    matrix = np.array(qr.get_matrix(), dtype=np.bool_)
    img = np.where(matrix, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.kron(img, np.ones((5, 5), np.uint8)))


def test_only_utf8_texts_are_returned(any_decoder: Decoder) -> None:
    # zxing hands over the raw bytes and drops invalid UTF-8; zbar transcodes by guessing
    # a character set. Either way only valid str comes out, and nothing raises.
    texts = any_decoder.decode(_qr_frame(b"\xff\xfe\x80 not utf-8 \xc3\x28"))
    assert all(isinstance(t, str) and t.encode("utf-8") for t in texts)
    assert any_decoder.decode(_qr_frame("Grüße → QP1".encode())) == ["Grüße → QP1"]


def test_zxing_drops_a_code_that_is_not_utf8(zxing: Decoder) -> None:
    assert zxing.decode(_qr_frame(b"\xff\xfe\x80 not utf-8 \xc3\x28")) == []


def test_two_codes_in_one_frame_are_both_returned(any_decoder: Decoder) -> None:
    left, right = _qr_frame(b"QP1.left"), _qr_frame(b"QP1.right")
    gap = np.full((left.shape[0], 40), 255, np.uint8)
    texts = any_decoder.decode(np.hstack([left, gap, right]))
    assert sorted(texts) == ["QP1.left", "QP1.right"]


# -- to_gray -------------------------------------------------------------------------------


def test_to_gray_converts_bgr_once_and_refuses_the_unusable() -> None:
    bgr = np.zeros((30, 40, 3), np.uint8)
    bgr[..., 2] = 255  # pure red
    gray = to_gray(bgr)
    assert gray is not None
    assert gray.shape == (30, 40)
    assert gray.flags.c_contiguous
    assert 70 <= int(gray[0, 0]) <= 80  # ITU-R BT.601 weight of red
    assert to_gray(np.zeros((30, 40), np.int8)) is None
    assert to_gray(np.zeros((20, 400), np.uint8)) is None  # smaller than any QR code


def test_bgr_frames_are_read_without_opencv(
    zxing: Decoder, code: CodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = code(9)
    gray = render_frame(text, CLEAN, np.random.default_rng(9))
    monkeypatch.setitem(sys.modules, "cv2", None)  # a Pi with zxing-cpp but no OpenCV
    assert zxing.decode(np.dstack([gray, gray, gray])) == [text]


# -- PipelineDecoder ---------------------------------------------------------------------


def test_pipeline_roi_sees_only_its_region(zxing: Decoder, code: CodeFactory) -> None:
    text = code(11)
    variant = FrameVariant(module_px=3.0, center=(0.27, 0.5), blur_sigma=0.6)
    frame = render_frame(text, variant, np.random.default_rng(11))
    assert zxing.decode(frame) == [text]
    assert PipelineDecoder(zxing, roi=(0, 0, 320, 480)).decode(frame) == [text]
    assert PipelineDecoder(zxing, roi=(320, 0, 320, 480)).decode(frame) == []
    # A region reaching past the frame is clipped to it.
    assert PipelineDecoder(zxing, roi=(-100, -100, 500, 900)).decode(frame) == [text]
    assert PipelineDecoder(zxing, roi=(700, 0, 100, 100)).decode(frame) == []


def test_pipeline_downscale_reads_small_and_large_codes(zxing: Decoder) -> None:
    pipeline = PipelineDecoder(zxing, downscale=0.5)
    assert pipeline.name == "zxing+down0.5"
    for module_px in (3.0, 7.0):  # small: needs the full-resolution fallback
        variant = FrameVariant(module_px=module_px, blur_sigma=0.6, noise_sigma=2.0)
        rng = np.random.default_rng(int(module_px))
        texts = [real_code(100 + i) for i in range(5)]
        hits = sum(pipeline.decode(render_frame(t, variant, rng)) == [t] for t in texts)
        assert hits >= 4, module_px


def test_pipeline_passes_garbage_through_as_nothing(zxing: Decoder) -> None:
    pipeline = PipelineDecoder(zxing, roi=(0, 0, 100, 100), downscale=0.5)
    for frame in GARBAGE.values():
        assert pipeline.decode(frame) == []  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"roi": (0, 0, 0, 10)}, {"roi": (0, 0, 10, -1)}, {"downscale": 0.0}, {"downscale": 1.5}],
)
def test_pipeline_rejects_a_bad_configuration(zxing: Decoder, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"roi|downscale"):
        PipelineDecoder(zxing, **kwargs)  # type: ignore[arg-type]


# -- make_decoder --------------------------------------------------------------------------


def test_make_decoder_rejects_an_unknown_backend() -> None:
    with pytest.raises(ValueError, match=r"unknown QR decoder backend 'nope'.*zxing"):
        make_decoder("nope")


def test_make_decoder_auto_picks_zxing_here_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="gateway_firmware.hardware.decoders"):
        decoder = make_decoder("auto")
    assert decoder.name == "zxing"
    assert "zxing (auto)" in caplog.text


@pytest.mark.parametrize("backend", ["zxing", "opencv"])
def test_make_decoder_builds_the_named_backend(backend: str) -> None:
    assert make_decoder(backend).name == backend


def test_make_decoder_with_roi_wraps_the_backend() -> None:
    decoder = make_decoder("zxing", roi=(10, 10, 300, 200))
    assert isinstance(decoder, PipelineDecoder)
    assert decoder.name == "zxing+roi"


def test_auto_falls_back_when_zxing_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zxingcpp", None)  # import zxingcpp -> ImportError
    assert make_decoder("auto").name in {"pyzbar", "opencv"}
    monkeypatch.setitem(sys.modules, "pyzbar", None)
    monkeypatch.setitem(sys.modules, "pyzbar.pyzbar", None)
    assert make_decoder("auto").name == "opencv"


def test_explicit_backend_with_missing_library_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zxingcpp", None)
    with pytest.raises(DecoderUnavailable, match="'zxing' is unavailable") as info:
        make_decoder("zxing")
    assert isinstance(info.value, RuntimeError)
    assert info.value.backend == "zxing"


def test_auto_with_no_library_at_all_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("zxingcpp", "pyzbar", "pyzbar.pyzbar", "cv2"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(DecoderUnavailable, match=r"'auto'.*zxing.*pyzbar.*opencv"):
        make_decoder("auto")


def test_modules_import_without_any_vision_library() -> None:
    """A Pi without zbar (or even OpenCV) can still import the adapters."""
    script = (
        "import sys\n"
        "for m in ('zxingcpp', 'pyzbar', 'pyzbar.pyzbar', 'cv2', 'picamera2'):\n"
        "    sys.modules[m] = None\n"
        "import gateway_firmware.hardware.decoders\n"
        "import gateway_firmware.hardware.camera_opencv\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
