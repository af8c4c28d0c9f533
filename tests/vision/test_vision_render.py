"""The renderer draws real QR codes into believable, reproducible 640x480 frames."""

from __future__ import annotations

import dataclasses
import time

import cv2
import numpy as np
import pytest
from vision_support import CodeFactory

from sim_devices.render import (
    BLUR_1_5,
    CLEAN,
    GLARE,
    LOW_CONTRAST,
    NOISY,
    PRESETS,
    QUIET_ZONE,
    ROTATED,
    TILTED,
    FrameVariant,
    random_variant,
    render_frame,
    render_qr,
)


def frame_of(text: str | None, variant: FrameVariant, seed: int = 0) -> np.ndarray:
    return render_frame(text, variant, np.random.default_rng(seed))


def sharpness(img: np.ndarray) -> float:
    return float(cv2.Laplacian(img.astype(np.float32), cv2.CV_32F).var())


def test_frames_are_640x480_grayscale_uint8(code: CodeFactory) -> None:
    for variant in PRESETS.values():
        frame = frame_of(code(1), variant)
        assert frame.shape == (480, 640)
        assert frame.dtype == np.uint8


def test_same_seed_same_frame_other_seed_other_frame(code: CodeFactory) -> None:
    text = code(2)
    assert np.array_equal(frame_of(text, NOISY, 5), frame_of(text, NOISY, 5))
    assert not np.array_equal(frame_of(text, NOISY, 5), frame_of(text, NOISY, 6))


def test_qr_matrix_has_quiet_zone_and_is_cached(code: CodeFactory) -> None:
    text = code(3)
    matrix = render_qr(text)
    assert matrix.dtype == np.bool_
    side = matrix.shape[0] - 2 * QUIET_ZONE
    assert matrix.shape == (side + 2 * QUIET_ZONE,) * 2
    assert side in {45, 49}  # version 7 or 8 at level M, as ~150 characters need
    border = np.concatenate(
        [matrix[:QUIET_ZONE].ravel(), matrix[-QUIET_ZONE:].ravel(), matrix[:, :QUIET_ZONE].ravel()]
    )
    assert not border.any()
    assert matrix[QUIET_ZONE : QUIET_ZONE + 7, QUIET_ZONE].all()  # finder pattern's edge
    assert render_qr(text) is matrix
    assert not matrix.flags.writeable
    assert render_qr(text, error_correction="H").shape[0] > matrix.shape[0]
    with pytest.raises(ValueError, match="error_correction"):
        render_qr(text, error_correction="X")  # type: ignore[arg-type]


def test_blur_removes_fine_detail(code: CodeFactory) -> None:
    text = code(4)
    sharp = frame_of(text, dataclasses.replace(BLUR_1_5, blur_sigma=0.0, noise_sigma=0.0))
    blurred = frame_of(text, dataclasses.replace(BLUR_1_5, noise_sigma=0.0))
    assert sharpness(blurred) < 0.3 * sharpness(sharp)


def test_noise_adds_grain(code: CodeFactory) -> None:
    text = code(5)
    quiet = frame_of(text, dataclasses.replace(NOISY, noise_sigma=0.0)).astype(np.float32)
    noisy = frame_of(text, NOISY).astype(np.float32)
    assert 10.0 < float(np.std(noisy - quiet)) < 16.0  # NOISY: sigma 14, a little clipped


def test_low_contrast_narrows_the_code_and_glare_brightens_it(code: CodeFactory) -> None:
    text = code(6)
    centred = (0.5, 0.5)
    window = (slice(190, 290), slice(270, 370))  # the middle of the code
    full = frame_of(text, dataclasses.replace(CLEAN, center=centred))[window]
    dim = frame_of(text, dataclasses.replace(LOW_CONTRAST, center=centred))[window]
    glary = frame_of(text, dataclasses.replace(GLARE, center=centred))[window]
    assert np.ptp(dim) < 0.5 * np.ptp(full)
    assert glary.mean() > full.mean() + 30


def test_rotation_and_tilt_move_the_finder_patterns(code: CodeFactory) -> None:
    text = code(7)
    centred = (0.5, 0.5)
    straight = frame_of(text, dataclasses.replace(CLEAN, module_px=4.0, center=centred))
    rotated = frame_of(text, dataclasses.replace(ROTATED, module_px=4.0, center=centred))
    tilted = frame_of(text, dataclasses.replace(TILTED, center=centred))
    assert np.mean(np.abs(straight.astype(int) - rotated)) > 20
    assert np.mean(np.abs(straight.astype(int) - tilted)) > 20


def test_a_frame_without_code_has_a_scene_but_no_code() -> None:
    frames = [frame_of(None, CLEAN, seed) for seed in range(6)]
    assert all(f.std() > 5 for f in frames)  # textured, not a flat grey
    # Sometimes an empty phone screen (a bright region), sometimes no phone at all.
    assert len({bool((f > 200).mean() > 0.05) for f in frames}) == 2


def test_random_variants_are_valid_and_varied() -> None:
    rng = np.random.default_rng(0)
    variants = [random_variant(rng) for _ in range(50)]
    assert len({v.module_px for v in variants}) == 50
    assert any(v.glare > 0 for v in variants)
    assert any(v.tilt_deg > 20 for v in variants)
    assert any(v.contrast < 1 for v in variants)


@pytest.mark.parametrize(
    "bad",
    [{"module_px": 0.5}, {"tilt_deg": 85.0}, {"contrast": 0.0}, {"blur_sigma": -1.0}],
)
def test_variant_refuses_impossible_values(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        FrameVariant(**bad)  # type: ignore[arg-type]


def test_rendering_a_known_code_takes_a_few_milliseconds(code: CodeFactory) -> None:
    text = code(8)
    rng = np.random.default_rng(0)
    render_frame(text, CLEAN, rng)  # builds and caches the QR matrix
    timings = []
    for _ in range(15):
        started = time.perf_counter()
        render_frame(text, random_variant(rng), rng)
        timings.append(time.perf_counter() - started)
    # ~3 ms on a laptop core; generous for a loaded CI runner or a Pi.
    assert float(np.median(timings)) < 0.030
