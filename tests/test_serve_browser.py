"""`ferkit serve`'s page in a real browser: Debian's Chromium, driven by Playwright (never `playwright
install`: it downloads browsers). Skips where Chromium or Playwright is missing; CI installs both."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="ferkit[serve] is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")

from ferkit.faces import YuNetDetector  # noqa: E402
from ferkit.predict import analyze_images  # noqa: E402
from test_serve import PEOPLE, server  # noqa: E402,F401 - the running `ferkit serve`


def _screenshot_tool():
    """tools/serve_screenshots.py, whose fake camera (write_y4m) the browser plays here too."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "serve_screenshots.py"
    spec = importlib.util.spec_from_file_location("serve_screenshots", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_y4m = _screenshot_tool().write_y4m

CHROMIUM = os.environ.get("FERKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="Chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    camera = write_y4m(PEOPLE, tmp_path_factory.mktemp("camera") / "people.y4m")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                  f"--use-file-for-fake-video-capture={camera}"],
        )
        yield browser
        browser.close()


def _emotions(page, selector: str) -> list[str]:
    return page.locator(selector).evaluate_all("items => items.map(item => item.dataset.emotion)")


def test_a_photo_shows_its_faces_with_their_emotions(browser, server, tmp_path):  # noqa: F811
    page = browser.new_page(viewport={"width": 1200, "height": 900}, device_scale_factor=2)
    page.goto(server)
    page.set_input_files("#photo-input", str(PEOPLE))
    page.wait_for_selector("#faces .face", timeout=30_000)
    # as many canvas pixels as the screen shows: twice the displayed width on a screen of two pixels a point
    assert page.evaluate("() => { const c = document.getElementById('photo-canvas');"
                         " return c.width / c.getBoundingClientRect().width; }") == pytest.approx(2, abs=0.01)
    [expected] = analyze_images([PEOPLE])
    assert _emotions(page, "#faces .face") == [face.emotion for face in expected.faces]
    assert page.locator("#faces .face .bar").count() == 3 * 7  # seven probabilities per face
    # the bars are drawn to scale: the top emotion's is the widest of its face, and visibly wide
    widths = page.locator("#faces .face").first.locator(".fill").evaluate_all(
        "fills => fills.map(fill => fill.getBoundingClientRect().width)")
    top = list(expected.faces[0].probabilities).index(expected.faces[0].emotion)
    assert widths[top] == max(widths) and widths[top] > 40 * expected.faces[0].score
    assert "3 faces" in page.text_content("#status")
    # the answer, to keep, as `ferkit predict` names it
    assert page.get_attribute("#photo-json", "download") == "people.faces.json"
    kept = page.evaluate("async () => JSON.parse(await (await fetch(document.getElementById('photo-json').href)).text())")
    assert kept["source"] == "people.jpg" and [f["emotion"] for f in kept["faces"]] == [f.emotion for f in expected.faces]
    # the annotated photo is drawn: the canvas is no longer blank
    painted = page.evaluate("""() => { const c = document.getElementById('photo-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] + d[i + 1] + d[i + 2] > 0; return n / (d.length / 4); }""")
    assert painted > 0.5
    page.screenshot(path=str(tmp_path / "photo.png"), full_page=True)
    assert (tmp_path / "photo.png").read_bytes()[:4] == b"\x89PNG"

    # what the server says about a file that is no image, and nothing of the photo before it
    (tmp_path / "notes.jpg").write_text("not a photo")
    page.set_input_files("#photo-input", str(tmp_path / "notes.jpg"))
    page.wait_for_selector("#status.error", timeout=30_000)
    assert "not an image ferkit can decode" in page.text_content("#status")
    assert page.locator("#faces .face").count() == 0 and page.locator("#photo-canvas").is_hidden()
    assert page.locator("#photo-json").is_hidden()
    assert page.eval_on_selector("#photo-input", "input => input.value") == ""  # the same file again is a change
    # a TIFF, which Chromium cannot show: its faces are still listed
    Image.open(PEOPLE).save(tmp_path / "people.tif")
    page.set_input_files("#photo-input", str(tmp_path / "people.tif"))
    page.wait_for_selector("#faces .face", timeout=30_000)
    assert page.locator("#faces .face").count() == 3 and "3 faces" in page.text_content("#status")
    # a video given to the Photo tab is pointed to the Video tab, not sent as a photo
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    page.set_input_files("#photo-input", str(tmp_path / "clip.mp4"))
    page.wait_for_selector("#status.error", timeout=30_000)
    assert page.text_content("#status") == "clip.mp4 is a video: the Video tab analyses videos"
    page.close()


