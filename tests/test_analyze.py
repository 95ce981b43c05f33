"""Whole-photo analysis: detection -> crops -> batched classification, on real and generated images."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import pattern_face
from ferkit import analyze
from ferkit.errors import FerkitError
from ferkit.faces import Detection, get_detector
from ferkit.predict import analyze_images
from conftest import one_crop_per_face_model, real_photo_boxes, smiling_real_faces


def _canvas_with_faces(boxes, labels):
    canvas = np.full((200, 300), 90, np.uint8)
    for (x, y, w, h), label in zip(boxes, labels):
        canvas[y : y + h, x : x + w] = pattern_face(label, np.random.default_rng(label), size=w)
    return np.stack([canvas] * 3, axis=-1)


def test_a_detector_callable_drives_the_crops(trained_run):
    boxes = [(10, 20, 48, 48), (200, 100, 60, 60)]
    picture = _canvas_with_faces(boxes, [5, 3])

    def detector(rgb):
        return [Detection(b, 0.9, [(b[0], b[1])]) for b in boxes]

    faces = analyze(picture, model=trained_run, detector=detector)
    assert [f.box for f in faces] == [boxes[1], boxes[0]]  # largest first
    assert all(f.detector_score == 0.9 and f.landmarks for f in faces)
    assert faces[0].to_dict()["detector_score"] == 0.9


def test_a_photo_without_faces_gives_an_empty_list(trained_run):
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    assert analyze(noise, model=trained_run) == []


def test_a_bad_image_in_a_stream_is_reported_and_the_rest_goes_on(trained_run, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(pattern_face(2, np.random.default_rng(0))).save(good)
    (tmp_path / "bad.jpg").write_text("not an image")
    results = list(analyze_images([good, tmp_path / "bad.jpg", good], model=trained_run, detector="none"))
    assert [r.ok for r in results] == [True, False, True]
    assert "not an image" in results[1].error and results[1].faces == []
    assert results[1].image_size is None and results[1].to_dict()["image_size"] is None  # never decoded: no size
    assert results[0].faces[0].probabilities == results[2].faces[0].probabilities
    with pytest.raises(FerkitError):
        analyze(tmp_path / "bad.jpg", model=trained_run)


def test_an_image_files_bytes_or_file_object_give_the_answers_of_its_path(trained_run, tmp_path):
    import io

    photo = tmp_path / "face.png"
    Image.fromarray(pattern_face(4, np.random.default_rng(4))).save(photo)
    from_path = analyze(photo, model=trained_run, detector="none")
    for given in (photo.read_bytes(), io.BytesIO(photo.read_bytes()), open(photo, "rb")):
        assert [f.probabilities for f in analyze(given, model=trained_run, detector="none")] == [
            f.probabilities for f in from_path]
    results = list(analyze_images([photo, b"not an image", None, Image.open(photo), photo], model=trained_run,
                                  detector="none"))
    assert [r.ok for r in results] == [True, False, False, True, True]  # bad items reported, the stream goes on
    assert [r.source for r in results[1:4]] == ["<bytes>", "<NoneType>", "<image>"]
    assert "<bytes> is not an image" in results[1].error and "not NoneType" in results[2].error
    with pytest.raises(FerkitError, match="from a PIL image, not a file: pass the image"):
        results[3].draw()
    for wrong in (5, None):
        with pytest.raises(FerkitError, match="an image is a path, a PIL image, an array or an image file's bytes"):
            analyze(wrong, model=trained_run)


def test_one_image_or_one_box_where_a_list_belongs_is_refused_in_one_line(trained_run):
    picture = _canvas_with_faces([(10, 10, 48, 48)], [3])
    for one in (picture, Image.fromarray(picture)):
        with pytest.raises(FerkitError, match="takes a list of images"):
            list(analyze_images(one, model=trained_run))
    with pytest.raises(FerkitError, match=r"for one box give \[\(10, 10, 48, 48\)\]"):
        analyze(picture, model=trained_run, boxes=(10, 10, 48, 48))


def test_an_empty_or_closed_pil_image_and_a_threshold_that_is_no_number_are_one_line_errors(trained_run):
    closed = Image.fromarray(_canvas_with_faces([(10, 10, 48, 48)], [3]))
    closed.close()
    for image, message in ((Image.new("RGB", (0, 0)), "needs at least one pixel"), (closed, "cannot be read")):
        with pytest.raises(FerkitError, match=message):
            analyze(image, model=trained_run)
    with pytest.raises(FerkitError, match="must be a number at least 0 and below 1, not '0.5'"):
        analyze(_canvas_with_faces([(10, 10, 48, 48)], [3]), model=trained_run, uncertain_below="0.5")


def test_batching_does_not_change_the_results(trained_run):
    images = [_canvas_with_faces([(10, 10, 48, 48), (120, 60, 48, 48)], [i % 7, (i + 3) % 7]) for i in range(9)]
    boxes = [(10, 10, 48, 48), (120, 60, 48, 48)]
    one = [r.faces for r in analyze_images(images, model=trained_run, boxes=boxes, batch_faces=1)]
    many = [r.faces for r in analyze_images(images, model=trained_run, boxes=boxes, batch_faces=64)]
    for a, b in zip(one, many):
        assert [f.emotion for f in a] == [f.emotion for f in b]
        assert np.allclose([list(f.probabilities.values()) for f in a], [list(f.probabilities.values()) for f in b], atol=1e-6)


def test_results_of_slow_photos_come_within_about_a_second_not_a_batch_later(trained_run):
    """Large photos take long to search: their results come as they wait about RESULTS_WITHIN_S, not once 32
    of them have gathered (a folder's progress bar stood still for a minute)."""
    import time

    from ferkit.predict import RESULTS_WITHIN_S

    def slow_detector(rgb):  # a detector that takes 0.25 s a photo, as YuNet's second looks can
        time.sleep(0.25)
        return [(10, 10, 48, 48)]

    taken = []

    def photos():
        for i in range(40):
            taken.append(i)
            yield _canvas_with_faces([(10, 10, 48, 48)], [i % 7])

    results = analyze_images(photos(), model=trained_run, detector=slow_detector)
    first = next(results)
    assert first.ok and len(taken) <= RESULTS_WITHIN_S / 0.25 + 2
    assert sum(1 for _ in results) == 39


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "I;16", "L"])
def test_any_image_mode_goes_through_detection(trained_run, tmp_path, mode):
    image = Image.fromarray(_canvas_with_faces([(10, 10, 48, 48)], [1]))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257)
    else:
        image = image.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    [result] = analyze_images([path], model=trained_run, detector="auto")
    assert result.ok and result.image_size == (300, 200)


