"""Videos: frames, IoU tracking, timelines, plots and annotated output, on videos written here."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import pattern_face
from ferkit.cli import cli
from ferkit.errors import FerkitError
from ferkit.faces import Detection
from ferkit.sources import open_video
from ferkit.video import IouTracker, analyze_video

SIZE = (160, 120)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATA = Path(__file__).resolve().parent / "data"  # vfr.mp4: examples/people.jpg panned, frames 0.1 s apart with gaps of 1 and 2 s


def _write_video(path, frames, fps=10.0, fourcc="mp4v"):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, SIZE)
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def _two_squares(n):
    """Two bright squares drifting right, one per half of the frame."""
    for i in range(n):
        frame = np.full((SIZE[1], SIZE[0], 3), 20, np.uint8)
        frame[20:50, 5 + i : 35 + i] = 240
        frame[70:100, 85 + i : 115 + i] = 240
        yield frame


def _bright_squares(rgb):
    """A detector for the squares above: the bright pixels' bounding box in each half."""
    found = []
    for left in (0, SIZE[0] // 2):
        ys, xs = np.nonzero(rgb[:, left : left + SIZE[0] // 2, 0] > 128)
        if len(xs):
            found.append(Detection((int(xs.min()) + left, int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1), 1.0))
    return found


@pytest.fixture
def squares_video(tmp_path):
    return _write_video(tmp_path / "squares.mp4", _two_squares(20))


def test_tracker_keeps_ids_through_motion_and_gaps():
    tracker = IouTracker(max_gap=2)
    assert tracker.update([(0, 0, 10, 10), (50, 50, 10, 10)]) == [1, 2]
    assert tracker.update([(52, 51, 10, 10), (1, 0, 10, 10)]) == [2, 1]
    assert tracker.update([]) == []
    assert tracker.update([(2, 1, 10, 10)]) == [1]  # back after a one-frame gap
    assert tracker.update([(200, 200, 10, 10)]) == [3]  # somewhere new



def test_a_face_moving_fast_between_analysed_frames_keeps_its_track():
    tracker = IouTracker()
    assert tracker.update([(100, 100, 40, 40), (400, 100, 40, 40)]) == [1, 2]
    assert tracker.update([(150, 110, 40, 40), (400, 100, 40, 40)]) == [1, 2]  # moved more than its width: no overlap
    assert tracker.update([(200, 120, 42, 42)]) == [1]
    assert tracker.update([(210, 120, 120, 120)]) == [3]  # near, but of another size: another face
    assert tracker.update([(900, 500, 40, 40)]) == [4]  # far away: another face


def test_a_cut_to_another_shot_is_told_from_a_pan_a_zoom_and_a_change_of_light():
    from ferkit.video import frame_signature, is_scene_cut

    photo = np.asarray(Image.open(EXAMPLES / "people.jpg").convert("RGB").resize((640, 480)))
    other = np.asarray(Image.open(next(EXAMPLES.glob("fer2013-sample/*/*/*.*"))).convert("RGB").resize((640, 480)))
    same_shot = {
        "pan": cv2.warpAffine(photo, np.float32([[1, 0, 64], [0, 1, 0]]), (640, 480), borderMode=cv2.BORDER_REFLECT),
        "zoom": cv2.warpAffine(photo, cv2.getRotationMatrix2D((320, 240), 0, 1.2), (640, 480), borderMode=cv2.BORDER_REFLECT),
        "light": np.clip(photo.astype(int) * 1.3, 0, 255).astype(np.uint8),
    }
    before = frame_signature(photo)
    assert not any(is_scene_cut(before, frame_signature(frame)) for frame in same_shot.values())
    assert is_scene_cut(before, frame_signature(other))


def _squares_then_a_cut(n):
    """_two_squares, then another shot (a blue room) where two other faces are near where those were."""
    for i, frame in enumerate(_two_squares(n)):
        if i >= n // 2:
            frame[:] = (30, 60, 200)
            frame[20:50, 45 + i : 75 + i] = 240  # moved by less than the tracker's reach, without overlap
            frame[70:100, 85 + i : 115 + i] = 240  # where the other face was
        yield frame


def test_tracks_and_smoothing_start_again_after_a_cut(trained_run, tmp_path):
    video = _write_video(tmp_path / "cut.mp4", _squares_then_a_cut(20))
    raw = analyze_video(video, model=trained_run, detector=_bright_squares, every=1, smooth=1)
    smooth = analyze_video(video, model=trained_run, detector=_bright_squares, every=1, smooth=9)
    assert {r.track for r in raw.rows if r.frame < 10} == {1, 2} and {r.track for r in raw.rows if r.frame >= 10} == {3, 4}
    first_after_cut = [(r.track, r.face.probabilities) for r in raw.rows if r.frame == 10]
    assert [(r.track, r.face.probabilities) for r in smooth.rows if r.frame == 10] == first_after_cut


def test_a_plot_of_more_face_tracks_than_it_shows_says_so(trained_run, tmp_path):
    from ferkit.batch import analyze_video_into_folder

    shots = [frame for shot in range(4) for frame in _squares_then_a_cut(10) if (frame[0, 0, 2] == 200) == shot % 2]
    video = _write_video(tmp_path / "shots.mp4", shots)  # four shots of two faces each
    summary = analyze_video_into_folder(video, tmp_path, model=trained_run, detector=_bright_squares, every=1)
    assert summary["tracks"] >= 8 and summary["tracks_plotted"] == 6


def test_a_video_without_a_fixed_frame_rate_keeps_each_frames_own_time():
    """A phone's video: its frames' timestamps, not their index over the container's frame rate (which OpenCV
    gives as 3 or 10 frames a second here, by version: either puts most frames at other times)."""
    timeline = analyze_video(DATA / "vfr.mp4", every=1)
    assert sorted({round(r.time_s, 3) for r in timeline.rows}) == [0, .1, .2, .3, 1.3, 1.4, 1.5, 1.6, 3.6, 3.7, 3.8, 3.9]
    assert timeline.last_time_s == pytest.approx(3.9)


def test_clips_joined_end_to_end_keep_time_going_forward(tmp_path):
    """Camcorder clips joined (cat a.mts b.mts) restart their clock at each join: the times carry on."""
    from ferkit.sources import video_frames

    parts = [_write_video(tmp_path / f"{name}.ts", _two_squares(20)) for name in ("a", "b")]
    (tmp_path / "joined.mts").write_bytes(b"".join(part.read_bytes() for part in parts))
    capture, info = open_video(tmp_path / "joined.mts")
    times = [time_s for _, time_s, _ in video_frames(capture, info, every=3)]
    assert len(times) == 14 and all(b > a for a, b in zip(times, times[1:]))
    assert times[-1] == pytest.approx(39 / 10, abs=0.01)  # frame 39 at 10 frames a second


def test_video_timeline_follows_each_face(trained_run, squares_video, tmp_path):
    timeline = analyze_video(squares_video, model=trained_run, detector=_bright_squares, every=2, smooth=3,
                             annotated=tmp_path / "out.mp4")
    assert timeline.frames_analysed == 10
    assert timeline.tracks == [1, 2]
    assert [r.frame for r in timeline.rows if r.track == 1] == list(range(0, 20, 2))
    assert all(abs(sum(r.face.probabilities.values()) - 1) < 1e-4 for r in timeline.rows)
    rows = list(csv.DictReader(open(timeline.to_csv(tmp_path / "t.csv"))))
    assert len(rows) == 20 and rows[0]["track"] in ("1", "2") and float(rows[-1]["time_s"]) == pytest.approx(1.8)
    assert [row["uncertain"] for row in rows] == [str(int(r.face.uncertain)) for r in timeline.rows]
    assert timeline.plot(tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    capture, info = open_video(tmp_path / "out.mp4")
    assert info.frames == 10 and info.size == SIZE
    capture.release()
    again = analyze_video(squares_video, model=trained_run, detector=_bright_squares, every=2,
                          annotated=tmp_path / "out.mp4", timeline_csv=tmp_path / "t.csv")  # ferkit's own: replaced
    assert again.frames_analysed == 10
    (tmp_path / "notes.csv").write_text("my notes\n")
    original = squares_video.read_bytes()
    for kwargs, words in (({"timeline_csv": tmp_path / "notes.csv"}, "ferkit did not write it"),
                          ({"annotated": squares_video}, "is the video being analysed"),
                          ({"annotated": tmp_path / "out.avi"}, "written as an .mp4 file, not out.avi")):
        with pytest.raises(FerkitError, match=words):
            analyze_video(squares_video, model=trained_run, detector=_bright_squares, every=2, **kwargs)
    assert (tmp_path / "notes.csv").read_text() == "my notes\n" and squares_video.read_bytes() == original
    (tmp_path / "mine.png").write_bytes((tmp_path / "notes.csv").read_bytes())
    for write, path in ((again.to_csv, tmp_path / "notes.csv"), (again.plot, tmp_path / "mine.png")):  # the user's own
        with pytest.raises(FerkitError, match="ferkit did not write it"):
            write(path)
        assert write(path, overwrite=True) == path
    assert again.plot(tmp_path / "mine.png") == tmp_path / "mine.png"  # ferkit's own now: replaced
    assert not (tmp_path / "out.avi").exists()


def test_a_face_unfound_for_a_third_of_a_second_keeps_its_track_at_any_sampling(trained_run, tmp_path):
    def covered(frames):  # the left square hidden for frames 20-29: a third of a second at 30 frames a second
        for i, frame in enumerate(frames):
            if 20 <= i < 30:
                frame[:, : SIZE[0] // 2] = 20
            yield frame

    video = _write_video(tmp_path / "covered.mp4", covered(_two_squares(40)), fps=30.0)
    for every in (1, 6):
        timeline = analyze_video(video, model=trained_run, detector=_bright_squares, every=every)
        assert timeline.tracks == [1, 2], every


def test_a_damaged_frame_inside_a_video_is_passed_over(trained_run, tmp_path, caplog):
    path = _write_video(tmp_path / "damaged.avi", _two_squares(30), fourcc="MJPG")
    data = bytearray(path.read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i:i + 3] == b"\xff\xd8\xff"]  # each frame's JPEG
    data[starts[15] + 2:starts[15] + 600] = bytes(598)  # frame 15's headers and first data gone
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="ferkit"):
        timeline = analyze_video(path, model=trained_run, detector=_bright_squares, every=1)
    assert 28 <= timeline.frames_analysed <= 29 and max(r.frame for r in timeline.rows) == 29
    assert "could not be decoded and were passed over" in caplog.text


def test_frames_whose_analysis_fails_are_counted_and_said_and_a_video_none_of_whose_frames_could_be_is_an_error(
        trained_run, squares_video, caplog):
    calls = []

    def every_third_fails(rgb):
        calls.append(1)
        if len(calls) % 3 == 0:
            raise MemoryError("out of memory")
        return _bright_squares(rgb)

    with caplog.at_level("WARNING", logger="ferkit"):
        timeline = analyze_video(squares_video, model=trained_run, detector=every_third_fails, every=1)
    assert timeline.frames_failed == len(calls) // 3 > 0 and timeline.summary()["frames_failed"] == timeline.frames_failed
    assert len({row.frame for row in timeline.rows}) == timeline.frames_analysed - timeline.frames_failed
    assert "could not be analysed (face detection failed" in caplog.text and "MemoryError: out of memory" in caplog.text

    def always_fails(rgb):
        raise MemoryError("out of memory")

    with pytest.raises(FerkitError, match="no frame of .* could be analysed"):
        analyze_video(squares_video, model=trained_run, detector=always_fails, every=1)


def test_smoothing_damps_changes(trained_run, squares_video):
    raw = analyze_video(squares_video, model=trained_run, detector=_bright_squares, every=1, smooth=1)
    smooth = analyze_video(squares_video, model=trained_run, detector=_bright_squares, every=1, smooth=9)

    def jitter(timeline):
        series = np.array([list(r.face.probabilities.values()) for r in timeline.rows if r.track == 1])
        return np.abs(np.diff(series, axis=0)).sum()

    assert jitter(smooth) < jitter(raw)
    # each track's smoothed probabilities are the exponential average of its raw ones, alpha = 2 / (N + 1)
    alpha = 2 / (9 + 1)
    for track in raw.tracks:
        series = np.array([list(r.face.probabilities.values()) for r in raw.rows if r.track == track])
        expected = [series[0]]
        for current in series[1:]:
            expected.append(alpha * current + (1 - alpha) * expected[-1])
        got = np.array([list(r.face.probabilities.values()) for r in smooth.rows if r.track == track])
        assert np.allclose(got, expected, atol=1e-6)


def test_unreadable_videos_are_refused(trained_run, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with pytest.raises(FerkitError, match="not a video"):
        open_video(tmp_path / "broken.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(FerkitError, match="empty.mp4 is an empty file"):
        open_video(tmp_path / "empty.mp4")
    # alone, a bad video is bad input (exit 2), in one line: FFmpeg's own notes ("moov atom not found") are kept quiet
    command = [sys.executable, "-m", "ferkit.cli", "predict", str(tmp_path / "broken.mp4"), "--detector", "none",
               "--model", str(trained_run), "--out", str(tmp_path / "o")]
    alone = subprocess.run(command, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "FERKIT_DEBUG"})
    assert alone.returncode == 2 and alone.stderr.strip() == f"error: {tmp_path / 'broken.mp4'} is not a video ferkit can read"
    # one of several sources: reported, the others analysed, exit 1
    photo = tmp_path / "face.png"
    Image.fromarray(pattern_face(3, np.random.default_rng(0))).save(photo)
    result = CliRunner().invoke(cli, ["predict", str(tmp_path / "empty.mp4"), str(photo), "--detector", "none",
                                      "--model", str(trained_run), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and f"error: {tmp_path / 'empty.mp4'} is an empty file" in result.output
    assert result.output.rstrip().endswith("1 of 1 video(s) failed")  # after the photos' summary, which does not count it
    assert (tmp_path / "o" / "faces.csv").read_text().count("\n") == 2  # the header and the photo's face


def test_video_command_writes_timeline_plot_and_video(trained_run, squares_video, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict", str(squares_video), "--model", str(trained_run), "--detector", "none",
                                      "--every", "4", "--save-video", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("squares.timeline.csv", "squares.emotions.png", "squares.annotated.mp4"):
        assert (out / name).stat().st_size > 0
    assert "5 frames analysed" in result.output


@pytest.mark.parametrize("suffix", [".3gp", ".mts", ".ts"])
def test_a_phone_or_camcorder_video_is_read_as_a_video(trained_run, tmp_path, suffix):
    clip = _write_video(tmp_path / f"clip{suffix}", _two_squares(20))  # a 3GP file, an MPEG transport stream
    result = CliRunner().invoke(cli, ["predict", str(clip), "--model", str(trained_run), "--detector", "none",
                                      "--every", "4", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and "5 frames analysed" in result.output, result.output


def test_a_typescript_module_beside_photos_is_no_video(trained_run, tmp_path):
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "photos" / "grey.png")
    (tmp_path / "photos" / "util.mts").write_text("export const answer = 42;\n")
    (tmp_path / "photos" / "Greeter.ts").write_text("G" + "export class Greeter {}\n" * 20)  # a G, as a stream's sync byte
    result = CliRunner().invoke(cli, ["predict", str(tmp_path / "photos"), "--model", str(trained_run), "--detector",
                                      "none", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and "video" not in result.output, result.output


def test_a_videos_results_replace_ferkits_own_but_not_a_users_files(trained_run, squares_video, tmp_path):
    out = tmp_path / "out"
    command = ["predict", str(squares_video), "--model", str(trained_run), "--detector", "none", "--every", "4",
               "--save-video", "--out", str(out)]
    assert CliRunner().invoke(cli, command).exit_code == 0
    first = {name: (out / name).read_bytes() for name in ("squares.timeline.csv", "squares.emotions.png")}
    again = CliRunner().invoke(cli, command)  # ferkit's own timeline, plot and video are replaced
    assert again.exit_code == 0, again.output
    assert (out / "squares.timeline.csv").read_bytes() == first["squares.timeline.csv"]
    capture, info = open_video(out / "squares.annotated.mp4")  # ferkit's mark at its end leaves it a video
    capture.release()
    assert info.frames == 5
    for mine in ("squares.emotions.png", "squares.timeline.csv", "squares.annotated.mp4"):
        (out / mine).unlink()  # an annotated video of the user's is refused even beside ferkit's own timeline
        Image.new("RGB", (8, 8)).save(out / "theirs.png")
        (out / "theirs.png").rename(out / mine)  # the user's own file of that name
        refused = CliRunner().invoke(cli, command)
        assert refused.exit_code == 2 and "ferkit did not write it" in refused.output and mine in refused.output
        assert (out / mine).stat().st_size < 200  # untouched
        assert CliRunner().invoke(cli, [*command, "--overwrite"]).exit_code == 0
        assert (out / mine).stat().st_size > 200
    # without --save-video, ferkit's annotated video of the run before goes: it would no longer match
    assert CliRunner().invoke(cli, [a for a in command if a != "--save-video"]).exit_code == 0
    assert not (out / "squares.annotated.mp4").exists() and (out / "squares.timeline.csv").exists()


def test_real_faces_in_a_panning_video_are_tracked(trained_run, tmp_path):
    """A 640x360 window pans 88 px across examples/people.jpg: two of its three faces stay in view."""
    photo = cv2.cvtColor(cv2.imread(str(EXAMPLES / "people.jpg")), cv2.COLOR_BGR2RGB)
    path = tmp_path / "pan.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (640, 360))
    for i in range(12):
        writer.write(cv2.cvtColor(np.ascontiguousarray(photo[:, 8 * i : 8 * i + 640]), cv2.COLOR_RGB2BGR))
    writer.release()
    timeline = analyze_video(path, model=trained_run, every=1)
    per_frame = {}
    for row in timeline.rows:
        per_frame.setdefault(row.frame, []).append(row.track)
    assert timeline.frames_analysed == 12 and sorted(per_frame) == list(range(12))
    # the same two faces on the same two tracks in every frame
    assert all(sorted(tracks) == [1, 2] for tracks in per_frame.values()) and timeline.tracks == [1, 2]


def test_an_annotated_video_that_cannot_be_written_is_an_error_not_an_empty_file(trained_run, squares_video, tmp_path):
    from ferkit.errors import FerkitError

    target = tmp_path / "no-such-folder" / "out.mp4"
    with pytest.raises(FerkitError, match="cannot write the annotated video"):
        analyze_video(squares_video, model=trained_run, detector=_bright_squares, annotated=target)
    assert not target.exists()


def test_an_annotated_video_takes_its_name_only_once_finished_or_stopped(trained_run, squares_video, tmp_path):
    """A process killed outright (a closed terminal, out of memory) leaves no unplayable file under that name."""
    target = tmp_path / "out.mp4"
    seen = []

    def looking(rgb):
        seen.append((target.exists(), (tmp_path / ".out.part.mp4").exists()))
        if len(seen) == 12:
            raise KeyboardInterrupt  # Ctrl-C: what was written is kept, playable
        return _bright_squares(rgb)

    with pytest.raises(KeyboardInterrupt):
        analyze_video(squares_video, model=trained_run, detector=looking, annotated=target, every=1)
    assert all(not final for final, _ in seen) and any(part for _, part in seen)
    assert target.exists() and not (tmp_path / ".out.part.mp4").exists()
    capture = cv2.VideoCapture(str(target))
    assert capture.isOpened() and capture.read()[0]
    capture.release()


def test_a_video_wider_than_mpeg4_encodes_gets_a_scaled_down_annotated_copy(trained_run, tmp_path):
    source = tmp_path / "wide.avi"  # Motion JPEG: 9000 pixels wide; mp4v, the annotated copy's codec, stops at 8191
    writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (9000, 64))
    for i in range(4):
        writer.write(np.full((64, 9000, 3), 40 * i, np.uint8))
    writer.release()
    target = tmp_path / "wide.annotated.mp4"
    timeline = analyze_video(source, model=trained_run, detector=lambda rgb: [], annotated=target, every=1)
    assert timeline.frames_analysed == 4
    copy = cv2.VideoCapture(str(target))
    assert copy.get(cv2.CAP_PROP_FRAME_WIDTH) == 8190 and copy.get(cv2.CAP_PROP_FRAME_HEIGHT) == 58
    assert copy.read()[0]
    copy.release()


def test_frames_wait_in_small_batches(trained_run, squares_video):
    """At most FRAMES_PER_BATCH frames are held before their faces are classified."""
    from ferkit.video import FRAMES_PER_BATCH

    analysed = []
    analyze_video(squares_video, model=trained_run, detector=_bright_squares, every=1,
                  progress=lambda index: analysed.append(index))
    assert analysed == list(range(20))
    # results arrive batch by batch: progress for frame i comes before frame i + FRAMES_PER_BATCH is read
    import ferkit.video as video

    held = []
    original = video._labelled

    def watching(frames, path, store):
        for item in original(frames, path, store):
            held.append(len(store))
            yield item

    video._labelled = watching
    try:
        analyze_video(squares_video, model=trained_run, detector=_bright_squares, every=1)
    finally:
        video._labelled = original
    assert max(held) == FRAMES_PER_BATCH


def test_the_timeline_is_written_as_frames_are_analysed(trained_run, squares_video, tmp_path):
    streamed = tmp_path / "new" / "streamed.csv"  # its folder is made
    seen_rows = []

    def look(index):  # after each analysed frame, the file already holds that frame's rows
        seen_rows.append(sum(1 for _ in open(streamed)) - 1)

    timeline = analyze_video(squares_video, model=trained_run, detector=_bright_squares, every=2,
                             timeline_csv=streamed, progress=look)
    assert seen_rows == list(range(2, 2 * len(seen_rows) + 1, 2))  # two faces a frame, flushed each frame
    assert streamed.read_text() == timeline.to_csv(tmp_path / "whole.csv").read_text()


def test_a_rerun_stopped_by_ctrl_c_leaves_no_plot_of_the_earlier_run_beside_its_partial_timeline(trained_run, squares_video, tmp_path):
    from ferkit.batch import analyze_video_into_folder

    analyze_video_into_folder(squares_video, tmp_path, model=trained_run, detector=_bright_squares, every=1)
    assert (tmp_path / "squares.emotions.png").exists()

    def stop(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        analyze_video_into_folder(squares_video, tmp_path, model=trained_run, detector=_bright_squares, every=1, progress=stop)
    assert not (tmp_path / "squares.emotions.png").exists()  # the plot of the whole earlier run would mislead
    assert (tmp_path / "squares.timeline.csv").read_text().count("\n") == 1 + 2 * 5


def test_videos_with_the_same_name_keep_their_own_results(trained_run, tmp_path):
    for sub, n in (("v1", 10), ("v2", 20)):
        (tmp_path / sub).mkdir()
        _write_video(tmp_path / sub / "clip.mp4", _two_squares(n))
    result = CliRunner().invoke(cli, ["predict", str(tmp_path / "v1" / "clip.mp4"), str(tmp_path / "v2" / "clip.mp4"),
                                      "--model", str(trained_run), "--every", "1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    first, second = result.output.strip().splitlines()[-2:]
    assert "10 frames analysed" in first and "o/clip.timeline.csv" in first
    assert "20 frames analysed" in second and "o/clip-2.timeline.csv" in second
    assert {p.name for p in (tmp_path / "o").iterdir()} == {
        "clip.timeline.csv", "clip.emotions.png", "clip-2.timeline.csv", "clip-2.emotions.png"}


def test_a_video_that_fails_in_a_json_batch_has_its_own_record(trained_run, squares_video, tmp_path):
    import json

    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 100)
    result = CliRunner().invoke(cli, ["predict", str(squares_video), str(tmp_path / "broken.mp4"), "--model", str(trained_run),
                                      "--detector", "none", "--every", "4", "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 1, result.output
    records = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [record["source"] for record in records] == [str(squares_video), str(tmp_path / "broken.mp4")]
    assert "error" in records[1] and "frames_analysed" in records[0]


def test_a_results_folder_another_predict_is_writing_is_refused_for_a_video_too(trained_run, squares_video, tmp_path):
    import fcntl

    (tmp_path / "out").mkdir()
    holder = os.open(tmp_path / "out", os.O_RDONLY)  # as a `ferkit predict --out out` running elsewhere holds it
    args = ["predict", str(squares_video), "--model", str(trained_run), "--detector", "none", "--out", str(tmp_path / "out")]
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "is being written by another ferkit predict" in result.output, result.output
        assert list((tmp_path / "out").iterdir()) == []
    finally:
        os.close(holder)
    assert CliRunner().invoke(cli, args).exit_code == 0  # free again, and released after it


def test_a_video_of_the_same_name_from_elsewhere_does_not_replace_anothers_results_unasked(trained_run, tmp_path):
    for sub, n in (("cam1", 10), ("cam2", 20)):
        (tmp_path / sub).mkdir()
        _write_video(tmp_path / sub / "clip.mp4", _two_squares(n))
    common = ["--model", str(trained_run), "--detector", "none", "--every", "1", "--out", str(tmp_path / "o")]
    assert CliRunner().invoke(cli, ["predict", str(tmp_path / "cam1" / "clip.mp4"), *common]).exit_code == 0
    timeline = (tmp_path / "o" / "clip.timeline.csv").read_bytes()
    again = CliRunner().invoke(cli, ["predict", str(tmp_path / "cam1" / "clip.mp4"), *common])  # the same video: fine
    assert again.exit_code == 0, again.output
    other = CliRunner().invoke(cli, ["predict", str(tmp_path / "cam2" / "clip.mp4"), *common])
    assert other.exit_code == 2
    assert other.output.strip() == (f"error: {tmp_path / 'o' / 'clip'}.* hold the results of another video, "
                                    f"{tmp_path / 'cam1' / 'clip.mp4'}: choose another --out (or --overwrite)")
    assert (tmp_path / "o" / "clip.timeline.csv").read_bytes() == timeline
    replaced = CliRunner().invoke(cli, ["predict", str(tmp_path / "cam2" / "clip.mp4"), *common, "--overwrite"])
    assert replaced.exit_code == 0 and "20 frames analysed" in replaced.output


def test_the_same_video_given_twice_is_analysed_once(trained_run, squares_video, tmp_path):
    twice = [str(squares_video), str(squares_video.parent / ".." / squares_video.parent.name / squares_video.name)]
    result = CliRunner().invoke(cli, ["predict", *twice, "--model", str(trained_run), "--detector", "none",
                                      "--every", "4", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"squares.timeline.csv", "squares.emotions.png"}


def test_a_missing_video_is_named_as_missing(tmp_path):
    with pytest.raises(FerkitError, match="^no such file: .*nope.mp4$"):
        open_video(tmp_path / "nope.mp4")
    with pytest.raises(FerkitError, match="is a folder, not a video"):
        open_video(tmp_path)


def test_smoothing_and_frame_steps_below_one_are_refused():
    from ferkit.video import frame_step

    with pytest.raises(FerkitError, match="smooth"):
        analyze_video("any.mp4", smooth=0)
    with pytest.raises(FerkitError, match="at least 1"):
        frame_step(25.0, every=0)
    with pytest.raises(FerkitError, match="above 0"):
        frame_step(25.0, target_fps=-3)
    for wrong in ({"every": 2.5}, {"every": True}, {"target_fps": "5"}, {"target_fps": float("nan")}, {"smooth": 1.5}):
        with pytest.raises(FerkitError, match="must be"):
            analyze_video("any.mp4", **wrong)


def test_the_api_samples_a_video_as_the_command_does(trained_run, squares_video, tmp_path):
    """About 5 frames per second unless told otherwise, in `analyze_video` as in `ferkit predict`."""
    from ferkit.sources import open_video
    from ferkit.video import frame_step

    capture, info = open_video(squares_video)
    capture.release()
    timeline = analyze_video(squares_video, model=trained_run, detector=_bright_squares)
    assert {row.frame for row in timeline.rows} == set(range(0, info.frames, frame_step(info.fps)))
    faster = analyze_video(squares_video, model=trained_run, detector=_bright_squares, target_fps=info.fps)
    assert faster.frames_analysed == info.frames
    with pytest.raises(FerkitError, match="not both"):
        analyze_video(squares_video, every=2, target_fps=5)


def test_a_still_photo_given_as_a_video_is_one_frame_not_none(tmp_path):
    still = tmp_path / "still.mp4"
    still.write_bytes((EXAMPLES / "people.jpg").read_bytes())
    timeline = analyze_video(still)
    assert timeline.frames_analysed == 1 and len(timeline.rows) == 3


def test_a_face_seen_in_one_analysed_frame_is_drawn_in_its_plot(tmp_path):
    """One frame (a still photo as a video) gives one point per class and face: a dot each, not an invisible line."""
    from ferkit.draw import colour_of

    still = tmp_path / "still.mp4"
    still.write_bytes((EXAMPLES / "people.jpg").read_bytes())
    timeline = analyze_video(still)
    assert len({row.track for row in timeline.rows}) == 3
    picture = np.asarray(Image.open(timeline.plot(tmp_path / "still.png")).convert("RGB")).astype(int)
    panels = picture[: int(picture.shape[0] * 0.85)]  # the legend, with its own sample of each colour, lies below
    assert (np.abs(panels - colour_of("sad")).sum(axis=2) < 30).sum() > 0


def test_an_annotated_videos_faces_carry_their_track_numbers():
    from ferkit.draw import draw_faces
    from ferkit.results import Face

    frame = Image.new("RGB", (160, 120), (30, 30, 30))
    face = Face((40, 30, 50, 50), "sad", 0.9, {})
    assert np.array_equal(np.asarray(draw_faces(frame, [face], numbers=[1])), np.asarray(draw_faces(frame, [face])))
    assert not np.array_equal(np.asarray(draw_faces(frame, [face], numbers=[7])), np.asarray(draw_faces(frame, [face])))


def test_a_video_without_faces_plots_its_whole_length_and_says_so(trained_run, tmp_path):
    dark = _write_video(tmp_path / "dark.mp4", [np.zeros((SIZE[1], SIZE[0], 3), np.uint8)] * 20)
    timeline = analyze_video(dark, model=trained_run, detector=_bright_squares, every=3)
    assert timeline.rows == [] and timeline.frames_analysed == 7
    assert timeline.last_frame == 18
    assert Image.open(timeline.plot(tmp_path / "dark.png")).size[0] > 0


def test_a_video_cut_short_is_analysed_as_far_as_it_goes_and_said_to_be(trained_run, tmp_path, caplog):
    whole = _write_video(tmp_path / "whole.avi", _two_squares(40), fourcc="MJPG")
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="ferkit"):
        complete = analyze_video(whole, model=trained_run, detector=_bright_squares, every=1)
    assert "cut short" not in caplog.text and not complete.cut_short
    with caplog.at_level("WARNING", logger="ferkit"):
        timeline = analyze_video(cut, model=trained_run, detector=_bright_squares, every=1)
    assert 0 < timeline.frames_analysed < 40 and timeline.cut_short and timeline.summary()["cut_short"]
    assert f"frames stopped coming after frame {timeline.frames_analysed} of the 40 its container lists" in caplog.text
    told = CliRunner().invoke(cli, ["predict", str(cut), "--model", str(trained_run), "--detector", "none", "--every", "1",
                                    "--out", str(tmp_path / "out")])
    assert told.exit_code == 0 and f"{timeline.frames_analysed} frames analysed (every 1) (the file seems cut short)" in told.output


def test_a_video_analysed_into_a_folder_reports_its_progress_and_files(trained_run, squares_video, tmp_path):
    from ferkit.batch import analyze_video_into_folder

    seen = []
    summary = analyze_video_into_folder(squares_video, tmp_path, stem="clip", model=trained_run,
                                        detector=_bright_squares, every=4, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(n, 5) for n in range(1, 6)]  # 20 frames, every 4th
    assert summary == {"source": str(squares_video), "frames_analysed": 5, "every": 4, "tracks": 2, "tracks_plotted": 2, "faces": 10,
                       "cut_short": False, "frames_failed": 0, "files": [str(tmp_path / "clip.timeline.csv"), str(tmp_path / "clip.emotions.png")]}
    assert (tmp_path / "clip.timeline.csv").read_text().count("\n") == 1 + 10


def test_a_video_analysed_into_a_folder_that_does_not_exist_yet(trained_run, squares_video, tmp_path):
    from ferkit.batch import analyze_video_into_folder

    summary = analyze_video_into_folder(squares_video, tmp_path / "new" / "out", model=trained_run,
                                        detector=_bright_squares, every=10)
    assert summary["frames_analysed"] == 2 and all(Path(f).stat().st_size for f in summary["files"])


def test_a_folder_without_images_beside_a_video_is_reported_and_the_video_analysed(trained_run, squares_video, tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["predict", str(tmp_path / "empty"), str(squares_video), "--model", str(trained_run),
                                      "--detector", "none", "--every", "10", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "error:" in result.output and "empty" in result.output
    assert (tmp_path / "out" / "squares.timeline.csv").exists()


def _open_by_this_process(path) -> bool:
    fds = Path("/proc/self/fd")
    return any(os.path.realpath(fd) == os.path.realpath(path) for fd in fds.iterdir())


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to list open files")
def test_a_video_stopped_early_is_closed_while_the_error_is_still_held(trained_run, squares_video):
    def stop(frame):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as stopped:
        analyze_video(squares_video, model=trained_run, detector=_bright_squares, every=1, progress=stop)
    assert stopped.traceback and not _open_by_this_process(squares_video)


def test_a_globs_videos_are_analysed_and_a_folders_are_named_as_left_out(trained_run, squares_video, tmp_path):
    Image.fromarray(pattern_face(3, np.random.default_rng(3))).save(squares_video.parent / "face.png")
    common = ["--model", str(trained_run), "--detector", "none"]
    videos_only = CliRunner().invoke(cli, ["predict", str(squares_video.parent / "*.mp4"), *common, "--out", str(tmp_path / "g")])
    assert videos_only.exit_code == 0, videos_only.output
    assert (tmp_path / "g" / "squares.timeline.csv").exists() and not (tmp_path / "g" / "faces.csv").exists()
    both = CliRunner().invoke(cli, ["predict", str(squares_video.parent / "*.*"), *common, "--out", str(tmp_path / "b")])
    assert both.exit_code == 0 and "1 images" in both.output and (tmp_path / "b" / "squares.timeline.csv").exists()
    folder = CliRunner().invoke(cli, ["predict", str(squares_video.parent), *common, "--out", str(tmp_path / "f")])
    assert folder.exit_code == 0 and "holds 1 video(s), left out" in folder.output
    assert not (tmp_path / "f" / "squares.timeline.csv").exists()


def test_a_videos_files_never_replace_another_video_given(trained_run, squares_video, tmp_path):
    folder = squares_video.parent
    (folder / "squares.annotated.mp4").write_bytes(squares_video.read_bytes())  # a user's own video, so named
    before = (folder / "squares.annotated.mp4").read_bytes()
    result = CliRunner().invoke(cli, ["predict", str(folder / "*.mp4"), "--model", str(trained_run), "--detector", "none",
                                      "--every", "8", "--save-video", "--overwrite", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    assert (folder / "squares.annotated.mp4").read_bytes() == before
    assert (folder / "squares-2.annotated.mp4").exists() and (folder / "squares.annotated.annotated.mp4").exists()
    again = CliRunner().invoke(cli, ["predict", str(folder / "*.mp4"), "--model", str(trained_run), "--detector", "none",
                                     "--every", "8", "--out", str(tmp_path / "o")])
    assert again.exit_code == 0 and "squares-2.annotated" not in again.output  # ferkit's own video: not read back


def test_a_videos_plot_never_replaces_a_photo_the_batch_analyses(trained_run, squares_video, tmp_path):
    folder = squares_video.parent
    Image.fromarray(np.full((60, 60, 3), 120, np.uint8)).save(folder / "squares.emotions.png")  # a user's photo, so named
    before = (folder / "squares.emotions.png").read_bytes()
    command = ["predict", str(folder / "*"), "--model", str(trained_run), "--detector", "none", "--every", "8",
               "--overwrite", "--out", str(folder)]
    for _ in range(2):  # the second time, ferkit's own files of the first are replaced, not renamed again
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 0 and "1 images" in result.output, result.output
        assert (folder / "squares.emotions.png").read_bytes() == before
        assert (folder / "squares-2.emotions.png").exists() and not (folder / "squares-3.emotions.png").exists()

