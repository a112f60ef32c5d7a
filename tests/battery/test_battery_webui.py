"""Battery: the real `cogtune ui` on a loopback port, as a user starts it, under requests no page of its own sends.

Each hostile request (another site's page, a DNS-rebound name, a simple cross-site POST, broken framing, bodies
that are not the form, a decompression bomb, paths out of the output folder, methods it does not take) gets its HTTP
error, no traceback reaches the server's terminal, and the page is still served after it. Then the real page's flow
works: the token read from the page, a JSON job, its status, and the video fetched with the page's cookie.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import pytest

from harness import ENV, wait_for

BIG = 33 * 2**20  # over the server's 32 MiB body limit


@pytest.fixture(scope="module")
def ui(tiny_model, tmp_path_factory):
    """The server process, its port, its token and its terminal (files, so every case can read what it printed)."""
    root = tmp_path_factory.mktemp("ui")
    out, err = (root / "stdout").open("w+"), (root / "stderr").open("w+")
    model = tiny_model("cogvideox-5b")
    proc = subprocess.Popen([sys.executable, "-m", "cogtune", "ui", "--model", str(model), "--port", "0",
                             "--out-dir", str(root / "out")], env=ENV, stdout=out, stderr=err,
                            start_new_session=True)
    url = re.compile(r"cogtune ui at http://127\.0\.0\.1:(\d+)")
    wait_for(lambda: url.search((root / "stdout").read_text()), timeout=120, proc=proc)
    port = int(url.search((root / "stdout").read_text()).group(1))
    page = send(port, request(port, "GET", "/"))[2]
    token = re.search(rb"'X-Cogtune-Token':'([A-Za-z0-9_-]{20,})'", page).group(1).decode()
    yield {"port": port, "token": token, "model": str(model), "stderr": root / "stderr", "proc": proc}
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(30)
    out.close(), err.close()
    assert proc.returncode == 0 and "stopped" in (root / "stdout").read_text()  # Ctrl-C ends it cleanly


def request(port: int, method: str = "POST", path: str = "/api/generate", body: bytes = b"", token: str | None = None,
            content_type: str | None = "application/json", length: object = True, **headers: str) -> bytes:
    """Raw request bytes; `length` True sends the body's Content-Length, a string sends that, None none."""
    head = {"Host": f"127.0.0.1:{port}"}
    if content_type is not None and method == "POST":
        head["Content-Type"] = content_type
    if token is not None:
        head["X-Cogtune-Token"] = token
    if length is True and method == "POST":
        head["Content-Length"] = str(len(body))
    elif isinstance(length, str):
        head["Content-Length"] = length
    head.update({k.replace("_", "-"): v for k, v in headers.items()})
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def send(port: int, raw: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send the bytes, close our side, read the whole reply: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/"), f"no HTTP reply: {data[:200]!r}"
    headers = dict(l.split(": ", 1) for l in lines[1:] if ": " in l)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def form(ui, **fields) -> bytes:
    return json.dumps({"model": ui["model"], "prompt": "x", "steps": "1", **fields}).encode()


def png_header(side: int) -> bytes:
    """A PNG that claims side x side pixels in a few bytes (what a decompression bomb looks like to Image.open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def image(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def P(ui, method: str = "POST", path: str = "/api/generate", **kw) -> bytes:
    """A request as the real page would send it (its token), changed by `kw`."""
    return request(ui["port"], method, path, token=ui["token"], **kw)



CASES = [
    ("foreign Origin", lambda u: P(u, body=form(u), Origin="http://evil.example"), 403),
    ("null Origin (sandboxed frame)", lambda u: P(u, body=form(u), Origin="null"), 403),
    ("same host, other port Origin", lambda u: P(u, body=form(u), Origin="http://127.0.0.1:1"), 403),
    ("rebound DNS name in Host", lambda u: P(u, body=form(u), Host=f"evil.example:{u['port']}"), 403),
    ("Host with another port", lambda u: P(u, "GET", "/", Host="127.0.0.1:1"), 403),
    ("no Host", lambda u: b"GET / HTTP/1.0\r\n\r\n", 403),
    ("cross-site fetch of status", lambda u: P(u, "GET", "/api/status", Sec_Fetch_Site="cross-site"), 403),
    ("same-site fetch of a file", lambda u: P(u, "GET", "/files/job1.mp4", Sec_Fetch_Site="same-site"), 403),
    ("text/plain simple POST", lambda u: request(u["port"], body=form(u), content_type="text/plain"), 415),
    ("form-encoded POST", lambda u: P(u, body=b"model=x&prompt=y",
                                      content_type="application/x-www-form-urlencoded"), 415),
    ("multipart POST", lambda u: P(u, body=b"--b--", content_type="multipart/form-data; boundary=b"), 415),
    ("POST without token", lambda u: request(u["port"], body=form(u)), 403),
    ("POST with wrong token", lambda u: request(u["port"], body=form(u), token="x" * 43), 403),
    ("status without token", lambda u: request(u["port"], "GET", "/api/status"), 403),
    ("file without token or cookie", lambda u: request(u["port"], "GET", "/files/job1.mp4"), 403),
    ("file with wrong cookie", lambda u: request(u["port"], "GET", "/files/job1.mp4",
                                                 Cookie=f"cogtune_ui_{u['port']}=nope"), 403),
    ("no Content-Length", lambda u: P(u, body=form(u), length=None), 411),
    ("chunked body", lambda u: P(u, body=b"2\r\n{}\r\n0\r\n\r\n", length=None, Transfer_Encoding="chunked"), 411),
    ("negative Content-Length", lambda u: P(u, body=form(u), length="-5"), 400),
    ("non-numeric Content-Length", lambda u: P(u, body=form(u), length="12abc"), 400),
    ("two Content-Lengths", lambda u: P(u, body=form(u), length="2\r\nContent-Length: 5"), 400),
    ("terabyte Content-Length", lambda u: P(u, body=b"{" * 1000, length=str(10**12)), 413),
    ("33 MiB body sent in full", lambda u: P(u, body=b'{"image": "' + b"A" * BIG + b'"}'), 413),
    ("body shorter than Content-Length", lambda u: P(u, body=form(u), length=str(len(form(u)) + 100)), 400),
    ("not JSON", lambda u: P(u, body=b"model=/etc"), 400),
    ("not UTF-8", lambda u: P(u, body=b'{"prompt": "\xff\xfe"}'), 400),
    ("JSON array", lambda u: P(u, body=b'["model"]'), 400),
    ("JSON nested 100000 deep", lambda u: P(u, body=b"[" * 100000 + b"]" * 100000), 400),
    ("NaN guidance", lambda u: P(u, body=form(u)[:-1] + b', "guidance_scale": NaN}'), 400),
    ("1e999 guidance (inf)", lambda u: P(u, body=form(u)[:-1] + b', "guidance_scale": 1e999}'), 400),
    ("model as a list", lambda u: P(u, body=json.dumps({"model": [u["model"]]}).encode()), 400),
    ("compare as a string", lambda u: P(u, body=form(u, compare="false")), 400),
    ("unknown field", lambda u: P(u, body=form(u, stpes="2")), 400),
    ("NUL in the model path", lambda u: P(u, body=form(u, model=u["model"] + "\0x")), 400),
    ("model path of 100000 characters", lambda u: P(u, body=form(u, model="a" * 100000)), 400),
    ("a billion frames", lambda u: P(u, body=form(u, frames=10**9)), 400),
    ("invalid base64 image", lambda u: P(u, body=form(u, image="data:image/png;base64,@@@")), 400),
    ("image that is no image", lambda u: P(u, body=form(u, image=image(b"MZ\x90\0 not a picture"))), 400),
    ("bomb image (900 Mpx)", lambda u: P(u, body=form(u, image=image(png_header(30000)))), 400),
    ("bomb image (100 Mpx, Pillow only warns)", lambda u: P(u, body=form(u, image=image(png_header(10000)))), 400),
    ("traversal ..", lambda u: P(u, "GET", "/files/../../etc/passwd"), 404),
    ("traversal %2e%2e", lambda u: P(u, "GET", "/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd.png"), 404),
    ("absolute path", lambda u: P(u, "GET", "/files//etc/passwd.mp4"), 404),
    ("NUL in a file name", lambda u: P(u, "GET", "/files/job1.mp4%00.png"), 404),
    ("PUT", lambda u: P(u, "PUT", body=b"{}", length="2"), 405),
    ("DELETE", lambda u: P(u, "DELETE", "/files/job1.mp4"), 405),
    ("CORS preflight from another site", lambda u: P(u, "OPTIONS", Origin="http://evil.example",
                                                     Access_Control_Request_Method="POST"), 403),
    ("GET of the POST endpoint", lambda u: P(u, "GET", "/api/generate"), 405),
    ("URL of 70000 characters", lambda u: P(u, "GET", "/" + "a" * 70000), 414),
    ("200 headers", lambda u: P(u, "GET", "/", **{f"X_{i}": "y" for i in range(200)}), 431),
    ("garbage request line", lambda u: b"GET / / HTTP/1.1\r\n\r\n", 400),
    ("HTTP/2 request line", lambda u: b"GET / HTTP/2.0\r\n\r\n", 505),
    ("unknown method", lambda u: P(u, "BREW", "/"), 501),
]


@pytest.mark.parametrize("build, code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_request_is_refused(ui, build, code):
    got, headers, body = send(ui["port"], build(ui))
    assert got == code, body[:300]
    if headers.get("content-type") == "application/json":
        error = json.loads(body)["error"]
        assert "\n" not in error and "Traceback" not in error and len(error) < 500, error
        assert ui["token"] not in error
    assert send(ui["port"], request(ui["port"], "GET", "/"))[0] == 200  # still serving
    assert json.loads(send(ui["port"], P(ui, "GET", "/api/status"))[2]) == {"state": "idle"}
    terminal = ui["stderr"].read_text()
    assert "Traceback" not in terminal and "internal error" not in terminal, terminal[-3000:]


def test_head_of_the_page_has_no_body(ui):
    code, headers, body = send(ui["port"], request(ui["port"], "HEAD", "/"))
    assert code == 200 and body == b"" and int(headers["content-length"]) > 1000


def test_the_page_flow_still_works(ui, tmp_path):
    from cogtune.data.video import probe

    port = ui["port"]
    browser = {"Origin": f"http://127.0.0.1:{port}", "Sec_Fetch_Site": "same-origin"}  # what a browser adds
    code, headers, page = send(port, request(port, "GET", "/", Sec_Fetch_Site="none", Sec_Fetch_Mode="navigate"))
    assert code == 200 and headers["x-frame-options"] == "DENY"
    token = re.search(rb"'X-Cogtune-Token':'([^']+)'", page).group(1).decode()
    cookie = headers["set-cookie"].split(";")[0]
    assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]

    job = form(ui, steps="2", frames="9", seed="1", guidance_scale="6", loras="", image=None, compare=False,
               negative_prompt="", height="", width="")
    code, _, body = send(port, request(port, body=job, token=token, **browser))
    assert code == 202, body
    deadline = time.monotonic() + 120
    while (status := json.loads(send(port, request(port, "GET", "/api/status", token=token, **browser))[2])
           )["state"] not in ("done", "error"):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert status["state"] == "done", status

    video = {"Cookie": cookie, "Sec_Fetch_Site": "same-origin"}  # <video src> sends the cookie, not the header
    code, _, data = send(port, request(port, "GET", status["video"], **video))
    assert code == 200 and data[4:8] == b"ftyp"
    (tmp_path / "got.mp4").write_bytes(data)
    assert probe(tmp_path / "got.mp4").frames == 9
    code, headers, _ = send(port, request(port, "GET", status["video"], Range="bytes=99999999-", **video))
    assert code == 416 and headers["content-range"] == f"bytes */{len(data)}"
    assert "Traceback" not in ui["stderr"].read_text()
