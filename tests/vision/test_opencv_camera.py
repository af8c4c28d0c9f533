"""The real camera adapters fail clearly; the OpenCV one reads frames (from a video file)."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from vision_support import CodeFactory

from gateway_firmware.hardware.camera_opencv import OpenCVCamera, Picamera2Camera
from gateway_firmware.hardware.interfaces import Camera, CameraError, Decoder
from sim_devices.render import CLEAN, render_frame


@pytest.mark.parametrize("device", [99, "99", "/dev/video99", "/nonexistent/camera.mjpg"])
def test_a_missing_camera_is_a_camera_error_naming_it(device: int | str) -> None:
    with pytest.raises(CameraError, match=r"cannot open camera .*99|nonexistent"):
        OpenCVCamera(device)


def write_video(path: Path, frames: list[np.ndarray]) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 15, (640, 480))
    assert writer.isOpened(), "OpenCV cannot write MJPG here"
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()


def test_reads_bgr_frames_then_fails_when_the_source_ends(
    tmp_path: Path, zxing: Decoder, code: CodeFactory
) -> None:
    rng = np.random.default_rng(0)
    video = tmp_path / "lane.avi"
    write_video(video, [render_frame(code(1), CLEAN, rng), render_frame(None, CLEAN, rng)])
    camera = OpenCVCamera(str(video))
    assert isinstance(camera, Camera)
    first = camera.read()
    assert first is not None
    assert first.shape == (480, 640, 3)
    assert zxing.decode(first) == [code(1)]
    assert zxing.decode(camera.read()) == []  # type: ignore[arg-type]
    with pytest.raises(CameraError, match="no frame"):
        camera.read()  # the "camera" is gone: end of the file
    camera.close()
    camera.close()  # idempotent
    with pytest.raises(CameraError, match="closed"):
        camera.read()


def test_picamera2_missing_is_a_clear_camera_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "picamera2", None)  # as on any machine without it
    with pytest.raises(CameraError, match="picamera2 is not installed"):
        Picamera2Camera()
