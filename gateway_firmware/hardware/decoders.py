"""QR decoders: one adapter per library, a region-of-interest wrapper and a factory.

Every adapter implements :class:`~gateway_firmware.hardware.interfaces.Decoder` and imports
its library lazily in its constructor, so this module imports on a Pi that lacks, say, zbar.

* :class:`ZxingDecoder`  zxing-cpp: the fastest and most robust here (the default)
* :class:`PyzbarDecoder` pyzbar over libzbar: a good fallback
* :class:`OpenCVDecoder` ``cv2.QRCodeDetector``: last resort, slower and less robust

>>> decoder = make_decoder("auto")  # zxing if importable, else pyzbar, else opencv
>>> decoder.decode(camera.read())  # doctest: +SKIP
['QP1.k1.alice.1795434742.1795434802.ORJskpuoWFXljBqt.Xy...']

Decoding never raises on a bad frame: anything that is not a uint8 grayscale (H, W) or BGR/BGRA
(H, W, 3|4) array of at least 21x21 pixels (``None``, another dtype, an empty or 1x1
array) decodes to ``[]``, with one warning per decoder so a misconfigured camera is noticed.
An error inside the library is logged and also gives ``[]``: the scan loop never dies on a
frame. Only texts that are valid UTF-8 are returned (our codes are ASCII); others are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import numpy as np

from gateway_firmware.hardware.interfaces import Decoder, Frame

__all__ = [
    "BACKENDS",
    "DecoderUnavailable",
    "OpenCVDecoder",
    "PipelineDecoder",
    "PyzbarDecoder",
    "Roi",
    "ZxingDecoder",
    "make_decoder",
    "to_gray",
]

log = logging.getLogger(__name__)

BACKENDS: Final = ("auto", "zxing", "pyzbar", "opencv")
# The smallest QR code (version 1) is 21 modules: nothing smaller can hold one.
MIN_SIDE: Final = 21

# A region of interest in frame pixels: (x, y, width, height).
Roi = tuple[int, int, int, int]


class DecoderUnavailable(RuntimeError):
    """The library behind a requested decoder backend cannot be loaded."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"QR decoder backend {backend!r} is unavailable: {reason}")
        self.backend = backend


def to_gray(frame: object) -> Frame | None:
    """The frame as a C-contiguous uint8 (H, W) array, or ``None`` if it cannot be one.

    Accepts grayscale (H, W), (H, W, 1), BGR (H, W, 3) and BGRA (H, W, 4) uint8 arrays of at
    least 21x21 pixels; returns ``None`` for anything else (no exception).
    """
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        return None
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim == 2:
        gray = frame
    elif frame.ndim == 3 and frame.shape[2] in (3, 4):
        if min(frame.shape[:2]) < MIN_SIDE:
            return None
        gray = _bgr_to_gray(frame)
    else:
        return None
    if min(gray.shape) < MIN_SIDE:
        return None
    return np.ascontiguousarray(gray)


def _bgr_to_gray(frame: Frame) -> Frame:
    try:
        import cv2
    except ImportError:  # a Pi with zxing-cpp and picamera2 may have no OpenCV
        weights = np.array([0.114, 0.587, 0.299], np.float32)  # ITU-R BT.601, B G R
        return np.asarray(frame[:, :, :3] @ weights + 0.5, np.float32).astype(np.uint8)
    code = cv2.COLOR_BGR2GRAY if frame.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
    return np.asarray(cv2.cvtColor(np.ascontiguousarray(frame), code), np.uint8)


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        log.debug("dropped a QR code whose content is not UTF-8 (%d bytes)", len(data))
        return None


def _unique(texts: Iterable[str | None]) -> list[str]:
    """Drop ``None`` and empty texts and repeats, keeping the order."""
    return list(dict.fromkeys(t for t in texts if t))


