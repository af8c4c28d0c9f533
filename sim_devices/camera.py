"""A simulated camera: renders whatever code the scene holds up into real camera frames.

:class:`SimCamera` implements :class:`~gateway_firmware.hardware.interfaces.Camera`, so the
gateway's real scan loop and real decoder run against it. The scene is a callable returning
the code text in view (or ``None``), or any object with a ``code_in_view()`` method such as
:class:`~sim_devices.scene.LaneScene`.

>>> from sim_devices.scene import LaneScene
>>> scene = LaneScene()
>>> camera = SimCamera(scene, frame_interval=0)
>>> scene.show_code("QP1.k1.alice")
>>> frame = camera.read()   # a 640x480 frame with the code on a phone screen
>>> camera.fail_next(1)     # the next read raises CameraError, the one after recovers
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from gateway_firmware.hardware.interfaces import CameraError, Frame
from sim_devices.render import (
    CLEAN,
    FrameVariant,
    random_variant,
    render_background,
    render_frame,
)

if TYPE_CHECKING:
    from sim_devices.schedule import SharedTimer

__all__ = ["BACKGROUNDS", "EMPTY_FRAMES", "SceneView", "SimCamera"]


@runtime_checkable
class SceneView(Protocol):
    """What the camera looks at: the code text held up to it, or ``None``."""

    def code_in_view(self) -> str | None: ...


Scene = Callable[[], str | None] | SceneView


class SimCamera:
    """Renders the scene's code text into frames, paced like a real camera.

    * ``variant``: how every frame looks (default :data:`~sim_devices.render.CLEAN`).
    * ``rng``: with no ``variant``, each time a new text comes into view a
      :func:`~sim_devices.render.random_variant` is drawn from it (a driver holds a phone
      up a bit differently every time); also seeds textures and noise. Seed it for
      reproducible frames.
    * ``per_frame``: render every frame afresh (new noise, placement and, with ``rng`` and
      no ``variant``, a new random variant) instead of re-serving the frame cached for the
      unchanged (text, variant); costs ~3 ms a frame.
    * ``frame_interval``: seconds between frames; :meth:`read` sleeps until the next frame
      is due, like a camera at that frame rate. ``0`` never sleeps (tests).
    * ``timer``: a :class:`~sim_devices.schedule.SharedTimer` that :meth:`read_async`
      waits for its frames on, shared by a fleet's cameras (one loop timer for all the
      frames due within its few milliseconds) instead of an ``asyncio.sleep`` each.

    With no code in view (and no ``per_frame``) the camera does not render: it shows one
    of a few code-less frames (:data:`EMPTY_FRAMES` of them per variant, rendered once
    per process and shared by every camera), drawn from ``rng`` each time the code goes
    away. They are real rendered scenes, so the decoder runs on them as on any frame and
    finds nothing. A code in view is always rendered for this camera, the phone in front
    of a scene drawn from ``rng`` too, out of :data:`BACKGROUNDS` shared ones (a fixed
    camera looks at much the same scene every time).

    :meth:`read_async` (the :class:`~gateway_firmware.hardware.interfaces.AsyncCamera`
    the gateway prefers) waits for the next frame with ``asyncio.sleep`` and, while the
    scene is unchanged, returns the very same read-only array: no thread, no render, no
    copy, and the gateway skips decoding it again. A simulated lane idling at 15 fps then
    costs a few microseconds a frame.

    Fault injection: :meth:`fail_next` makes the next ``n`` reads raise
    :class:`CameraError`; :meth:`set_failed` keeps failing until cleared (an unplugged
    camera). Reads may come from a worker thread while the scene changes elsewhere.
    """

    def __init__(
        self,
        scene: Scene,
        *,
        variant: FrameVariant | None = None,
        rng: np.random.Generator | None = None,
        per_frame: bool = False,
        frame_interval: float = 1 / 15,
        timer: SharedTimer | None = None,
    ) -> None:
        if frame_interval < 0:
            raise ValueError("frame_interval must not be negative")
        self._view: Callable[[], str | None] = (
            scene.code_in_view if isinstance(scene, SceneView) else scene
        )
        self._fixed_variant = variant
        self._random_variants = variant is None and rng is not None
        self._rng = rng if rng is not None else np.random.default_rng()
        self._per_frame = per_frame
        self.frame_interval = frame_interval
        self._timer = timer
        self._lock = threading.Lock()
        self._next_due = time.monotonic()
        self._cached: tuple[str | None, FrameVariant, Frame] | None = None
        self._pending_empty: int | None = None  # the code-less frame drawn, not yet rendered
        self._fail_count = 0
        self._failed = False
        self._closed = False
        self.frames_read = 0
        self.renders = 0

    # -- fault injection -------------------------------------------------------------
    def fail_next(self, n: int = 1) -> None:
        """The next ``n`` reads raise :class:`CameraError` (a glitch), then reads recover."""
        if n < 0:
            raise ValueError("n must not be negative")
        with self._lock:
            self._fail_count = n

    def set_failed(self, failed: bool = True) -> None:
        """While set, every read raises :class:`CameraError` (an unplugged camera)."""
        with self._lock:
            self._failed = failed

    # -- Camera ----------------------------------------------------------------------
    def read(self) -> Frame | None:
        self._wait_for_frame()
        text = self._view()
        with self._lock:
            self._check_failures()
            frame = self._frame_for(text)
            self.frames_read += 1
        # A copy costs ~20 us; callers may draw on their frame as on a real camera's.
        return frame.copy()

    async def read_async(self) -> Frame | None:
        if self.frame_interval > 0:
            wait = self._claim_frame()
            if self._timer is not None:
                await self._timer.sleep(wait)
            else:
                await asyncio.sleep(wait)
        else:
            await asyncio.sleep(0)
        text = self._view()
        with self._lock:
            self._check_failures()
            frame = self._cached_frame(text)
            if frame is None and text is None and not self._per_frame:
                frame = self._empty_frame(render=False)
            if frame is not None:
                self.frames_read += 1
                return frame
        # A new scene: render it (a few ms) off the event loop.
        return await asyncio.to_thread(self._read_rendered, text)

    def _read_rendered(self, text: str | None) -> Frame:
        with self._lock:
            self._check_failures()
            frame = self._frame_for(text)
            self.frames_read += 1
            return frame

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cached = None

    # -- internals -------------------------------------------------------------------
    def _wait_for_frame(self) -> None:
        if self.frame_interval <= 0:
            return
        wait = self._claim_frame()
        if wait > 0:
            time.sleep(wait)

    def _claim_frame(self) -> float:
        """Seconds until the next frame, which this read takes (0: one is ready).

        Frames come on the camera's own cadence, every ``frame_interval`` from its start,
        whoever reads them: a reader a little late gets the frame at once and the next
        one on time (as from a real camera's one-frame buffer); one that fell behind by
        whole frames gets the latest now, not a burst of old ones, and the rest are lost.
        """
        interval = self.frame_interval
        now = time.monotonic()
        with self._lock:
            due = self._next_due
            if now < due:
                self._next_due = due + interval
                return due - now
            missed = int((now - due) / interval)  # captured while nobody read: dropped
            self._next_due = due + (missed + 1) * interval
            return 0.0

    def _check_failures(self) -> None:
        if self._closed:
            raise CameraError("simulated camera is closed")
        if self._failed:
            raise CameraError("simulated camera failure (set_failed)")
        if self._fail_count > 0:
            self._fail_count -= 1
            raise CameraError("simulated camera glitch (fail_next)")

    def _cached_frame(self, text: str | None) -> Frame | None:
        cached = self._cached
        if cached is None or self._per_frame or cached[0] != text:
            return None
        if self._fixed_variant is None or self._fixed_variant == cached[1]:
            return cached[2]
        return None

    def _frame_for(self, text: str | None) -> Frame:
        hit = self._cached_frame(text)
        if hit is not None:
            return hit
        if text is None and not self._per_frame:
            empty = self._empty_frame(render=True)
            assert empty is not None
            return empty
        if self._fixed_variant is not None:
            variant = self._fixed_variant
        elif self._random_variants:
            variant = random_variant(self._rng)
        else:
            variant = CLEAN
        background = _shared_background(int(self._rng.integers(BACKGROUNDS)))
        frame = render_frame(text, variant, self._rng, background=background)
        frame.flags.writeable = False  # shared by every read until the scene changes
        self.renders += 1
        self._cached = (text, variant, frame)
        return frame

    def _empty_frame(self, *, render: bool) -> Frame | None:
        """The scene has no code: one of the shared code-less frames (None when it still
        needs rendering and ``render`` is False: the caller renders it off the loop)."""
        if self._pending_empty is None:
            self._pending_empty = int(self._rng.integers(EMPTY_FRAMES))
        kind = self._fixed_variant if self._fixed_variant is not None else self._random_variants
        frame = _shared_empty_frame(kind, self._pending_empty, render=render)
        if frame is not None:
            variant = self._fixed_variant if self._fixed_variant is not None else CLEAN
            self._cached = (None, variant, frame)
            self._pending_empty = None
        return frame

    def __repr__(self) -> str:
        return f"SimCamera(variant={self._fixed_variant}, frame_interval={self.frame_interval})"


EMPTY_FRAMES = 8
"""How many code-less frames there are per variant (and for random variants), process-wide."""

BACKGROUNDS = 16
"""How many scenes the codes are rendered in front of, process-wide."""

_backgrounds: dict[int, npt.NDArray[np.float32]] = {}

_empty_lock = threading.Lock()
_empty: dict[tuple[FrameVariant | bool, int], Frame] = {}


def _shared_background(index: int) -> npt.NDArray[np.float32]:
    """Scene ``index`` (rendered the first time it is asked for), read-only."""
    background = _backgrounds.get(index)
    if background is None:
        with _empty_lock:
            background = _backgrounds.get(index)
            if background is None:
                background = render_background(np.random.default_rng(10_000 + index))
                _backgrounds[index] = background
    return background


def _shared_empty_frame(kind: FrameVariant | bool, index: int, *, render: bool) -> Frame | None:
    """Code-less frame ``index`` of ``kind`` (a fixed variant; True: a random variant each;
    False: CLEAN), rendered the first time it is asked for (with ``render``), read-only."""
    key = (kind, index)
    frame = _empty.get(key)
    if frame is not None or not render:
        return frame
    with _empty_lock:
        frame = _empty.get(key)
        if frame is None:
            rng = np.random.default_rng(index)
            if isinstance(kind, FrameVariant):
                variant = kind
            else:
                variant = random_variant(rng) if kind else CLEAN
            frame = render_frame(None, variant, rng)
            frame.flags.writeable = False
            _empty[key] = frame
    return frame