def test_the_tabs_are_tabs_to_a_screen_reader_and_the_arrow_keys(browser, server):  # noqa: F811
    page = browser.new_page()
    page.goto(server)
    tabs = page.get_by_role("tab")
    assert tabs.count() == 3 and page.get_by_role("tabpanel").count() == 1  # the hidden two are not shown
    page.get_by_role("tab", name="Photo").focus()
    page.keyboard.press("ArrowRight")
    assert page.get_by_role("tab", selected=True).text_content() == "Webcam"
    assert page.evaluate("() => document.activeElement.id") == "tab-webcam"
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert page.get_by_role("tab", selected=True).text_content() == "Video" and page.locator("#video").is_visible()
    page.close()


def test_the_webcam_mode_draws_faces_and_emotions_live(browser, server):  # noqa: F811
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(server)
    page.click("button[data-tab=webcam]")
    page.click("#webcam-start")
    page.wait_for_selector("#webcam-faces .face", timeout=60_000)
    emotions = _emotions(page, "#webcam-faces .face")
    assert emotions and all(emotion in expected_classes() for emotion in emotions)
    page.click("#webcam-stop")
    assert page.locator("#webcam-faces .face").count() == 0 and page.text_content("#status") == "Webcam off"
    page.close()


def test_the_webcam_waits_between_frames_the_server_does_not_answer_and_says_so(browser, server):  # noqa: F811
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    tried = []
    page.route("**/v1/analyze", lambda route: (tried.append(1), route.abort()))  # as when the server is gone
    page.goto(server)
    page.click("button[data-tab=webcam]")
    page.click("#webcam-start")
    page.wait_for_selector("#status.error", timeout=30_000)
    assert "The server is not answering" in page.text_content("#status")
    first = len(tried)
    page.wait_for_timeout(3000)
    assert 1 <= len(tried) - first <= 4  # about one a second, not one a frame
    page.click("#webcam-stop")
    page.close()


def test_only_the_last_video_given_is_answered_on_the_page(browser, server, tmp_path):  # noqa: F811
    """A long video, then at once a short one without faces: the long one's request is cancelled, and the
    short one's answer stays on the page."""
    cv2 = pytest.importorskip("cv2", reason="ferkit[video] is not installed")
    photo = cv2.resize(cv2.imread(str(PEOPLE)), (1920, 1080))
    for name, frame, count in (("long.mp4", photo, 30), ("dark.mp4", np.zeros((120, 160, 3), np.uint8), 5)):
        writer = cv2.VideoWriter(str(tmp_path / name), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, frame.shape[1::-1])
        for _ in range(count):
            writer.write(frame)
        writer.release()
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(server)
    page.click("button[data-tab=video]")
    answers = []
    page.on("response", lambda response: answers.append(response) if response.url.endswith("/v1/video") else None)
    page.set_input_files("#video-input", str(tmp_path / "long.mp4"))
    page.set_input_files("#video-input", str(tmp_path / "dark.mp4"))
    page.wait_for_function("() => document.getElementById('status').textContent.includes('frames analysed')")
    page.wait_for_timeout(2000)  # time for a stale answer to come and be drawn, were the long one not cancelled
    assert len(answers) <= 2  # the long one's stream (cut when it was cancelled), the short one's
    assert page.text_content("#status").endswith(", 0 faces followed through them")
    assert page.get_attribute("#video-csv", "download") == "dark.timeline.csv"
    page.close()


def test_leaving_the_webcam_tab_while_the_camera_starts_leaves_it_off(browser, server):  # noqa: F811
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(server)
    page.click("button[data-tab=webcam]")
    sent = []
    page.on("request", lambda request: sent.append(request) if request.url.endswith("/v1/analyze") else None)
    # Start, then the Photo tab before the browser has given the camera (as a user does while it asks)
    page.evaluate("() => { document.getElementById('webcam-start').click(); document.querySelector('[data-tab=photo]').click(); }")
    page.wait_for_timeout(2000)
    assert not sent and page.evaluate("() => document.getElementById('webcam-video').srcObject === null")
    assert page.text_content("#status") == ""  # the Photo tab's own line
    page.close()


