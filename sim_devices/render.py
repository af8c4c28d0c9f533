"""Render a parking code into a realistic 640x480 camera frame: a phone held up to the lane.

The simulated camera and the vision tests use this instead of a real camera. A frame shows a
phone (dark body, bright rounded screen, the QR code on it and a few UI bars) on a darker,
textured background, placed, rotated and tilted in 3D, then degraded by the effects of a
:class:`FrameVariant`: glare, exposure, low screen contrast, optical blur and sensor noise.

>>> import numpy as np
>>> frame = render_frame("QP1.k1.alice", BLUR_1_5, np.random.default_rng(0))
>>> frame.shape, frame.dtype
((480, 640), dtype('uint8'))

Rendering takes a few milliseconds; the QR module matrix (zxing-cpp's encoder, else the
``qrcode`` package) is cached per text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from gateway_firmware.hardware.interfaces import Frame

__all__ = [
    "BLUR_1_5",
    "CLEAN",
    "FRAME_HEIGHT",
    "FRAME_WIDTH",
    "GLARE",
    "LOW_CONTRAST",
    "NOISY",
    "PRESETS",
    "QUIET_ZONE",
    "ROTATED",
    "TILTED",
    "FrameVariant",
    "random_variant",
    "render_background",
    "render_frame",
    "render_qr",
]

FRAME_WIDTH = 640
FRAME_HEIGHT = 480
QUIET_ZONE = 4
# Focal length of the simulated camera in pixels (about 56 degrees horizontal field of view).
_FOCAL_PX = 600.0

ErrorCorrection = Literal["L", "M", "Q", "H"]
_FloatImage = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class FrameVariant:
    """How a code appears to the camera: geometry, optics and lighting of one shot.

    Geometry: ``module_px`` is the size of one QR module in frame pixels (a ~150-character
    code is a 53- or 57-module symbol with its quiet zone, so 3.5 px/module is ~190 px);
    ``center`` places the code's centre as a fraction of the frame's width and height, or
    ``None`` for a random place where the whole phone is visible; ``rotation_deg`` turns the
    phone in the image plane; ``tilt_deg`` tilts it out of plane (perspective) about an axis
    in the plane at ``tilt_axis_deg``.

    Optics and light: ``blur_sigma`` (Gaussian, pixels), ``noise_sigma`` (additive Gaussian
    sensor noise, grey levels), ``contrast`` (1.0 a full-contrast screen; 0.3 a dim or
    washed-out screen), ``glare`` (peak grey levels of a bright reflection over the code,
    0 for none) and ``brightness`` (exposure offset in grey levels, negative darker).
    """

    name: str = "clean"
    module_px: float = 3.5
    center: tuple[float, float] | None = None
    rotation_deg: float = 0.0
    tilt_deg: float = 0.0
    tilt_axis_deg: float = 0.0
    blur_sigma: float = 0.0
    noise_sigma: float = 0.0
    contrast: float = 1.0
    glare: float = 0.0
    brightness: float = 0.0

    def __post_init__(self) -> None:
        if not 1.0 <= self.module_px <= 20.0:
            raise ValueError("module_px must be within 1..20")
        if not 0.0 <= self.tilt_deg < 80.0:
            raise ValueError("tilt_deg must be within 0..80")
        if not 0.0 < self.contrast <= 1.0:
            raise ValueError("contrast must be within (0, 1]")
        if min(self.blur_sigma, self.noise_sigma, self.glare) < 0:
            raise ValueError("blur_sigma, noise_sigma and glare must not be negative")


CLEAN = FrameVariant("clean", blur_sigma=0.6, noise_sigma=2.0)
BLUR_1_5 = FrameVariant("blur_1_5", module_px=4.0, blur_sigma=1.5, noise_sigma=2.0)
NOISY = FrameVariant("noisy", blur_sigma=0.6, noise_sigma=14.0)
TILTED = FrameVariant(
    "tilted", module_px=4.0, tilt_deg=35.0, tilt_axis_deg=70.0, blur_sigma=0.6, noise_sigma=3.0
)
LOW_CONTRAST = FrameVariant(
    "low_contrast", contrast=0.3, brightness=-20.0, blur_sigma=0.6, noise_sigma=3.0
)
ROTATED = FrameVariant("rotated", rotation_deg=37.0, blur_sigma=0.6, noise_sigma=3.0)
GLARE = FrameVariant("glare", glare=110.0, blur_sigma=0.6, noise_sigma=3.0)

PRESETS: dict[str, FrameVariant] = {
    v.name: v for v in (CLEAN, BLUR_1_5, NOISY, TILTED, LOW_CONTRAST, ROTATED, GLARE)
}


def random_variant(rng: np.random.Generator) -> FrameVariant:
    """A realistic mix: mostly decent shots, some blurred, tilted, glary, dim or noisy."""
    tilt = float(rng.uniform(0.0, 40.0)) if rng.random() < 0.5 else float(rng.uniform(0, 10))
    rotation = float(rng.normal(0.0, 15.0)) if rng.random() < 0.9 else float(rng.uniform(-180, 180))
    return FrameVariant(
        name="random",
        module_px=float(rng.uniform(3.0, 5.0)),
        rotation_deg=rotation,
        tilt_deg=tilt,
        tilt_axis_deg=float(rng.uniform(0.0, 180.0)),
        blur_sigma=float(rng.choice([0.5, 0.8, 1.0, 1.5])),
        noise_sigma=float(rng.uniform(1.0, 10.0)),
        contrast=float(rng.uniform(0.35, 1.0)) if rng.random() < 0.3 else 1.0,
        glare=float(rng.uniform(40.0, 110.0)) if rng.random() < 0.25 else 0.0,
        brightness=float(rng.uniform(-40.0, 40.0)),
    )


_EC_LEVELS = {"L": 1, "M": 0, "Q": 3, "H": 2}  # qrcode.constants.ERROR_CORRECT_*


@lru_cache(maxsize=256)
def _qr_matrix(text: str, error_correction: ErrorCorrection) -> npt.NDArray[np.bool_]:
    if error_correction not in _EC_LEVELS:
        raise ValueError(f"error_correction must be one of L, M, Q, H, not {error_correction!r}")
    symbol = _zxing_symbol(text, error_correction)
    if symbol is None:
        symbol = _qrcode_symbol(text, error_correction)
    matrix = np.pad(symbol, QUIET_ZONE, constant_values=False)
    matrix.setflags(write=False)
    return matrix


def _zxing_symbol(text: str, error_correction: ErrorCorrection) -> npt.NDArray[np.bool_] | None:
    """The symbol's modules (no quiet zone) from zxing-cpp's encoder (C++, ~1 ms for a
    parking code); None where zxing-cpp is missing or too old to encode (before 2.3)."""
    try:
        import zxingcpp
    except ImportError:
        return None
    create = getattr(zxingcpp, "create_barcode", None)
    if create is None:
        return None
    barcode = create(text, zxingcpp.BarcodeFormat.QRCode, ec_level=error_correction)
    image = np.asarray(barcode.to_image(scale=1, add_quiet_zones=False))
    return np.asarray(image < 128)


def _qrcode_symbol(text: str, error_correction: ErrorCorrection) -> npt.NDArray[np.bool_]:
    """The same from the pure-Python ``qrcode`` package (~40 ms a parking code: it holds
    the GIL for all of it, which a fleet of simulated cameras cannot afford)."""
    import qrcode

    qr = qrcode.QRCode(error_correction=_EC_LEVELS[error_correction], border=0)
    qr.add_data(text)
    qr.make(fit=True)
    return np.array(qr.get_matrix(), dtype=np.bool_)


def render_qr(text: str, *, error_correction: ErrorCorrection = "M") -> npt.NDArray[np.bool_]:
    """The module matrix of ``text`` (True = dark), with a 4-module quiet zone; read-only."""
    return _qr_matrix(text, error_correction)


def _rounded_rect(
    img: npt.NDArray[np.uint8], box: tuple[int, int, int, int], radius: int, value: int
) -> None:
    """Fill the rectangle ``box`` = (x0, y0, x1, y1), exclusive ends, with rounded corners."""
    x0, y0, x1, y1 = box
    r = max(0, min(radius, (x1 - x0) // 2, (y1 - y0) // 2))
    img[y0 + r : y1 - r, x0:x1] = value
    img[y0:y1, x0 + r : x1 - r] = value
    for cx, cy in ((x0 + r, y0 + r), (x1 - r - 1, y0 + r), (x0 + r, y1 - r - 1)):
        cv2.circle(img, (cx, cy), r, value, thickness=-1, lineType=cv2.LINE_8)
    cv2.circle(img, (x1 - r - 1, y1 - r - 1), r, value, thickness=-1, lineType=cv2.LINE_8)


def _phone_canvas(
    matrix: npt.NDArray[np.bool_] | None,
    modules: int,
    module_px: int,
    contrast: float,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.uint8], tuple[float, float]]:
    """The phone, face on, at ``module_px`` per module; returns it and the code's centre."""
    code_px = modules * module_px
    screen_w = code_px + 2 * module_px
    screen_h = int(screen_w * 1.7)
    bezel = max(3, screen_w // 16)
    w, h = screen_w + 2 * bezel, screen_h + 2 * bezel
    canvas = np.zeros((h, w), np.uint8)
    body = int(rng.integers(20, 60))
    light = int(rng.integers(225, 250))
    dark = int(rng.integers(15, 40))
    mid = (light + dark) / 2
    light_c = round(mid + (light - mid) * contrast)
    dark_c = round(mid + (dark - mid) * contrast)
    _rounded_rect(canvas, (0, 0, w, h), bezel * 3, body)
    _rounded_rect(canvas, (bezel, bezel, w - bezel, h - bezel), bezel * 2, light_c)
    code_x = bezel + module_px
    code_y = bezel + (screen_h - code_px) // 2
    # A few UI bars above and below the code: an app's title and buttons (distractors).
    bar_h = max(2, module_px * 2)
    for y in (bezel + bar_h, code_y + code_px + bar_h, code_y + code_px + 3 * bar_h):
        if y + bar_h < h - bezel * 2:
            bar_w = int(screen_w * rng.uniform(0.3, 0.8))
            canvas[y : y + bar_h, code_x : code_x + bar_w] = round(mid + (90 - mid) * contrast)
    if matrix is not None:
        tile = np.where(matrix, np.uint8(dark_c), np.uint8(light_c)).astype(np.uint8)
        tile = np.repeat(np.repeat(tile, module_px, axis=0), module_px, axis=1)
        canvas[code_y : code_y + code_px, code_x : code_x + code_px] = tile
    return canvas, (code_x + code_px / 2, code_y + code_px / 2)


def render_background(rng: np.random.Generator) -> _FloatImage:
    """The scene behind the phone (float32, 480x640): what :func:`render_frame` draws first,
    or takes as its ``background`` (a fixed camera looks at the same scene every time)."""
    background = _background(rng)
    background.setflags(write=False)
    return background


def _background(rng: np.random.Generator) -> _FloatImage:
    """A darker, textured scene: a car's interior or a wall, with a few edges."""
    # Texture built at a quarter of the resolution and scaled up: the same look, 30x cheaper.
    small = (FRAME_WIDTH // 4, FRAME_HEIGHT // 4)
    coarse = rng.normal(0.0, 22.0, (6, 8)).astype(np.float32)
    texture = np.asarray(cv2.resize(coarse, small, interpolation=cv2.INTER_CUBIC), np.float32)
    fine = rng.normal(0.0, 8.0, (60, 80)).astype(np.float32)
    texture += cv2.resize(fine, small, interpolation=cv2.INTER_LINEAR)
    texture += np.float32(rng.uniform(45.0, 110.0))
    size = (FRAME_WIDTH, FRAME_HEIGHT)
    bg = np.asarray(cv2.resize(texture, size, interpolation=cv2.INTER_LINEAR), np.float32)
    for _ in range(int(rng.integers(2, 6))):
        p0 = (int(rng.integers(0, FRAME_WIDTH)), int(rng.integers(0, FRAME_HEIGHT)))
        p1 = (int(rng.integers(0, FRAME_WIDTH)), int(rng.integers(0, FRAME_HEIGHT)))
        cv2.line(bg, p0, p1, float(rng.uniform(20.0, 160.0)), int(rng.integers(1, 6)))
    return bg


@lru_cache(maxsize=1)
def _noise_bank() -> _FloatImage:
    """Unit Gaussian noise, larger than a frame; frames take a random window of it.

    Drawing 300k normals per frame costs ~4 ms; a random window of a fixed bank costs 0.2 ms
    and looks the same to a decoder.
    """
    bank = np.random.default_rng(20240601).standard_normal(
        (FRAME_HEIGHT + 240, FRAME_WIDTH + 320), dtype=np.float32
    )
    bank.setflags(write=False)
    return bank


def _add_noise(frame: _FloatImage, sigma: float, rng: np.random.Generator) -> None:
    bank = _noise_bank()
    y = int(rng.integers(0, bank.shape[0] - FRAME_HEIGHT + 1))
    x = int(rng.integers(0, bank.shape[1] - FRAME_WIDTH + 1))
    window = bank[y : y + FRAME_HEIGHT, x : x + FRAME_WIDTH]
    if rng.random() < 0.5:
        window = window[::-1]
    frame += window * np.float32(sigma)


def _placement(
    canvas_shape: tuple[int, int],
    code_center: tuple[float, float],
    variant: FrameVariant,
    scale: float,
    rng: np.random.Generator,
) -> npt.NDArray[np.float64]:
    """The homography from phone-canvas pixels to frame pixels."""
    h, w = canvas_shape
    cx, cy = code_center
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
    # Phone plane coordinates (frame pixels at nominal distance), centred on the code.
    plane = (corners - (cx, cy)) * scale
    rot = math.radians(variant.rotation_deg)
    c, s = math.cos(rot), math.sin(rot)
    plane = plane @ np.array([[c, s], [-s, c]])
    # Tilt out of plane about an in-plane axis through the code centre, then project.
    axis = math.radians(variant.tilt_axis_deg)
    ax, ay = math.cos(axis), math.sin(axis)
    along = plane @ np.array([ax, ay])
    across = plane @ np.array([-ay, ax])
    tilt = math.radians(variant.tilt_deg)
    depth = across * math.sin(tilt)
    across = across * math.cos(tilt)
    flat = np.outer(along, (ax, ay)) + np.outer(across, (-ay, ax))
    projected = flat * (_FOCAL_PX / (_FOCAL_PX + depth))[:, None]
    if variant.center is not None:
        centre = np.array([variant.center[0] * FRAME_WIDTH, variant.center[1] * FRAME_HEIGHT])
    else:
        lo = -projected.min(axis=0) + 2
        hi = np.array([FRAME_WIDTH, FRAME_HEIGHT]) - projected.max(axis=0) - 2
        # A phone bigger than the frame is cropped: keep the code itself near the middle.
        mid = np.array([FRAME_WIDTH / 2, FRAME_HEIGHT / 2])
        lo = np.where(lo < hi, lo, mid - 20)
        hi = np.where(lo < hi, hi, mid + 20)
        centre = rng.uniform(lo, hi)
    dst = (projected + centre).astype(np.float32)
    return np.asarray(cv2.getPerspectiveTransform(corners.astype(np.float32), dst), np.float64)


def render_frame(
    text: str | None,
    variant: FrameVariant = CLEAN,
    rng: np.random.Generator | None = None,
    *,
    error_correction: ErrorCorrection = "M",
    background: _FloatImage | None = None,
) -> Frame:
    """A 640x480 grayscale uint8 frame showing ``text`` as a QR code on a phone.

    ``text=None`` renders the scene without a code: background only, or a phone whose
    screen shows no code. ``rng`` draws everything random (texture, placement when
    ``variant.center`` is None, noise, glare); pass a seeded one for reproducible frames.
    ``background`` (from :func:`render_background`) is the scene behind the phone instead
    of a new one (it is not changed; saves about a quarter of the rendering).
    """
    rng = rng if rng is not None else np.random.default_rng()
    if background is None:
        frame = _background(rng)
    else:
        if background.shape != (FRAME_HEIGHT, FRAME_WIDTH) or background.dtype != np.float32:
            raise ValueError("background must be a float32 480x640 image (render_background)")
        frame = background.copy()
    show_phone = text is not None or rng.random() < 0.5
    if show_phone:
        matrix = render_qr(text, error_correction=error_correction) if text is not None else None
        modules = matrix.shape[0] if matrix is not None else 53
        # Draw at a whole number of pixels per module, at least the final size, then warp.
        canvas_px = max(1, math.ceil(variant.module_px))
        canvas, code_center = _phone_canvas(matrix, modules, canvas_px, variant.contrast, rng)
        homography = _placement(
            canvas.shape[:2], code_center, variant, variant.module_px / canvas_px, rng
        )
        cv2.warpPerspective(
            canvas.astype(np.float32),
            homography,
            (FRAME_WIDTH, FRAME_HEIGHT),
            dst=frame,
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_TRANSPARENT,
        )
        if variant.glare > 0:
            where = np.array([[code_center]], np.float32)
            centre = np.asarray(cv2.perspectiveTransform(where, homography), np.float32)[0, 0]
            spread = modules * variant.module_px
            centre = centre + rng.uniform(-0.25, 0.25, 2) * spread
            _glare(frame, centre, spread * float(rng.uniform(0.25, 0.4)), variant.glare)
    if variant.brightness:
        frame += np.float32(variant.brightness)
    if variant.blur_sigma > 0:
        cv2.GaussianBlur(frame, (0, 0), variant.blur_sigma, dst=frame)
    if variant.noise_sigma > 0:
        _add_noise(frame, variant.noise_sigma, rng)
    np.clip(frame, 0, 255, out=frame)
    return frame.astype(np.uint8)


def _glare(frame: _FloatImage, centre: npt.NDArray[np.float32], sigma: float, peak: float) -> None:
    """Add a bright reflection: a Gaussian blob of ``peak`` grey levels (within 3 sigma)."""
    x0, x1 = (int(np.clip(centre[0] + d * 3 * sigma, 0, FRAME_WIDTH)) for d in (-1, 1))
    y0, y1 = (int(np.clip(centre[1] + d * 3 * sigma, 0, FRAME_HEIGHT)) for d in (-1, 1))
    if x1 <= x0 or y1 <= y0:
        return
    xs = np.arange(x0, x1, dtype=np.float32) - np.float32(centre[0])
    ys = np.arange(y0, y1, dtype=np.float32) - np.float32(centre[1])
    k = np.float32(-0.5 / (sigma * sigma))
    gx = np.exp(xs * xs * k)
    gy = np.exp(ys * ys * k) * np.float32(peak)
    frame[y0:y1, x0:x1] += np.outer(gy, gx).astype(np.float32)
