"""Real cameras: a USB/V4L2 camera through OpenCV, and the Raspberry Pi camera (Picamera2).

Both implement :class:`~gateway_firmware.hardware.interfaces.Camera` and import their
library lazily, so a Pi without OpenCV's video IO or without picamera2 still imports this::

    camera = OpenCVCamera(0, width=640, height=480, fps=15)
    frame = camera.read()   # the newest BGR frame; CameraError if the camera failed
    camera.close()
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from gateway_firmware.hardware.interfaces import Camera, CameraError, Frame

__all__ = ["OpenCVCamera", "Picamera2Camera", "ReopeningCamera"]

log = logging.getLogger(__name__)


class OpenCVCamera:
    """A camera through ``cv2.VideoCapture``: V4L2 on Linux for a device index or /dev path.

    ``device`` is an index (``0`` is /dev/video0), a device path, or a URL/file OpenCV can
    open. The capture buffer is one frame, so :meth:`read` returns a fresh frame, not one
    that queued while the app was busy. Opening fails with a :class:`CameraError` naming
    the device; so does a failed read (unplugged camera, driver error) and a read after
    :meth:`close`.
    """

    def __init__(
        self, device: int | str = 0, width: int = 640, height: int = 480, fps: float = 15
    ) -> None:
        try:
            import cv2
        except ImportError as exc:
            raise CameraError(f"OpenCV is not installed: {exc}") from exc
        self._cv2: Any = cv2
        if isinstance(device, str) and device.strip().isdigit():
            device = int(device)
        self.device = device
        self._lock = threading.Lock()
        v4l2 = sys.platform.startswith("linux") and (
            isinstance(device, int) or device.startswith("/dev/video")
        )
        api = cv2.CAP_V4L2 if v4l2 else cv2.CAP_ANY
        try:
            capture = cv2.VideoCapture(device, api)
        except cv2.error as exc:
            raise CameraError(f"cannot open camera {device!r}: {exc}") from exc
        if not capture.isOpened():
            capture.release()
            raise CameraError(f"cannot open camera {device!r} (missing, busy or no permission)")
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        capture.set(cv2.CAP_PROP_FPS, fps)
        self._capture: Any = capture
        log.info(
            "camera %r open: %dx%d at %.0f fps",
            device,
            int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            capture.get(cv2.CAP_PROP_FPS),
        )

    def read(self) -> Frame | None:
        with self._lock:
            if self._capture is None:
                raise CameraError(f"camera {self.device!r} is closed")
            try:
                ok, frame = self._capture.read()
            except self._cv2.error as exc:
                raise CameraError(f"camera {self.device!r} read failed: {exc}") from exc
        if not ok or frame is None:
            raise CameraError(f"camera {self.device!r} delivered no frame (unplugged?)")
        return np.asarray(frame, dtype=np.uint8)

    def close(self) -> None:
        with self._lock:
            if self._capture is not None:
                self._capture.release()
                self._capture = None

    def __repr__(self) -> str:
        return f"OpenCVCamera({self.device!r})"


class Picamera2Camera:
    """The Raspberry Pi camera module through picamera2 (``apt install python3-picamera2``).

    Captures YUV420 and returns its luminance plane: the grayscale frame the decoders want,
    without a colour conversion. Not exercised by the tests here (no Pi camera in CI).
    """

    def __init__(self, *, width: int = 640, height: int = 480, fps: float = 15) -> None:
        try:
            from picamera2 import Picamera2
        except ImportError as exc:
            raise CameraError(
                "picamera2 is not installed (on Raspberry Pi OS: apt install python3-picamera2)"
            ) from exc
        self._size = (width, height)
        try:
            camera: Any = Picamera2()
            config = camera.create_video_configuration(
                main={"size": (width, height), "format": "YUV420"},
                controls={"FrameRate": fps},
                buffer_count=2,
            )
            camera.configure(config)
            camera.start()
        except Exception as exc:  # picamera2 raises many types (RuntimeError, IndexError)
            raise CameraError(f"cannot open the Pi camera: {exc}") from exc
        self._camera: Any = camera

    def read(self) -> Frame | None:
        if self._camera is None:
            raise CameraError("Pi camera is closed")
        try:
            yuv = self._camera.capture_array("main")
        except Exception as exc:  # see __init__
            raise CameraError(f"Pi camera read failed: {exc}") from exc
        width, height = self._size
        return np.ascontiguousarray(yuv[:height, :width], dtype=np.uint8)

    def close(self) -> None:
        if self._camera is not None:
            self._camera.stop()
            self._camera.close()
            self._camera = None


class ReopeningCamera:
    """Opens a camera on first read and again after any failure.

    A camera that is unplugged at start, or fails later, becomes a :class:`CameraError` on
    :meth:`read` (the scan loop reports it and retries with backoff) instead of a crash:
    the gateway keeps answering commands while someone fixes the cable.

    >>> # camera = ReopeningCamera(lambda: OpenCVCamera(0), name="opencv:0")
    """

    def __init__(self, opener: Callable[[], Camera], *, name: str = "camera") -> None:
        self._opener = opener
        self.name = name
        self._camera: Camera | None = None
        self.opens = 0

    def read(self) -> Frame | None:
        camera = self._camera
        if camera is None:
            try:
                camera = self._opener()
            except CameraError:
                raise
            except Exception as exc:  # a driver's own exception type
                raise CameraError(f"{self.name}: cannot open: {exc}") from exc
            self._camera = camera
            self.opens += 1
            if self.opens > 1:
                log.info("camera %s reopened", self.name)
        try:
            return camera.read()
        except Exception:
            self._drop()
            raise

    def _drop(self) -> None:
        camera, self._camera = self._camera, None
        if camera is not None:
            try:
                camera.close()
            except Exception:
                log.debug("closing the failed camera %s", self.name, exc_info=True)

    def close(self) -> None:
        self._drop()

    def __repr__(self) -> str:
        return f"ReopeningCamera({self.name!r})"
