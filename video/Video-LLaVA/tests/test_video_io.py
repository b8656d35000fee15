"""Video decoding without torchvision: decord, the PyAV fallback, sampling and file lookup."""

import numpy as np
import pytest

from videollava.vtr import video_io
from videollava.vtr.video_io import VideoError, find_video, load_video, sample_indices, write_test_video


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return write_test_video(tmp_path_factory.mktemp("videos") / "v_clip.mp4", num_frames=16, size=(64, 48), fps=8)


def test_uniform_sampling_takes_the_middle_of_equal_segments():
    assert sample_indices(16, 8.0, 8, None, None) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sample_indices(5, 8.0, 8, None, None) == [0, 0, 1, 2, 2, 3, 4, 4]  # short clips repeat frames
    # 10 s at 1 fps: 10 frames, one per 8-frame segment
    assert sample_indices(80, 8.0, None, 1.0, None) == [4, 12, 20, 28, 36, 44, 52, 60, 68, 76]
    assert sample_indices(80, 8.0, None, 1.0, 4) == [10, 30, 50, 70]


def test_decord_and_pyav_decode_the_same_frames(clip_path, monkeypatch):
    clip = load_video(clip_path, num_frames=8)
    assert clip.frames.shape == (8, 48, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.indices == [1, 3, 5, 7, 9, 11, 13, 15] and clip.total_frames == 16 and clip.fps == 8
    assert clip.timestamps[0] == pytest.approx(1 / 8) and clip.duration == pytest.approx(2.0)
    assert len({int(f[..., 2].mean()) for f in clip.frames}) == 8, "the sampled frames are different frames"

    def no_decord(*_):
        raise ImportError("no decord")

    monkeypatch.setattr(video_io, "_decord_read", no_decord)
    fallback = load_video(clip_path, num_frames=8)
    assert fallback.indices == clip.indices
    assert np.abs(fallback.frames.astype(int) - clip.frames.astype(int)).mean() < 2


def test_find_video_tries_extensions_and_the_v_prefix(clip_path):
    folder = clip_path.parent
    assert find_video(folder, "clip") == clip_path
    assert find_video(folder, "v_clip") == clip_path
    assert find_video(folder, "v_clip.mp4") == clip_path
    with pytest.raises(VideoError, match="'nothing' not found.*nothing.mkv"):
        find_video(folder, "nothing")


def test_missing_and_broken_files_are_clear_errors(tmp_path):
    with pytest.raises(VideoError, match="not found"):
        load_video(tmp_path / "gone.mp4", num_frames=8)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(VideoError, match="cannot read video .*broken.mp4"):
        load_video(broken, num_frames=8)


def test_a_custom_frame_picker_replaces_the_sampling(clip_path):
    seen = []

    def every_fifth(total, fps):
        seen.append((total, fps))
        return list(range(0, total, 5))

    clip = load_video(clip_path, pick=every_fifth)
    assert seen == [(16, 8.0)] and clip.indices == [0, 5, 10, 15] and clip.frames.shape[0] == 4
    assert clip.backend == "decord"


@pytest.mark.parametrize("kwargs", [dict(num_frames=0), dict(num_frames=2.5), dict(fps=0), dict(fps=1, max_frames=0)])
def test_bad_sampling_settings_are_named_not_reported_as_a_broken_file(clip_path, kwargs):
    with pytest.raises(VideoError, match=f"{next(iter(kwargs)) if 'max_frames' not in kwargs else 'max_frames'}="):
        load_video(clip_path, **kwargs)


def test_a_short_clip_or_an_image_named_like_a_video_is_answered_with_a_warning(tmp_path, caplog):
    short = write_test_video(tmp_path / "short.mp4", num_frames=3)
    with caplog.at_level("WARNING", logger=video_io.__name__):
        clip = load_video(short, num_frames=8)
    assert clip.frames.shape[0] == 8 and sorted(set(clip.indices)) == [0, 1, 2]
    assert "short.mp4 has 3 frames, fewer than the 8 sampled: 5 of them repeat" in caplog.text
    caplog.clear()
    from PIL import Image

    image = tmp_path / "photo.mp4"
    Image.new("RGB", (32, 32), "red").save(image, format="PNG")
    assert load_video(image, num_frames=8).frames.shape[0] == 8
    assert "photo.mp4 holds a single frame (an image?)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=video_io.__name__):
        load_video(tmp_path / "short.mp4", num_frames=3)
    assert caplog.text == "", "no warning when every sampled frame is distinct"