def test_real_photos_give_one_result_per_annotated_face(trained_run):
    for photo, truth in real_photo_boxes().items():
        faces = analyze(photo, model=trained_run)
        assert len(faces) == len(truth), photo.name
        for face in faces:
            assert abs(sum(face.probabilities.values()) - 1) < 1e-4 and len(face.landmarks) == 5


def test_broad_smiles_cut_by_the_border_are_happy_with_the_bundled_model():
    for photo in smiling_real_faces():
        [face] = analyze(photo)
        assert face.emotion == "happy" and face.score > 0.6, (photo.name, face.probabilities)


def test_detected_boxes_given_back_reproduce_the_answers():
    """The same box gives the same answer whether the detector found it or the user gave it."""
    photo = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"
    detected = analyze(photo)
    assert detected
    given = analyze(photo, boxes=[face.box for face in detected])
    assert [f.box for f in given] == [f.box for f in detected]
    for a, b in zip(detected, given):
        assert max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities) <= 0.01


def test_a_face_photo_without_detection_is_framed_as_its_whole_box_would_be(tmp_path):
    """detector="none" makes a non-square face photo square as a given box is framed, never stretched,
    and classifies it in one view: it is framed already, like the faces a model is trained and evaluated on."""
    photo = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"
    x, y, w, h = analyze(photo)[0].box
    face = Image.open(photo).crop((x, y, x + w, y + h))
    assert w != h
    [whole] = analyze(face, detector="none")
    [boxed] = analyze(face, boxes=[(0, 0, w, h)], model=one_crop_per_face_model(tmp_path))
    assert whole.probabilities == boxed.probabilities


@pytest.mark.parametrize("box", [(0, 0, 0, 0), (10, 10, -5, 20), (400, 10, 20, 20), (-50, -50, 40, 40), ("a", 1, 2, 3)])
def test_empty_or_outside_boxes_are_refused(trained_run, box):
    picture = _canvas_with_faces([(10, 20, 48, 48)], [2])  # 300x200
    with pytest.raises(FerkitError, match="box"):
        analyze(picture, model=trained_run, boxes=[box])


