"""`cogtune ui` driven in Debian's chromium like a user: fill the form, generate with a tiny model, watch the video
play, compare two adapters, see an error, cancel a job, switch to an I2V model and give it a first frame.
Screenshots are checked to show something (not a blank page or a black video)."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from helpers.browser import UiProcess, chromium, need_browser

pytestmark = pytest.mark.slow
WAIT = 90  # seconds for a tiny job on a busy 2-core machine


@pytest.fixture(scope="module")
def ui(ui_folders, tmp_path_factory):
    need_browser()
    pytest.importorskip("gradio")
    models, loras = ui_folders
    out = tmp_path_factory.mktemp("ui-browser") / "out"
    proc = UiProcess(["--models-dir", str(models), "--loras-dir", str(loras), "--model", str(models / "t2v"),
                      "--out-dir", str(out)], out.parent / "ui.log")
    driver = chromium()
    driver.implicitly_wait(0)
    try:
        yield proc, driver, out
    finally:
        driver.quit()
        code = proc.stop()
        assert code == 0, proc.log.read_text()[-2000:]
        assert "stopped" in proc.log.read_text()


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def wait_for(what, check, limit=WAIT):
    deadline = time.monotonic() + limit
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"after {limit} s still waiting for {what}"
        time.sleep(0.3)


def page_text(driver) -> str:
    return css(driver, "body")[0].text


def status(driver) -> str:
    found = css(driver, "#status")
    return found[0].text if found else ""  # not yet rendered after a reload


def open_page(driver, url):
    driver.get(url)
    wait_for("the page to load the model's defaults", lambda: "text-to-video" in page_text(driver))


def fill(driver, selector, text):
    box = css(driver, selector)[0]
    box.clear()
    box.send_keys(str(text))


def choose(driver, slot_id, label_part):
    """Open the dropdown `slot_id` and click the option whose text holds `label_part`."""
    css(driver, f"#{slot_id} input")[0].click()
    option = wait_for(f"option {label_part}", lambda: [o for o in css(driver, "[role=option]")
                                                       if label_part in o.text])
    option[0].click()
    wait_for("the dropdown to close", lambda: not css(driver, "[role=option]"))


def not_blank(png: bytes, min_std: float = 8.0) -> np.ndarray:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    assert pixels.std() > min_std, f"screenshot looks blank (std {pixels.std():.1f})"
    return pixels


def new_records(out, before):
    return sorted(set(out.glob("*.json")) - before)


def test_generate_plays_and_records_what_reproduces_it(ui, tmp_path):
    proc, driver, out = ui
    open_page(driver, proc.url)
    before = set(out.glob("*.json"))
    fill(driver, "#prompt textarea", "a red circle moving left")
    fill(driver, "#steps input", 2)
    fill(driver, "#seed input", 7)
    css(driver, "#generate")[0].click()
    wait_for("the done line", lambda: "Done:" in status(driver))
    video = wait_for("the video", lambda: [v for v in css(driver, "#video video") if v.get_attribute("src")])[0]
    state = wait_for("the video to play", lambda: driver.execute_script(
        "const v = arguments[0]; v.muted = true; v.play(); "
        "return v.readyState >= 2 && v.currentTime > 0 ? [v.videoWidth, v.videoHeight, v.duration] : null", video))
    assert state[:2] == [48, 32]  # the tiny model's native size
    assert abs(state[2] - 9 / 8) < 0.2  # 9 frames at 8 fps
    not_blank(video.screenshot_as_png)  # the tiny model's frames are coloured noise, never one flat colour
    not_blank(driver.get_screenshot_as_png(), 4.0)
    assert "seed 7" in status(driver)

    [record_file] = new_records(out, before)
    record = json.loads(record_file.read_text())
    assert (out / record["video"]).is_file() and record["seed"] == 7 and record["steps"] == 2
    assert record["prompt"] == "a red circle moving left" and record["adapters"] == []
    shown = css(driver, "#command")[0].text
    assert record["command"].split("--out")[0].strip().replace("'", "") in shown.replace("'", "").replace("\n", " ")


def test_compare_two_adapters_shows_each_video(ui):
    proc, driver, out = ui
    open_page(driver, proc.url)
    before = set(out.glob("*.json"))
    fill(driver, "#prompt textarea", "a blue square")
    fill(driver, "#steps input", 2)
    choose(driver, "lora0", "run1")
    choose(driver, "lora1", "run2")
    css(driver, "#compare")[0].click()
    wait_for("the done line", lambda: "Done:" in status(driver))
    grid = wait_for("four videos in the grid", lambda: [v for v in css(driver, "#compare-grid video")
                                                        if v.get_attribute("src")] if len(
        [v for v in css(driver, "#compare-grid video") if v.get_attribute("src")]) == 4 else None)
    driver.execute_script("arguments[0].scrollIntoView()", grid[0])
    css(driver, "#sync")[0].click()
    times = wait_for("all four playing", lambda: (lambda t: t if all(x > 0 for x in t) else None)(
        driver.execute_script("return arguments[0].map(v => v.currentTime)", grid)))
    assert max(times) - min(times) < 0.5  # started together
    text = page_text(driver)
    assert all(label in text for label in ("base", "run1 x1", "run2 x1", "run1+run2"))
    [record_file] = new_records(out, before)
    record = json.loads(record_file.read_text())
    assert record["kind"] == "compare" and [a["name"] for a in record["adapters"]] == ["run1", "run2"]
    assert len(record["videos"]) == 4 and all((out / v["file"]).is_file() for v in record["videos"])
    assert (out / record["sheet"]).is_file() and len(record["adapters"][0]["sha256"]) == 64
    not_blank(css(driver, "#sheet img")[0].screenshot_as_png)


def test_bad_frames_is_one_line_in_the_page(ui):
    proc, driver, out = ui
    open_page(driver, proc.url)
    before = set(out.iterdir())
    fill(driver, "#prompt textarea", "x")
    fill(driver, "#frames input", 10)
    css(driver, "#generate")[0].click()
    wait_for("the error", lambda: "Frames: cogvideox-5b takes 8N+1 frames" in page_text(driver))
    assert "--frames" not in page_text(driver)
    assert set(out.iterdir()) == before  # nothing written


def start_long_job(driver, url, prompt):
    """A 1000-step job on the page, once its progress shows an ETA."""
    open_page(driver, url)
    fill(driver, "#prompt textarea", prompt)
    fill(driver, "#steps input", 1000)
    css(driver, "#generate")[0].click()
    wait_for("progress with an ETA", lambda: "s left" in page_text(driver))


def test_cancel_stops_a_long_job(ui):
    proc, driver, out = ui
    before = set(out.iterdir())
    start_long_job(driver, proc.url, "a long one")
    driver.refresh()  # a reload mid-job: the page says a job runs, and Cancel still reaches it
    wait_for("the running-job line", lambda: "A job is running" in status(driver), limit=30)
    css(driver, "#cancel")[0].click()
    wait_for("the cancelling line", lambda: "Cancelling" in status(driver), limit=30)
    time.sleep(2)
    assert set(out.iterdir()) == before  # the job ended without a file


def test_cancel_reports_in_the_page_that_started_the_job(ui):
    proc, driver, out = ui
    before = set(out.iterdir())
    start_long_job(driver, proc.url, "another long one")
    css(driver, "#cancel")[0].click()
    wait_for("the cancelled line", lambda: "Cancelled" in status(driver), limit=30)
    assert "nothing was written" in status(driver)
    assert set(out.iterdir()) == before


def test_image_to_video_model_takes_a_first_frame(ui, tmp_path):
    proc, driver, out = ui
    open_page(driver, proc.url)
    assert not css(driver, "#image input[type=file]")  # a T2V model shows no image box
    choose(driver, "model", "i2v")
    wait_for("the image box", lambda: "image-to-video" in page_text(driver) and css(driver, "#image input[type=file]"))
    frame = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(frame)
    css(driver, "#image input[type=file]")[0].send_keys(str(frame))
    preview = wait_for("the image preview", lambda: css(driver, "#image img"))
    not_blank(preview[0].screenshot_as_png)
    before = set(out.glob("*.json"))
    fill(driver, "#prompt textarea", "it moves")
    fill(driver, "#steps input", 2)
    css(driver, "#generate")[0].click()
    wait_for("the done line", lambda: "Done:" in status(driver))
    [record_file] = new_records(out, before)
    record = json.loads(record_file.read_text())
    assert record["variant"] == "cogvideox-5b-i2v" and (out / record["image"]).is_file()
    assert "--image " + record["image"] in record["command"]