class _BaseDecoder:
    """Frame checks and error containment shared by the adapters."""

    name = "base"

    def __init__(self) -> None:
        self._warned_frame = False
        self._warned_error = False

    def decode(self, frame: Frame) -> list[str]:
        gray = to_gray(frame)
        if gray is None:
            self._bad_frame(frame)
            return []
        return self._decode_gray(gray)

    def _decode_gray(self, gray: Frame) -> list[str]:
        try:
            return self._read(gray)
        except Exception:  # a library quirk must not kill the scan loop
            level = logging.DEBUG if self._warned_error else logging.WARNING
            self._warned_error = True
            log.log(level, "%s decoder failed on a %s frame", self.name, gray.shape, exc_info=True)
            return []

    def _read(self, gray: Frame) -> list[str]:
        raise NotImplementedError

    def _bad_frame(self, frame: object) -> None:
        level = logging.DEBUG if self._warned_frame else logging.WARNING
        self._warned_frame = True
        shape = getattr(frame, "shape", None)
        dtype = getattr(frame, "dtype", type(frame).__name__)
        log.log(level, "%s decoder: unusable frame (shape %s, dtype %s)", self.name, shape, dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ZxingDecoder(_BaseDecoder):
    """zxing-cpp restricted to QR codes, tuned for a 640x480 lane camera.

    Measured on rendered lane frames (``bench/bench_decode.py``): ``try_rotate`` is off (QR
    detection is rotation-invariant; the flag rotates the image for linear barcodes and
    only costs time); ``try_invert`` is off (phones show dark modules on a light screen);
    ``try_downscale`` is off by default (at 640x480 it found no extra code, even one that
    fills the frame, and doubled the time; turn it on for high-resolution cameras). The
    LocalAverage binarizer reads ~10 % more of the hard frames (glare, low contrast, tilt)
    than GlobalHistogram for about twice its ~0.3 ms.
    """

    name = "zxing"

    def __init__(self, *, try_downscale: bool = False) -> None:
        super().__init__()
        try:
            import zxingcpp
        except ImportError as exc:
            raise DecoderUnavailable("zxing", f"{exc} (pip install zxing-cpp)") from exc
        self._read_barcodes: Callable[..., Sequence[Any]] = zxingcpp.read_barcodes
        self._options: dict[str, Any] = {
            "formats": zxingcpp.BarcodeFormat.QRCode,
            "try_rotate": False,
            "try_downscale": try_downscale,
            "try_invert": False,
            "binarizer": zxingcpp.Binarizer.LocalAverage,
        }

    def _read(self, gray: Frame) -> list[str]:
        results = self._read_barcodes(gray, **self._options)
        return _unique(_utf8(bytes(r.bytes)) for r in results if r.valid)


class PyzbarDecoder(_BaseDecoder):
    """pyzbar (libzbar) restricted to QR codes: unrestricted it is slower and finds phantom
    linear barcodes in textures."""

    name = "pyzbar"

    def __init__(self) -> None:
        super().__init__()
        try:
            from pyzbar import pyzbar
        except (ImportError, OSError) as exc:  # OSError: libzbar present but unloadable
            raise DecoderUnavailable(
                "pyzbar", f"{exc} (pip install pyzbar; apt-get install libzbar0)"
            ) from exc
        self._pyzbar_decode: Callable[..., Sequence[Any]] = pyzbar.decode
        self._symbols = [pyzbar.ZBarSymbol.QRCODE]

    def _read(self, gray: Frame) -> list[str]:
        results = self._pyzbar_decode(gray, symbols=self._symbols)
        return _unique(_utf8(r.data) for r in results)


class OpenCVDecoder(_BaseDecoder):
    """OpenCV's QR detector: always there with OpenCV, but slower and less robust (blur)."""

    name = "opencv"

    def __init__(self) -> None:
        super().__init__()
        try:
            import cv2
        except ImportError as exc:
            raise DecoderUnavailable(
                "opencv", f"{exc} (pip install opencv-python-headless)"
            ) from exc
        # The ArUco-based detector (OpenCV >= 4.8) read 30/30 clean lane frames where the
        # classic QRCodeDetector read 11 to 22 of 30, at the same speed.
        factory = getattr(cv2, "QRCodeDetectorAruco", None) or cv2.QRCodeDetector
        self._detector = factory()

    def _read(self, gray: Frame) -> list[str]:
        ok, texts, _points, _straight = self._detector.detectAndDecodeBytesMulti(gray)
        if not ok:
            return []
        return _unique(_utf8(bytes(t)) for t in texts)


class PipelineDecoder:
    """Crop to a region of interest, then try a downscaled frame before the full one.

    ``roi`` (x, y, width, height, clipped to the frame) is where codes are held up in a
    lane's camera view: decoding fewer pixels is faster and ignores distractors.
    ``downscale`` (e.g. 0.5) first decodes a smaller copy and only falls back to full
    resolution when it finds nothing; ``None`` (the default) skips that step.

    Measured with ``bench/bench_decode.py`` (640x480, 3.5-4 px per module): for zxing-cpp a
    half-size first pass saves ~0.2 ms on a frame with a code (0.6 -> 0.4 ms median) but
    costs ~0.15 ms on a frame without one, which is most frames at a lane; for pyzbar and
    OpenCV it only adds time (their half-size pass rarely reads). So the factory does not
    downscale; it is here for high-resolution cameras with large codes.
    """

    def __init__(
        self, inner: Decoder, *, roi: Roi | None = None, downscale: float | None = None
    ) -> None:
        if roi is not None and (len(roi) != 4 or roi[2] <= 0 or roi[3] <= 0):
            raise ValueError(f"roi must be (x, y, width, height) with a positive size: {roi}")
        if downscale is not None and not 0.0 < downscale < 1.0:
            raise ValueError(f"downscale must be within (0, 1): {downscale}")
        self.inner = inner
        self.roi = roi
        self.downscale = downscale
        self._shrink: Callable[[Frame], Frame] | None = None
        if downscale is not None:
            import cv2

            def shrink(gray: Frame) -> Frame:
                small = cv2.resize(
                    gray, None, fx=downscale, fy=downscale, interpolation=cv2.INTER_AREA
                )
                return np.asarray(small, np.uint8)

            self._shrink = shrink
        parts = [inner.name]
        if roi is not None:
            parts.append("roi")
        if downscale is not None:
            parts.append(f"down{downscale:g}")
        self.name = "+".join(parts)

    def decode(self, frame: Frame) -> list[str]:
        gray = to_gray(frame)
        if gray is None:
            return self.inner.decode(frame)  # the inner decoder logs and returns []
        if self.roi is not None:
            x, y, w, h = self.roi
            x0, y0 = max(0, x), max(0, y)
            gray = gray[y0 : max(y0, y + h), x0 : max(x0, x + w)]
            if min(gray.shape) < MIN_SIDE:
                return []
            gray = np.ascontiguousarray(gray)
        if self._shrink is not None:
            small = self._shrink(gray)
            if min(small.shape) >= MIN_SIDE:
                texts = self.inner.decode(small)
                if texts:
                    return texts
        return self.inner.decode(gray)

    def __repr__(self) -> str:
        return f"PipelineDecoder({self.inner!r}, roi={self.roi}, downscale={self.downscale})"


_FACTORIES: Final[dict[str, Callable[[], Decoder]]] = {
    "zxing": ZxingDecoder,
    "pyzbar": PyzbarDecoder,
    "opencv": OpenCVDecoder,
}


def make_decoder(
    backend: str = "auto", *, roi: Roi | None = None, downscale: float | None = None
) -> Decoder:
    """The decoder for ``backend``: ``"auto"``, ``"zxing"``, ``"pyzbar"`` or ``"opencv"``.

    ``"auto"`` takes the first that loads, in that order, and logs which. An unknown name
    raises :class:`ValueError`; an explicitly named backend whose library is missing raises
    :class:`DecoderUnavailable` (a :class:`RuntimeError`) naming it. With ``roi`` the
    decoder only looks at that part of the frame; with ``downscale`` it tries a smaller
    copy first (see :class:`PipelineDecoder`).
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown QR decoder backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    decoder: Decoder
    if backend == "auto":
        failures = []
        for name, factory in _FACTORIES.items():
            try:
                decoder = factory()
            except DecoderUnavailable as exc:
                failures.append(str(exc))
                continue
            log.info("QR decoder backend: %s (auto)", name)
            break
        else:
            raise DecoderUnavailable("auto", "; ".join(failures))
    else:
        decoder = _FACTORIES[backend]()
        log.info("QR decoder backend: %s", backend)
    if roi is None and downscale is None:
        return decoder
    return PipelineDecoder(decoder, roi=roi, downscale=downscale)
