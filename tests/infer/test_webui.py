"""`cogtune ui`: the page, real jobs on tiny models, status polling and the mp4 it serves (loopback only)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from cogtune.data.video import probe
from cogtune.infer.webui import make_server

# no proxy from the environment may see loopback requests
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TIMEOUT = 10


def get(server, path: str, headers: dict | None = None, token: bool = True) -> tuple[int, bytes]:
    """GET as the page does: with the server's token unless `token` is False."""
    headers = {**({"X-Cogtune-Token": server.token} if token else {}), **(headers or {})}
    try:
        with OPENER.open(urllib.request.Request(server.url + path, headers=headers), timeout=TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(server, data: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + "/api/generate", data=json.dumps(data).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "X-Cogtune-Token": server.token})
    try:
        with OPENER.open(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_done(server, limit_s: float = 60.0) -> dict:
    deadline = time.monotonic() + limit_s
    while True:
        status = json.loads(get(server, "/api/status")[1])
        if status["state"] in ("done", "error"):
            return status
        assert time.monotonic() < deadline, f"job not done after {limit_s:.0f} s: {status}"
        time.sleep(0.2)


@pytest.fixture
def server(tiny_model, tmp_path):
    srv = make_server("127.0.0.1", 0, tiny_model("cogvideox-5b"), out_dir=tmp_path / "ui",
                      pipeline_options={"dtype": "fp32", "device": "cpu"}).start()
    try:
        yield srv
    finally:
        srv.stop()
    assert not srv.thread.is_alive()


def test_page_job_status_and_video(server, tiny_model, tmp_path):
    assert server.server_address[0] == "127.0.0.1"
    code, page = get(server, "/", token=False)
    assert code == 200 and b"Generate" in page and str(tiny_model("cogvideox-5b")).encode() in page
    assert json.loads(get(server, "/api/status")[1]) == {"state": "idle"}

    code, reply = post(server, {
        "model": str(tiny_model("cogvideox-5b")), "prompt": "a red circle moving left", "steps": "2", "seed": "1",
        "frames": "9", "guidance_scale": "6", "loras": "", "image": None, "compare": False})
    assert code == 202, reply
    status = wait_done(server)
    assert status["state"] == "done", status
    assert status["id"] == reply["job"] and status["step"] == status["steps"] == 2

    code, data = get(server, status["video"])
    assert code == 200
    (tmp_path / "got.mp4").write_bytes(data)
    info = probe(tmp_path / "got.mp4")
    assert (info.frames, info.height, info.width) == (9, 32, 48)

    code, part = get(server, status["video"], {"Range": "bytes=0-99"})  # what Safari's <video> asks for
    assert code == 206 and part == data[:100]


def test_bad_requests_get_one_line(server, tmp_path):
    code, reply = post(server, {"model": str(tmp_path / "nowhere"), "prompt": "x"})
    assert code == 400 and "nowhere" in reply["error"] and "\n" not in reply["error"]
    code, reply = post(server, {"model": "", "prompt": "x"})
    assert code == 400 and "model" in reply["error"]
    assert get(server, "/files/..%2Fsecret.mp4")[0] == 404
    assert get(server, "/nope")[0] == 404
    assert json.loads(get(server, "/api/status")[1]) == {"state": "idle"}


def test_compare_job_and_image_upload(server, tiny_model, tmp_path):
    import base64
    import io

    from PIL import Image

    from helpers.lora import lora_folder

    model = tiny_model("cogvideox-5b")
    lora = lora_folder(model, tmp_path / "lora", seed=1)
    job = {"model": str(model), "prompt": "a red circle", "steps": "1", "loras": f"{lora}:0.8@mine", "compare": True}
    code, reply = post(server, job)
    assert code == 202, reply
    assert post(server, job)[0] == 409  # one job at a time (the first is still loading)
    status = wait_done(server)
    assert status["state"] == "done" and status["runs"] == 2, status  # base + the one adapter
    code, data = get(server, status["video"])
    (tmp_path / "cmp.mp4").write_bytes(data)
    assert probe(tmp_path / "cmp.mp4").width == 2 * 48
    assert get(server, status["sheet"])[1].startswith(b"\x89PNG")

    buf = io.BytesIO()
    Image.new("RGB", (64, 40), "blue").save(buf, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    i2v = {"model": str(tiny_model("cogvideox1.5-5b-i2v")), "prompt": "a blue square", "steps": "1", "image": image}
    code, reply = post(server, i2v)
    assert code == 202, reply
    status = wait_done(server)
    assert status["state"] == "done", status
    (tmp_path / "i2v.mp4").write_bytes(get(server, status["video"])[1])
    assert probe(tmp_path / "i2v.mp4").frames == 17


@pytest.mark.parametrize("field, expect", [
    ({"steps": "0"}, "--steps 0"), ({"steps": 0}, "--steps 0"),  # 0 is a value to check, not "use the default"
    ({"frames": "0"}, "not 0"), ({"guidance_scale": "nan"}, "not a number"),
])
def test_form_values_are_checked_not_replaced(tiny_model, tmp_path, field, expect):
    from cogtune.errors import CogtuneError
    from cogtune.infer.webui import Generator

    generator = Generator(tmp_path / "ui")
    with pytest.raises(CogtuneError, match=expect):
        generator.submit({"model": str(tiny_model("cogvideox-5b")), "prompt": "x", **field})
    assert generator.status() == {"state": "idle"}


def test_upload_that_is_no_image_is_refused_at_once(tiny_model, tmp_path):
    import base64

    from cogtune.errors import CogtuneError
    from cogtune.infer.webui import Generator

    generator = Generator(tmp_path / "ui")
    text = "data:image/png;base64," + base64.b64encode(b"not a picture").decode()
    with pytest.raises(CogtuneError, match="not an image file"):
        generator.submit({"model": str(tiny_model("cogvideox-5b-i2v")), "prompt": "x", "image": text})
    assert generator.status() == {"state": "idle"} and not any((tmp_path / "ui").iterdir())


@pytest.mark.parametrize("port, out_dir, expect", [
    (99999, "ui", "--port 99999"), (0, "a_file", "--out-dir .*a_file is a file"),
    (0, "a_file/ui", "--out-dir .*a_file is a file, not a folder"),  # not "cannot listen ... pick another --port"
])
def test_server_options_are_one_line(tmp_path, port, out_dir, expect):
    from cogtune.errors import CogtuneError

    (tmp_path / "a_file").write_text("")
    with pytest.raises(CogtuneError, match=expect) as err:
        make_server("127.0.0.1", port, out_dir=tmp_path / out_dir).stop()
    assert "\n" not in str(err.value)