def test_boxes_with_a_detector_named_are_refused_as_one_would_go_unused(trained_run):
    picture = _canvas_with_faces([(10, 20, 48, 48)], [2])
    for detector in ("yunet", "mtcnn"):
        with pytest.raises(FerkitError, match=f"give boxes or detector='{detector}'"):
            analyze(picture, model=trained_run, detector=detector, boxes=[(10, 20, 48, 48)])
    # "none", no detection, agrees with boxes
    [face] = analyze(picture, model=trained_run, detector="none", boxes=[(10, 20, 48, 48)])
    assert face.box == (10, 20, 48, 48)


def test_a_box_partly_outside_is_padded_not_refused_and_one_mostly_outside_is_warned_of(trained_run, caplog):
    picture = _canvas_with_faces([(10, 20, 48, 48)], [2])  # 300x200
    with caplog.at_level("WARNING", logger="ferkit"):
        [face] = analyze(picture, model=trained_run, boxes=[(260, 160, 48, 48)])  # 40x40 of 48x48 inside
    assert face.box == (260, 160, 48, 48) and face.emotion and not caplog.text
    with caplog.at_level("WARNING", logger="ferkit"):
        [face] = analyze(picture, model=trained_run, boxes=[(280, 180, 48, 48)])
    assert face.box == (280, 180, 48, 48) and face.emotion
    assert "the box (280, 180, 48, 48) lies mostly outside the 300x200 image (17% inside)" in caplog.text


def test_the_crop_is_the_square_around_the_box_with_the_models_margin(trained_run):
    from ferkit.faces import face_crop

    picture = Image.fromarray(np.arange(100 * 120, dtype=np.uint32).reshape(100, 120).astype(np.int32), "I")
    crop = np.asarray(face_crop(picture, (30, 20, 20, 40)))  # a tall box becomes the square around it
    assert crop.shape == (40, 40) and np.array_equal(crop, np.asarray(picture)[20:60, 20:60])
    wider = np.asarray(face_crop(picture, (30, 20, 20, 40), margin=0.25))
    assert np.array_equal(wider, np.asarray(picture)[10:70, 10:70])


def test_level_eyes_turns_a_tilted_face_upright():
    from ferkit.faces import face_crop

    image = Image.new("L", (200, 200), 0)
    bar = Image.new("L", (80, 6), 255)  # a bright horizontal bar through the "eyes"
    image.paste(bar, (60, 97))
    tilted = image.rotate(20, resample=Image.Resampling.BILINEAR, center=(100, 100))
    # the eyes, at the bar's ends, turned with it
    angle = np.radians(20)
    eyes = [(100 + dx * np.cos(angle), 100 - dx * np.sin(angle)) for dx in (-35, 35)]
    level = np.asarray(face_crop(tilted, (60, 60, 80, 80), landmarks=eyes), float)
    rows = level.mean(axis=1)
    assert rows.max() > 150  # the bar is one bright horizontal band again
    assert np.asarray(face_crop(tilted, (60, 60, 80, 80)), float).mean(axis=1).max() < 100


