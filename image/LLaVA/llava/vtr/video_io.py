# Copied from video/Video-LLaVA/videollava/vtr/video_io.py
"""Video files in, uint8 frames out: decord first, PyAV when decord is missing or cannot read the file.

Never torchvision (it cannot load beside the CPU torch this project pins). Frames are sampled uniformly
over the whole clip (`num_frames`), or at a target rate (`fps`, capped by `max_frames`), the way the
Video-LLaVA, InternVL and Qwen3-VL evaluations sample them:

    clip = load_video("v_abc.mp4", num_frames=8)
    clip.frames       # uint8 [8, height, width, 3]
    clip.timestamps   # seconds of each sampled frame
    find_video("videos/", "abc")   # videos/abc.mp4, videos/v_abc.mkv, ... whichever exists

Errors are `VideoError` (a ValueError) naming the file. A clip with fewer frames than asked for is still
answered (frames repeat, as in the official evaluations) with one warning naming it; a single-frame file
(an image under a video name) is warned about as such.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
#: a doc visual given as a path with one of these suffixes is an image, not a video
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


logger = logging.getLogger(__name__)


class VideoError(ValueError):
    """A video that is missing, unreadable or empty."""


@dataclass
class VideoClip:
    frames: np.ndarray  # uint8 [t, h, w, 3]
    indices: list[int]  # frame numbers in the file
    timestamps: list[float]  # seconds
    fps: float  # the file's frame rate
    total_frames: int
    backend: str = ""  # the decoder that read it: "decord" or "pyav"

    @property
    def duration(self) -> float:
        return self.total_frames / self.fps if self.fps else 0.0


def find_video(video_dir: str | Path, name: str) -> Path:
    """`name` as given, else `name` + each known extension, with and without a `v_` prefix (ActivityNet)."""
    root = Path(video_dir)
    stems = [name] if name.startswith("v_") else [name, f"v_{name}"]
    if name.startswith("v_"):
        stems.append(name[2:])
    candidates = []
    for stem in stems:
        candidates.append(root / stem)
        candidates.extend(root / f"{stem}{ext}" for ext in VIDEO_EXTENSIONS)
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(p.name for p in candidates[1:])
    raise VideoError(f"video {name!r} not found in {root} (tried {tried})")


def sample_indices(total: int, fps: float, num_frames: int | None, target_fps: float | None, max_frames: int | None):
    """Uniform frame numbers: `num_frames` centred in equal segments, or one every 1/target_fps seconds."""
    if total <= 0:
        return []
    if num_frames is None and target_fps is None:
        num_frames = 8
    if num_frames is None:
        count = max(1, int(round(total / max(fps, 1e-6) * target_fps)))
        if max_frames:
            count = min(count, max_frames)
        num_frames = min(count, total)
    if num_frames < 1:
        raise VideoError(f"num_frames={num_frames}: must be >= 1")
    segment = total / num_frames
    return [min(total - 1, int(segment * (i + 0.5))) for i in range(num_frames)]


def _decord_read(path: Path, pick):
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    total, fps = len(reader), float(reader.get_avg_fps() or 0.0)
    indices = pick(total, fps)
    if not indices:
        return np.zeros((0, 0, 0, 3), np.uint8), indices, fps, total
    return reader.get_batch(indices).asnumpy(), indices, fps, total


def _pyav_read(path: Path, pick):
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        total = int(stream.frames or 0)
        if total > 0:  # the header knows the length: decode once, keep only the sampled frames
            indices = pick(total, fps)
            wanted, kept = set(indices), {}
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    kept[i] = frame.to_ndarray(format="rgb24")
                if i >= indices[-1]:
                    break
            if len(kept) == len(wanted):
                return np.stack([kept[i] for i in indices]), indices, fps, total
            container.seek(0)  # the header was wrong: fall through to counting the frames
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    indices = pick(len(frames), fps)
    if not indices:
        return np.zeros((0, 0, 0, 3), np.uint8), indices, fps, len(frames)
    return np.stack([frames[i] for i in indices]), indices, fps, len(frames)


def load_video(
    path: str | Path,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    pick=None,
) -> VideoClip:
    """Decode the sampled frames of `path` (see the module docstring). `num_frames` wins over `fps`.
    `pick(total_frames, file_fps) -> frame numbers` replaces the sampling (e.g. a processor's own rule)."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video file not found: {path}")
    for name, value in (("num_frames", num_frames), ("max_frames", max_frames)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise VideoError(f"{name}={value!r}: must be an integer >= 1")
    if fps is not None and not fps > 0:
        raise VideoError(f"fps={fps!r}: must be > 0")
    if pick is None:

        def pick(total, file_fps):
            return sample_indices(total, file_fps, num_frames, fps, max_frames)

    errors = []
    for reader in (_decord_read, _pyav_read):
        try:
            frames, indices, file_fps, total = reader(path, pick)
        except ImportError as error:
            errors.append(f"{reader.__name__[1:-5]}: {error}")
            continue
        except Exception as error:  # a decoder's own error types: try the next decoder
            errors.append(f"{reader.__name__[1:-5]}: {type(error).__name__}: {error}")
            continue
        if not indices:
            raise VideoError(f"video {path} has no frames")
        distinct = len(set(indices))
        if total == 1 and len(indices) > 1:
            logger.warning("video %s holds a single frame (an image?); it is repeated %d times", path, len(indices))
        elif distinct < len(indices):
            logger.warning(
                "video %s has %d frames, fewer than the %d sampled: %d of them repeat",
                path, total, len(indices), len(indices) - distinct,
            )  # fmt: skip
        timestamps = [i / file_fps if file_fps else float(i) for i in indices]
        backend = reader.__name__[1:-5]
        return VideoClip(np.ascontiguousarray(frames), list(indices), timestamps, file_fps, total, backend)
    raise VideoError(f"cannot read video {path}: " + "; ".join(errors))


def write_test_video(path: str | Path, num_frames: int = 16, size: tuple[int, int] = (64, 48), fps: int = 8) -> Path:
    """A small mp4 (PyAV, mpeg4) whose frames differ: a moving bright square on a colour ramp. For tests."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        ys, xs = np.mgrid[0:height, 0:width]
        for t in range(num_frames):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[..., 0] = (xs * 255 // max(width - 1, 1)).astype(np.uint8)
            frame[..., 1] = (ys * 255 // max(height - 1, 1)).astype(np.uint8)
            frame[..., 2] = (t * 255 // max(num_frames - 1, 1)) & 0xFF
            x0 = (t * 5) % max(width - 8, 1)
            frame[8:16, x0 : x0 + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