def test_a_video_dropped_on_its_zone_is_answered_on_its_own_tab(browser, server, tmp_path):  # noqa: F811
    import base64

    cv2 = pytest.importorskip("cv2", reason="ferkit[video] is not installed")
    photo = cv2.resize(cv2.imread(str(PEOPLE)), (640, 250))
    writer = cv2.VideoWriter(str(tmp_path / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, photo.shape[1::-1])
    for _ in range(5):
        writer.write(photo)
    writer.release()
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(server)
    page.click("button[data-tab=video]")
    with page.expect_response(lambda response: response.url.endswith("/v1/video"), timeout=120_000):
        page.evaluate("""([data, name]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const dropped = new DataTransfer();
            dropped.items.add(new File([bytes], name, { type: "video/mp4" }));
            const drop = new DragEvent("drop", { dataTransfer: dropped, bubbles: true, cancelable: true });
            document.getElementById("video-drop").dispatchEvent(drop);
            document.querySelector("[data-tab=photo]").click();  // and away before the answer comes
        }""", [base64.b64encode((tmp_path / "clip.mp4").read_bytes()).decode(), "clip.mp4"])
    # the answer streams in (progress, then the result): awaited on the Video tab's own status
    page.wait_for_function("() => (statuses.video?.text || '').includes('frames analysed')", timeout=120_000)
    assert "frames analysed" not in page.text_content("#status")  # not on the Photo tab
    page.click("button[data-tab=video]")
    assert page.text_content("#status").startswith("5 frames analysed, ")
    assert page.get_attribute("#video-csv", "download") == "clip.timeline.csv"
    page.close()


def expected_classes() -> set[str]:
    return {"angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"}


def test_the_page_draws_a_crowded_group_photo_as_ferkit_predict_does(browser, server):  # noqa: F811
    """The faces of examples/people.jpg tiled 4 x 6 into a 3680 x 2160 group photo, drawn at the size the
    page shows it (640 px wide): no label covers another or a face (there, the numbers alone), and the
    middle of every face stays visible."""
    page = browser.new_page()
    page.goto(server)
    people = [d.box for d in YuNetDetector()(np.asarray(Image.open(PEOPLE).convert("RGB")))]
    boxes = [(x + 920 * column, y + 360 * row, w, h) for column in range(4) for row in range(6) for x, y, w, h in people]
    clashes, labels, covered = page.evaluate("""(boxes) => {
        const canvas = document.createElement('canvas');
        canvas.width = 640; canvas.height = 376;
        const context = canvas.getContext('2d');
        context.fillStyle = '#5a5a5a'; context.fillRect(0, 0, 640, 376);
        const faces = boxes.map((box) => ({ box, emotion: 'happy', score: 0.9, uncertain: false }));
        const scale = 640 / 3680, labels = drawFaces(context, faces, scale);
        const pixels = context.getImageData(0, 0, 640, 376).data;
        const grey = (x, y) => [0, 1, 2].every((c) => pixels[4 * (y * 640 + x) + c] === 0x5a);
        let covered = 0;
        for (const box of boxes) {  // the middle third of each face, untouched
          const [x, y, w, h] = box.map((v) => Math.round(v * scale));
          let hidden = false;
          for (let j = y + Math.ceil(h / 3); j < y + Math.floor(2 * h / 3); j++)
            for (let i = x + Math.ceil(w / 3); i < x + Math.floor(2 * w / 3); i++) hidden ||= !grey(i, j);
          covered += hidden;
        }
        return [countClashes(labels, boxes.map((box) => box.map((v) => v * scale))), labels.map((l) => l.text), covered];
    }""", boxes)
    assert len(labels) == 72 and clashes == 0 and covered == 0, (clashes, labels[:3], covered)
    page.close()


def test_the_video_tab_shows_how_far_the_analysis_has_gone(browser, server, tmp_path):  # noqa: F811
    cv2 = pytest.importorskip("cv2", reason="ferkit[video] is not installed")
    photo = cv2.resize(cv2.imread(str(PEOPLE)), (960, 376))
    writer = cv2.VideoWriter(str(tmp_path / "talk.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, photo.shape[1::-1])
    for _ in range(40):  # 4 s
        writer.write(photo)
    writer.release()
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(server)
    page.click("button[data-tab=video]")
    page.evaluate("""() => { window.said = [];
        new MutationObserver(() => window.said.push(document.getElementById('status').textContent))
            .observe(document.getElementById('status'), { childList: true, characterData: true, subtree: true }); }""")
    page.set_input_files("#video-input", str(tmp_path / "talk.mp4"))
    page.wait_for_function("() => document.getElementById('status').textContent.includes('frames analysed')", timeout=60_000)
    said = page.evaluate("() => window.said")
    progress = [text for text in said if text.startswith("Analysing talk.mp4… ") and text.endswith(" of 4 s")]
    assert len(progress) >= 2, said
    assert page.text_content("#status").startswith("20 frames analysed, 3 faces followed")
    page.close()


def test_the_webcam_holds_its_label_style_where_each_frame_alone_would_flicker(browser, server):  # noqa: F811
    """Frames alternating between a crowded and a clear group: drawn alone, each switches between the numbers
    alone and whole labels; held, as the webcam draws them, the style stays until frames ask for the other."""
    page = browser.new_page()
    page.goto(server)
    styles = page.evaluate("""() => {
        const context = Object.assign(document.createElement('canvas'), { width: 640, height: 480 }).getContext('2d');
        const face = (box) => ({ box, emotion: 'happy', score: 0.9, uncertain: false });
        const crowded = [], clear = [];
        for (let i = 0; i < 12; i++) crowded.push(face([20 + 50 * (i % 6), 60 + 60 * Math.floor(i / 6), 40, 40]));
        for (let i = 0; i < 3; i++) clear.push(face([20 + 200 * i, 200, 120, 120]));
        const style = (labels) => labels.every((label) => /^\\d+$/.test(label.text)) ? 'N' : 'F';
        const alone = [], held = [], steady = { numbersOnly: null, streak: 0 };
        for (const faces of [crowded, clear, crowded, clear, crowded, clear, clear, clear, clear]) {
          alone.push(style(drawFaces(context, faces)));
          held.push(style(drawFaces(context, faces, 1, steady)));
        }
        return [alone.join(''), held.join('')];
    }""")
    assert styles == ["NFNFNFFFF", "NNNNNNNFF"]
    page.close()


def test_on_a_phones_screen_the_photo_is_drawn_at_the_width_shown_and_its_labels_stay_readable(browser, server):  # noqa: F811
    page = browser.new_page(viewport={"width": 375, "height": 800}, device_scale_factor=2)
    page.goto(server)
    page.set_input_files("#photo-input", str(PEOPLE))
    page.wait_for_selector("#faces .face", timeout=30_000)
    shown, drawn = page.evaluate("() => { const c = document.getElementById('photo-canvas');"
                                 " return [c.getBoundingClientRect().width, c.width]; }")
    assert shown <= 375 and drawn / shown == pytest.approx(2, abs=0.01)  # not drawn at 640 and shrunk to fit
    # letters of at least 11 points on the screen, however small the faces are drawn
    letters = page.evaluate("""() => { const context = document.createElement('canvas').getContext('2d');
        drawFaces(context, [{ box: [10, 10, 20, 20], emotion: 'sad', score: 0.5, uncertain: false }], 1, null, 2);
        return parseFloat(context.font); }""")
    assert letters >= 22
    # what the annotated photo shows, in words; the faces' headings read apart from "uncertain"
    label = page.get_attribute("#photo-canvas", "aria-label")
    [expected] = analyze_images([PEOPLE])
    assert label.startswith("people.jpg: 3 faces: 1 " + expected.faces[0].emotion)
    headings = page.get_by_role("heading", level=2).all_text_contents()
    assert len(headings) == 3 and all(h.endswith("%)") or h.endswith("%) (uncertain)") for h in headings)
    page.close()


def test_every_emotions_label_colour_gets_the_text_colour_that_contrasts_most(browser, server):  # noqa: F811
    page = browser.new_page()
    page.goto(server)
    pairs = page.evaluate("() => Object.entries(COLORS).map(([name, hex]) => [hex, textColour(hex)])")

    def luminance(hex_colour):
        linear = [(c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4)
                  for c in (int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    for background, text in pairs:
        ratio = {colour: (max(luminance(background), luminance(colour)) + 0.05) / (min(luminance(background), luminance(colour)) + 0.05)
                 for colour in ("#000000", "#ffffff")}
        assert ratio[{"#000": "#000000", "#fff": "#ffffff"}[text]] == max(ratio.values()) > 4.5, (background, text)
    page.close()


def test_the_webcam_buttons_hand_the_keyboards_focus_on(browser, server):  # noqa: F811
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(server)
    page.click("button[data-tab=webcam]")
    page.focus("#webcam-start")
    page.keyboard.press("Enter")
    page.wait_for_selector("#webcam-stop:visible", timeout=30_000)
    assert page.evaluate("() => document.activeElement.id") == "webcam-stop"
    page.keyboard.press("Space")
    page.wait_for_selector("#webcam-start:visible", timeout=30_000)
    assert page.evaluate("() => document.activeElement.id") == "webcam-start"
    page.close()


def test_a_photo_given_to_the_video_tab_is_pointed_to_the_photo_tab(browser, server):  # noqa: F811
    page = browser.new_page()
    page.goto(server)
    page.click("button[data-tab=video]")
    page.set_input_files("#video-input", str(PEOPLE))
    page.wait_for_selector("#status.error", timeout=30_000)
    assert page.text_content("#status") == "people.jpg is a photo: the Photo tab analyses photos"
    page.close()