def test_the_cli_refuses_a_box_outside_the_photo_in_one_line(tmp_path):
    from click.testing import CliRunner

    from ferkit.cli import cli

    photo = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"
    result = CliRunner().invoke(cli, ["predict", str(photo), "--box", "5000,10,40,40", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "outside" in result.output and "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_detector_failure_is_reported_for_that_image_and_the_rest_goes_on(trained_run):
    good = _canvas_with_faces([(10, 20, 48, 48)], [4])
    bad = np.zeros((120, 90, 3), np.uint8)  # the detector below breaks on this one

    def fragile(rgb):
        if rgb.shape[:2] == (120, 90):
            raise RuntimeError("model blew up\nsecond line")
        return [Detection((10, 20, 48, 48), 0.9)]

    results = list(analyze_images([("a", good), ("b", bad), ("c", good)], model=trained_run, detector=fragile))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error == "face detection failed on b: RuntimeError: model blew up"
    assert len(results[0].faces) == len(results[2].faces) == 1


def test_bgr_arrays_give_the_answers_of_the_same_photo_in_rgb():
    photo = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # what cv2.imread gives
    expected = analyze(rgb)
    got = analyze(bgr, channels="bgr")
    assert [f.box for f in got] == [f.box for f in expected]
    assert all(a.probabilities == b.probabilities for a, b in zip(got, expected))
    with pytest.raises(FerkitError, match="channels"):
        analyze(rgb, channels="rbg")


def test_a_very_large_jpeg_decoded_smaller_still_reports_the_photos_own_pixels(tmp_path, monkeypatch):
    from ferkit import images
    from ferkit.faces import box_iou

    photo = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"  # 920x360
    full = next(analyze_images([photo]))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100_000)  # so it decodes at half size, 460x180
    assert images.load_image(photo).size == (460, 180)
    half = next(analyze_images([photo]))
    assert half.ok and half.image_size == full.image_size == (920, 360)
    assert len(half.faces) == len(full.faces) == 3
    for a, b in zip(half.faces, full.faces):
        assert box_iou(a.box, b.box) > 0.7, (a.box, b.box)
        assert all(abs(pa - pb) <= 8 for (pa, pb) in zip(np.ravel(a.landmarks), np.ravel(b.landmarks)))
    given = next(analyze_images([photo], boxes=[f.box for f in full.faces]))
    assert [f.box for f in given.faces] == [f.box for f in full.faces]
    assert [f.emotion for f in given.faces] == [f.emotion for f in full.faces]
    drawn = np.asarray(half.draw(), int)  # boxes drawn where the faces are in the smaller picture
    x, y, w, h = (round(v / 2) for v in half.faces[0].box)
    plain = np.asarray(images.load_image(photo).convert("RGB"), int)
    assert np.abs(drawn[y, x + 2 : x + w - 2] - plain[y, x + 2 : x + w - 2]).mean() > 40
    assert np.array_equal(drawn[y + h // 2, x + 5 : x + w - 5], plain[y + h // 2, x + 5 : x + w - 5])


def test_a_box_outside_one_image_of_a_stream_fails_that_image_only(trained_run):
    big = _canvas_with_faces([(10, 20, 48, 48)], [2])  # 300x200
    small = np.zeros((30, 30, 3), np.uint8)
    results = list(analyze_images([("a", big), ("b", small), ("c", big)], model=trained_run, boxes=[(100, 50, 60, 60)]))
    assert [r.ok for r in results] == [True, False, True]
    assert "outside the 30x30 image" in results[1].error
    assert results[0].faces[0].probabilities == pytest.approx(results[2].faces[0].probabilities, abs=1e-5)


def test_a_detector_may_return_bare_boxes_and_given_boxes_keep_their_order(trained_run):
    boxes = [(10, 20, 48, 48), (200, 100, 60, 60)]
    picture = _canvas_with_faces(boxes, [5, 3])
    faces = analyze(picture, model=trained_run, detector=lambda rgb: [np.array(b) for b in boxes])
    assert [f.box for f in faces] == [boxes[1], boxes[0]]  # detected: largest first
    assert all(f.detector_score is None for f in faces)
    with pytest.raises(FerkitError, match="result.draw"):
        next(analyze_images([picture], model=trained_run, boxes=boxes)).draw()
    assert next(analyze_images([picture], model=trained_run, boxes=boxes)).draw(picture).size == (300, 200)
    people = str(Path(__file__).resolve().parents[1] / "examples" / "people.jpg")  # a label naming another file
    for image in (picture, Image.fromarray(picture)):
        with pytest.raises(FerkitError, match="not a file: pass the image"):
            next(analyze_images([(people, image)], model=trained_run, boxes=boxes)).draw()
    assert [f.box for f in analyze(picture, model=trained_run, boxes=boxes)] == boxes  # given: as given
    results = list(analyze_images([picture], model=trained_run, detector=lambda rgb: ["face"]))
    assert "must return Detections or (x, y, width, height) boxes" in results[0].error


@pytest.mark.parametrize("size", [(5000, 2), (2, 5000)])
def test_long_thin_images_are_searched_for_faces_without_failing(size):
    result = next(analyze_images([np.full((size[1], size[0], 3), 128, np.uint8)]))
    assert result.ok and result.faces == []


def _people_saved_as(path: Path) -> Path:
    Image.open(Path(__file__).resolve().parents[1] / "examples" / "people.jpg").save(path, quality=95)
    return path


@pytest.mark.parametrize("suffix", [".heic", ".avif"])
def test_heic_and_avif_photos_give_the_faces_and_emotions_of_the_jpeg(tmp_path, suffix):
    from PIL import features

    from ferkit.images import enable_heif

    if suffix == ".heic" and not enable_heif():
        pytest.skip("ferkit[heic] (pillow-heif) is not installed")
    if suffix == ".avif" and not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec (Pillow 11.3 or later has)")
    photo = _people_saved_as(tmp_path / f"people{suffix}")
    jpeg = next(analyze_images([Path(__file__).resolve().parents[1] / "examples" / "people.jpg"]))
    got = next(analyze_images([photo]))
    assert got.ok and got.image_size == jpeg.image_size == (920, 360)
    assert [f.emotion for f in got.faces] == [f.emotion for f in jpeg.faces]
    for a, b in zip(got.faces, jpeg.faces):
        assert max(abs(u - v) for u, v in zip(a.box, b.box)) <= 3, (a.box, b.box)


def test_a_folder_or_glob_given_as_one_path_is_listed(trained_run, tmp_path):
    for name in ("b.png", "a.png", "notes.txt"):
        if name.endswith(".png"):
            Image.fromarray(pattern_face(1, np.random.default_rng(1))).save(tmp_path / name)
        else:
            (tmp_path / name).write_text("not a photo")
    listed = [r.source for r in analyze_images(tmp_path, model=trained_run, detector="none")]
    assert listed == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert [r.source for r in analyze_images(str(tmp_path / "b*"), model=trained_run, detector="none")] == listed[1:]


def test_a_custom_detectors_empty_or_stray_boxes_are_left_out(trained_run):
    picture = _canvas_with_faces([(10, 20, 48, 48)], [5])
    stray = [(10, 20, 48, 48), (0, 0, 0, 0), (5000, 5000, 10, 10), (-50, -50, 20, 20)]
    assert [f.box for f in analyze(picture, model=trained_run, detector=lambda rgb: stray)] == [(10, 20, 48, 48)]


def test_a_custom_detectors_numpy_or_fractional_detections_give_whole_pixels_and_plain_json(trained_run):
    import json

    from ferkit.faces import Detection

    picture = _canvas_with_faces([(10, 20, 48, 48)], [5])
    found = [Detection(np.array([10.4, 19.6, 48, 48]), np.float32(0.9), [(np.int64(20), 30.6)])]
    [face] = analyze(picture, model=trained_run, detector=lambda rgb: found)
    assert face.box == (10, 20, 48, 48) and face.landmarks == [(20, 31)]
    assert json.loads(json.dumps(face.to_dict()))["box"] == [10, 20, 48, 48]


def test_labels_stay_inside_the_picture_and_clear_of_each_other():
    from ferkit.draw import _label_place

    size = (90, 20)
    # a box as large as the picture (a face crop, --detector none): the label goes inside it
    assert _label_place((0, 0, 200, 200), size, (200, 200), [], [], 2) == (0, 0)
    # at the right edge: moved left until it is whole
    assert _label_place((170, 50, 30, 30), size, (200, 200), [], [], 2)[0] == 200 - 90
    # neighbours side by side: the second label does not cover the first
    first = _label_place((10, 60, 60, 60), size, (300, 200), [], [(60, 60, 60, 60)], 2)
    placed = [(first[0], first[1], first[0] + 90, first[1] + 20)]
    second = _label_place((60, 60, 60, 60), size, (300, 200), placed, [(10, 60, 60, 60)], 2)
    assert second[0] + 90 <= placed[0][0] or second[0] >= placed[0][2] or second[1] + 20 <= placed[0][1] or second[1] >= placed[0][3]


def test_a_tiny_face_crop_is_drawn_enlarged_with_its_label_inside(trained_run):
    from ferkit import draw_faces
    from ferkit.draw import TINY_SIDE, colour_of

    crop = np.full((48, 48, 3), 90, np.uint8)
    [face] = analyze(crop, model=trained_run, detector="none")
    drawn = np.asarray(draw_faces(crop, [face]))
    assert drawn.shape[:2] == (TINY_SIDE, TINY_SIDE)
    label = np.all(drawn == colour_of(face.emotion), axis=2)
    assert label[4:14, 4:60].mean() > 0.4  # the label's fill, inside the picture's top left corner, not its edge only


def test_a_box_is_drawn_on_its_own_pixels_and_no_further():
    from ferkit import draw_faces

    drawn = np.asarray(draw_faces(np.zeros((360, 640, 3), np.uint8), [(100, 100, 50, 50)], enlarge_tiny=False))
    lit = np.flatnonzero(drawn[125].any(axis=1))  # a row through the box's middle, below its label
    assert lit.min() == 100 and lit.max() == 149


def test_a_result_of_an_opencv_frame_is_drawn_in_its_own_colours(trained_run):
    from ferkit import analyze_images

    bgr = np.zeros((120, 160, 3), np.uint8)
    bgr[..., 0] = 200  # blue, in OpenCV's order
    result = next(analyze_images([bgr], model=trained_run, detector="none", channels="bgr"))
    assert tuple(np.asarray(result.draw(bgr))[60, 80]) == (0, 0, 200)  # as analyze_images was told
    assert tuple(np.asarray(result.draw(bgr[..., ::-1], channels="rgb"))[60, 80]) == (0, 0, 200)


@pytest.mark.parametrize("size", [(6000, 300), (300, 3000)])
def test_a_panoramas_labels_and_lines_leave_its_faces_visible(size):
    from ferkit import draw_faces
    from ferkit.results import Face

    width, height = size
    picture = np.full((height, width, 3), 90, np.uint8)
    box = (120, 120, 90, 110)
    face = Face(box, "happy", 0.9, {"happy": 0.9})
    drawn = np.asarray(draw_faces(picture, [face]))
    x, y, w, h = box
    inside = drawn[y + 8 : y + h - 8, x + 8 : x + w - 8]
    assert (inside == 90).all(axis=2).mean() > 0.8  # the face is not hidden under its own label or outline


def test_the_small_faces_of_a_large_group_photo_stay_visible_under_their_outlines_and_labels():
    from ferkit import draw_faces
    from ferkit.results import Face

    picture = np.full((1500, 2000, 3), 90, np.uint8)
    boxes = [(left, top, 30, 30) for top in range(40, 1450, 60) for left in range(15, 1970, 60)]  # 30 px apart
    drawn = np.asarray(draw_faces(picture, [Face(box, "happy", 0.9, {"happy": 0.9}) for box in boxes]))
    for left, top, w, h in boxes:  # the middle third of each face, untouched
        assert (drawn[top + h // 3: top + 2 * h // 3, left + w // 3: left + 2 * w // 3] == 90).all(), (left, top)


def test_a_videos_labels_keep_their_style_from_frame_to_frame_where_each_frame_alone_would_flicker():
    """Sixteen faces on the edge of crowded, moving a few pixels from frame to frame: drawn frame by frame,
    the labels switch between whole labels and numbers alone; held (as a video's are), they do not."""
    from ferkit.draw import COLOURS, SteadyLabels, draw_faces
    from ferkit.results import Face

    def label_areas(steady):
        rng, areas = np.random.default_rng(0), []
        for _ in range(30):
            jitter = rng.integers(-3, 4, size=(16, 4))
            boxes = [(40 + k * 162 + dx, 60 + row * 202 + dy, 88 + dw, 120 + dh)
                     for (row, k), (dx, dy, dw, dh) in zip([(r, k) for r in range(2) for k in range(8)], jitter)]
            frame = draw_faces(Image.new("RGB", (1280, 720), (90, 90, 90)),
                               [Face(box, "happy", 0.93, {"happy": 0.93}) for box in boxes], enlarge_tiny=False, steady=steady)
            areas.append(int((np.asarray(frame) == COLOURS["happy"]).all(axis=2).sum()))  # outlines and label fills
        return areas

    def switches(areas):
        return sum(abs(now - before) > 0.2 * before for before, now in zip(areas, areas[1:]))

    assert switches(label_areas(None)) >= 4
    assert switches(label_areas(SteadyLabels())) <= 1


def test_a_pil_photo_is_drawn_upright_as_analyze_saw_it(tmp_path):
    from ferkit import draw_faces

    photo = tmp_path / "sideways.jpg"
    image = Image.new("RGB", (400, 300), (90, 90, 90))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the upright photo is 300 x 400
    image.save(photo, exif=exif.tobytes())
    boxes = [(10, 350, 40, 40)]  # only inside the upright photo
    assert draw_faces(Image.open(photo), boxes).size == (300, 400) == draw_faces(photo, boxes).size
    assert draw_faces(Image.open(photo), boxes).tobytes() == draw_faces(photo, boxes).tobytes()


def test_misgiven_arguments_get_a_one_line_reason(tmp_path):
    with pytest.raises(FerkitError, match="a list of images"):
        list(analyze_images(None))
    with pytest.raises(FerkitError, match="not text"):
        analyze(np.zeros((64, 64, 3), np.uint8), boxes="1,2,3,4")
    for sizes in ({"batch_faces": 0}, {"batch_images": -1}, {"batch_faces": 2.5}):
        with pytest.raises(FerkitError, match="is a whole number of at least 1"):
            list(analyze_images([np.zeros((64, 64, 3), np.uint8)], **sizes))
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with pytest.raises(FerkitError, match="not an image ferkit can read .a video: ferkit.video.analyze_video"):
        analyze(video)


def test_a_url_is_refused_in_one_line_that_keeps_it_whole():
    with pytest.raises(FerkitError, match="^http://example.com/a.jpg: URLs are not fetched"):
        analyze("http://example.com/a.jpg")


def test_faces_are_drawn_on_arrays_and_plain_boxes_too(trained_run):
    from ferkit import draw_faces

    boxes = [(10, 20, 48, 48), (200, 100, 60, 60)]
    picture = _canvas_with_faces(boxes, [5, 3])
    faces = analyze(picture, model=trained_run, boxes=boxes)
    drawn = draw_faces(picture, faces)
    assert drawn.size == (300, 200) and drawn.tobytes() == draw_faces(Image.fromarray(picture), faces).tobytes()
    plain = np.asarray(draw_faces(picture[:, :, ::-1], boxes, channels="bgr"))
    assert plain.shape == picture.shape and not np.array_equal(plain, picture)
    assert np.array_equal(plain[150:, 100:180], picture[150:, 100:180])  # nothing drawn away from the boxes
    with pytest.raises(FerkitError, match="outside"):
        draw_faces(picture, [(400, 0, 10, 10)])


def test_test_time_augmentation_is_chosen_per_call():
    from ferkit.runtime import load_classifier

    photo = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"
    default = load_classifier()
    other = "none" if default.tta != "none" else "flip"
    chosen = analyze(photo, tta=other)
    assert chosen == analyze(photo, model=default.with_tta(other))
    assert [f.probabilities for f in chosen] != [f.probabilities for f in analyze(photo)]
    assert analyze(photo, tta=None) == analyze(photo)
    with pytest.raises(FerkitError, match="test-time augmentation"):
        analyze(photo, tta="ten-crop")


def test_a_face_from_a_photo_is_the_mean_of_its_crops_at_the_models_margins(tmp_path):
    """A face cut from a photo is classified at face_margin and at each of the model's extra margins, and
    the probabilities averaged; a model that records no extra margins classifies the one crop."""
    from ferkit.faces import face_crop
    from ferkit.images import to_model_input
    from ferkit.runtime import load_classifier

    photo = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"
    box = analyze(photo)[0].box
    classifier = load_classifier(None)
    margins = [classifier.metadata.face_margin + m for m in (0.0, *classifier.metadata.extra_margins)]
    assert len(margins) > 1
    picture = Image.open(photo).convert("RGB")
    crops = np.stack([to_model_input(face_crop(picture, box, margin=m), classifier.input_size) for m in margins])
    each = classifier.predict_proba(crops)
    [face] = analyze(photo, boxes=[box])
    assert np.allclose([face.probabilities[c] for c in classifier.classes], each.mean(axis=0), atol=1e-6)

    [single] = analyze(photo, boxes=[box], model=one_crop_per_face_model(tmp_path))
    assert np.allclose([single.probabilities[c] for c in classifier.classes], each[0], atol=1e-6)
    assert not np.allclose(each[0], each.mean(axis=0), atol=1e-3)  # the views differ, so the test can tell


def test_bad_arguments_of_the_python_api_are_one_line_errors(tmp_path):
    import ferkit

    photo = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"
    cases = [
        (lambda: analyze(photo, boxes=[(float("inf"), 2, 30, 40)]), "a box is four numbers"),
        (lambda: analyze(photo, model=3), "not an object of type int"),
        (lambda: analyze(photo, model=b"default"), "not an object of type bytes"),
        (lambda: analyze(photo, model=ferkit.create_model("seed-cnn")), "not an object of type Sequential"),
        (lambda: list(analyze_images([("a", photo, "x")])), "not a 3-tuple"),
        (lambda: ferkit.draw_faces(photo, analyze(photo)[0]), r"draw_faces\(image, \[face\]\)"),
        (lambda: ferkit.evaluate(None, np.zeros((3, 48, 48), np.uint8)), "not a ndarray"),
        (lambda: analyze(bytes(photo)), "is a file's name: give the name as a str"),
        (lambda: ferkit.create_model("seed-cnn", num_classes=0), "num_classes is a whole number"),
        (lambda: ferkit.create_model("ferkit-net-l", input_size=(32, 32)), "classifies 40x40 crops"),
        (lambda: ferkit.create_model("seed-cnn", input_size=(4, 4)), "cannot be built for 4x4 faces"),
    ]
    for call, said in cases:
        with pytest.raises(FerkitError, match=said):
            call()
    boxes = [(600, 0, 320, 360)]
    assert analyze(photo, boxes=(box for box in boxes))[0].box == analyze(photo, boxes=boxes)[0].box  # a generator
    faces = analyze(photo)
    assert [face.box for face in analyze(photo, boxes=faces)] == [face.box for face in faces]  # Faces give their boxes


def test_a_pil_image_of_values_outside_0_255_is_refused_as_the_same_array_is():
    photo = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"
    gray = np.asarray(Image.open(photo).convert("L"), np.float32)
    with pytest.raises(FerkitError, match="holds -1 to 1"):
        analyze(Image.fromarray(gray / 127.5 - 1))
    assert len(analyze(Image.fromarray(gray / 255))) == len(analyze(gray / 255)) == 3


def test_first_analyses_in_several_threads_at_once_never_hang(tmp_path):
    """yuface's first call in a process imports NumPy's C API; several threads making theirs at once
    deadlocked. Each try is a fresh process, which is where it happens."""
    import subprocess
    import sys

    if get_detector("auto").name != "yunet":
        pytest.skip("the yunet detector is not installed")
    photo = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"
    script = ("import ferkit; from concurrent.futures import ThreadPoolExecutor\n"
              f"with ThreadPoolExecutor(4) as pool: print(list(pool.map(lambda _: len(ferkit.analyze({str(photo)!r})), range(4))))")
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "[3, 3, 3, 3]", done.stderr


def test_a_detectors_own_error_keeps_its_traceback(trained_run):
    import traceback

    def detector_with_a_bug(rgb):
        return {}["landmarks"]

    with pytest.raises(FerkitError, match="face detection failed on .*KeyError") as raised:
        analyze(np.zeros((64, 64, 3), np.uint8), model=trained_run, detector=detector_with_a_bug)
    assert isinstance(raised.value.__cause__, KeyError)
    assert "detector_with_a_bug" in "".join(traceback.format_exception(raised.value))


def test_a_lone_face_keeps_its_whole_label_wherever_it_must_go():
    from ferkit import draw_faces
    from ferkit.draw import colour_of
    from ferkit.results import Face

    for gap in range(10, 40, 2):  # a face from the top to near the bottom: the label goes inside the box
        picture = np.full((640, 480, 3), 90, np.uint8)
        face = Face((200, 2, 60, 640 - 2 - gap), "happy", 0.9, {"happy": 0.9})
        label = np.all(np.asarray(draw_faces(picture, [face])) == colour_of("happy"), axis=2)
        assert label.sum(axis=1).max() > 75, gap  # a label as wide as "1 happy 90%", not "1" (the box: 60 px)


@pytest.mark.parametrize("emotion", ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"])
def test_every_emotions_label_is_written_in_the_colour_that_contrasts_most_with_it(emotion):
    """WCAG 2's contrast ratio of the label's text on its colour: white on angry's orange and disgust's
    green was under 4:1, black there is over 5:1."""
    from ferkit.draw import colour_of, draw_faces
    from ferkit.results import Face

    def luminance(rgb):
        linear = [c / 255 / 12.92 if c / 255 <= 0.03928 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    def contrast(a, b):
        light, dark = sorted((luminance(a), luminance(b)), reverse=True)
        return (light + 0.05) / (dark + 0.05)

    background = colour_of(emotion)
    face = Face(box=(100, 100, 120, 120), emotion=emotion, score=0.9, probabilities={emotion: 0.9})
    drawn = np.asarray(draw_faces(Image.new("RGB", (400, 400), (128, 128, 128)), [face])).reshape(-1, 3)
    letters = np.abs(drawn.astype(int) - background).max(axis=1) > 60  # neither the label's colour nor near it
    dark, light = (letters & (drawn.max(axis=1) <= 60)).sum(), (letters & (drawn.min(axis=1) >= 200)).sum()
    assert (dark == 0) != (light == 0), (dark, light)  # one colour for the letters, black or white
    text = (0, 0, 0) if dark else (255, 255, 255)
    assert contrast(background, text) == max(contrast(background, (0, 0, 0)), contrast(background, (255, 255, 255))) > 4.5
