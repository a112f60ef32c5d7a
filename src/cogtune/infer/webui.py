"""`cogtune ui`: a small local web page for generating (and comparing) videos. Standard library only.

One job runs at a time in a worker thread; the page polls `/api/status` for progress. The last pipeline (model,
dtype and loaded adapters) is kept between jobs, so a new prompt or adapter weight does not reload any weights.
Endpoints: `GET /` (the page), `POST /api/generate` (JSON), `GET /api/status`, `GET /files/<name>` (outputs).

Only the page this server served may use it: every request must name this server in `Host` (no DNS rebinding) and
come from no other origin; the API needs the per-process token the page carries (`X-Cogtune-Token`; the video files
also take the page's SameSite cookie), and a POST must be JSON (no "simple" cross-site form or text POST). Every
malformed request gets an HTTP error; nothing in a request prints a traceback (`--debug` shows them).
"""

from __future__ import annotations

import base64
import binascii
import html
import hmac
import ipaddress
import json
import math
import re
import secrets
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..errors import CogtuneError, bounded, one_line, os_error_text
from .generate import (LoraSpec, Settings, activate_adapters, build_pipeline, load_image, parse_loras,
                       resolve_settings, sample)

MAX_BODY = 32 * 1024 * 1024  # an uploaded first frame, base64-encoded
FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.(mp4|png)$")
TOKEN_HEADER = "X-Cogtune-Token"
TEXT_FIELDS = {"model": 4096, "loras": 65536, "prompt": 20000, "negative_prompt": 20000}  # most characters
NUMBER_FIELDS = {"frames": 1000, "height": 4096, "width": 4096, "steps": None, "seed": None, "guidance_scale": None}
BODY_SECONDS = 120.0  # the longest a request body may take to arrive
DRAIN_LIMIT, DRAIN_SECONDS = 2 * MAX_BODY, 3.0  # unread body read away after a refusal (see Handler._drain)


class Busy(Exception):
    """A job is still running."""


@dataclass
class Job:
    id: int
    state: str = "queued"  # queued | loading | running | done | error
    message: str = ""
    step: int = 0
    steps: int = 0
    run: int = 1
    runs: int = 1
    video: str | None = None
    sheet: str | None = None


class Generator:
    """Runs one job at a time and keeps the last pipeline."""

    def __init__(self, out_dir: str | Path, pipeline_options: dict[str, Any] | None = None):
        from ..export.shards import check_can_create

        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise CogtuneError(f"--out-dir {out_dir} is a file: give a folder for the videos")
        if not self.out_dir.is_dir():
            check_can_create(self.out_dir, "--out-dir")  # a file in the way: one line naming the flag
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.options = pipeline_options or {}
        self.verbose = False  # tracebacks of failed jobs on the terminal (`--debug`)
        self.lock = threading.Lock()
        self._submitting = threading.Lock()
        self.job: Job | None = None
        self.worker: threading.Thread | None = None
        self._pipe_key: tuple | None = None
        self._pipe = None
        self._count = 0

    def status(self) -> dict[str, Any]:
        with self.lock:
            return asdict(self.job) if self.job else {"state": "idle"}

    def submit(self, form: dict[str, Any]) -> int:
        """Check the form (CogtuneError: one line for the page), then start the job. Busy if one is running."""
        with self._submitting:  # two quick clicks must not both pass the busy check
            return self._submit(form)

    def _submit(self, form: dict[str, Any]) -> int:
        _check_form(form)
        with self.lock:
            if self.job and self.job.state in ("queued", "loading", "running"):
                raise Busy(f"job {self.job.id} is still running")
            self._count += 1
            job = Job(self._count)
        model = _field(form, "model")
        if not model:
            raise CogtuneError("give a model folder")
        lines = [l.strip() for l in _field(form, "loras").splitlines() if l.strip()]
        specs = parse_loras(lines)
        image = self._save_image(form.get("image"), job.id)
        try:
            settings = resolve_settings(model, Settings(
                prompt=str(form.get("prompt") or ""), negative_prompt=str(form.get("negative_prompt") or ""),
                image=image, frames=_int(form, "frames"), height=_int(form, "height"), width=_int(form, "width"),
                steps=_int(form, "steps", 50), seed=_int(form, "seed", 0),
                guidance_scale=_float(form, "guidance_scale", None)), specs)
            compare = bool(form.get("compare"))
            if compare and not specs:
                raise CogtuneError("compare needs at least one adapter")
        except BaseException:
            if image is not None:
                image.unlink(missing_ok=True)  # a refused job leaves nothing behind
            raise
        with self.lock:
            self.job = job
            self.worker = threading.Thread(target=self._run, args=(job, model, specs, settings, compare),
                                           name=f"cogtune-ui-job-{job.id}", daemon=True)
            self.worker.start()
        return job.id

    def _save_image(self, data_url: Any, job_id: int) -> Path | None:
        from PIL import Image, UnidentifiedImageError

        if not data_url:
            return None
        try:
            data = base64.b64decode(data_url.split(",", 1)[-1], validate=True)  # "data:image/png;base64,...."
        except (binascii.Error, ValueError):
            raise CogtuneError("the uploaded image is not valid base64 data") from None
        path = self.out_dir / f"job{job_id}-image"
        try:
            path.write_bytes(data)
            with warnings.catch_warnings():  # Pillow only warns below twice its pixel limit; refuse there too
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:  # the header only: a bomb is refused before it is decoded
                    size = img.size
            load_image(path, 16, 16)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            path.unlink(missing_ok=True)
            raise CogtuneError("the uploaded first frame has too many pixels to decode safely: "
                               "scale it down, e.g. to the video's size") from None
        except (CogtuneError, UnidentifiedImageError, ValueError, OSError) as e:
            path.unlink(missing_ok=True)
            if isinstance(e, OSError) and not isinstance(e, UnidentifiedImageError) and e.errno is not None:
                raise CogtuneError(os_error_text(e, "saving the uploaded first frame")) from None
            raise CogtuneError("the uploaded first frame is not an image file (use PNG, JPEG or WebP)") from None
        if size[0] < 1 or size[1] < 1:
            path.unlink()
            raise CogtuneError("the uploaded first frame is empty (0 pixels)")
        return path

    def _pipeline(self, model: str, specs: list[LoraSpec]):
        key = (str(Path(model).resolve()), tuple((str(s.path.resolve()), s.name) for s in specs))
        if key != self._pipe_key:
            self._pipe = self._pipe_key = None  # free the old weights before loading new ones
            self._pipe = build_pipeline(model, specs, **self.options)
            self._pipe_key = key
        activate_adapters(self._pipe, specs)  # weights may have changed since the pipeline was built
        return self._pipe

    def _update(self, job: Job, **fields) -> None:
        with self.lock:
            for k, v in fields.items():
                setattr(job, k, v)

    def _run(self, job: Job, model: str, specs: list[LoraSpec], settings: Settings, compare: bool) -> None:
        from .compare import compare_videos, write_comparison
        from ..data.video import write_mp4

        try:
            self._update(job, state="loading", message="loading the model", steps=settings.steps)
            pipe = self._pipeline(model, specs)
            self._update(job, state="running", message="sampling")
            on_step = lambda step, steps: self._update(job, step=step, steps=steps)
            out = self.out_dir / f"job{job.id}.mp4"
            if compare:
                on_run = lambda run, runs, label: self._update(job, run=run, runs=runs, step=0, message=label)
                videos, labels = compare_videos(pipe, settings, specs, on_run, on_step, progress=False)
                video, sheet = write_comparison(videos, labels, out, settings.fps)
                self._update(job, sheet=f"/files/{sheet.name}")
            else:
                video = write_mp4(sample(pipe, settings, on_step, progress=False), out, settings.fps,
                                  value_range=(0.0, 1.0))
            self._update(job, state="done", message="done", video=f"/files/{video.name}")
        except CogtuneError as e:
            self._update(job, state="error", message=one_line(str(e)))
        except OSError as e:  # disk full, read-only out-dir, ...: the file and what to do
            self._update(job, state="error", message=one_line(os_error_text(e, f"job {job.id}")))
        except Exception as e:  # a bug of ours or a library's: one line on the page and on the terminal
            report(e, f"job {job.id}", self.verbose)
            self._update(job, state="error", message=f"internal error: {e.__class__.__name__}: {_page_text(e)} "
                                                     "(the server's terminal has more)")


def _check_form(form: dict) -> None:
    """Every field is a known one of its type, text is text a path can hold, numbers are finite: else one line."""
    for key, value in form.items():
        if key in TEXT_FIELDS:
            ok = value is None or isinstance(value, str)
        elif key in NUMBER_FIELDS:
            ok = value is None or (isinstance(value, (str, int, float)) and not isinstance(value, bool))
        elif key == "image":
            ok = value is None or isinstance(value, str)
        elif key == "compare":
            ok = value is None or isinstance(value, bool)
        else:
            raise CogtuneError(f"unknown field {bounded(key, 60)!r}: the form has "
                               f"{', '.join([*TEXT_FIELDS, *NUMBER_FIELDS, 'image', 'compare'])}")
        if not ok:
            raise CogtuneError(f"{key}: {type(value).__name__} is not a value this field takes")
        if isinstance(value, str) and key != "image":
            if len(value) > TEXT_FIELDS.get(key, 100):
                raise CogtuneError(f"{key}: {len(value)} characters is too long")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise CogtuneError(f"{key}: not valid text (a lone surrogate)") from None
            if "\x00" in value:
                raise CogtuneError(f"{key}: contains a NUL character")


def _field(form: dict, key: str) -> str:
    return "" if form.get(key) is None else str(form.get(key)).strip()


def _int(form: dict, key: str, default: int | None = None) -> int | None:
    value = _field(form, key)  # an empty field: `default` (0 is a value the checks judge)
    try:
        number = int(value) if value else default
    except ValueError:
        raise CogtuneError(f"{key}: {bounded(value, 40)!r} is not a whole number") from None
    limit = NUMBER_FIELDS.get(key)
    if number is not None and limit is not None and number > limit:
        raise CogtuneError(f"{key} {number}: at most {limit}")
    return number


def _float(form: dict, key: str, default: float | None) -> float | None:
    value = _field(form, key)
    try:
        number = float(value) if value else default
    except ValueError:
        number = math.nan
    if number is not None and not math.isfinite(number):
        raise CogtuneError(f"{key}: {bounded(value, 40)!r} is not a number")
    return number


def _page_text(e: BaseException) -> str:
    """An unexpected exception's message for the page: one short line, no paths inside the installation."""
    text = one_line(str(e))
    for root in sorted({sys.prefix, sys.base_prefix, str(Path(__file__).resolve().parents[1])}, key=len, reverse=True):
        text = text.replace(root, "...")
    return bounded(text, 300)


def report(e: BaseException, doing: str, verbose: bool) -> None:
    """An unexpected exception on the server's terminal: the traceback with --debug, else one line."""
    if verbose:
        traceback.print_exception(e)
    else:
        print(f"cogtune ui: internal error in {doing}: {type(e).__name__}: {one_line(str(e))} "
              "(run with --debug for the traceback)", file=sys.stderr, flush=True)


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>cogtune</title><style>
body{font:14px sans-serif;max-width:980px;margin:1em auto}label{display:block;margin:.35em 0}
input[type=text],textarea{width:100%%}input[type=number]{width:6em}video{max-width:100%%;margin-top:1em}
#status{margin:.6em 0}</style></head><body><h2>cogtune</h2><form id="f">
<label>Model folder <input type="text" name="model" value="%(model)s"></label>
<label>Prompt <textarea name="prompt" rows="3"></textarea></label>
<label>Negative prompt <input type="text" name="negative_prompt"></label>
<label>First frame (image-to-video models only) <input type="file" name="image" accept="image/*"></label>
<label>Adapters, one per line: PATH[:WEIGHT][@NAME] <textarea name="loras" rows="3">%(loras)s</textarea></label>
<label>Seed <input type="number" name="seed" value="0"> Steps <input type="number" name="steps" value="50" min="1">
Guidance <input type="number" name="guidance_scale" value="6" step="0.5"></label>
<label>Frames <input type="number" name="frames" placeholder="native"> Height <input type="number" name="height"
placeholder="native" step="16"> Width <input type="number" name="width" placeholder="native" step="16"></label>
<label><input type="checkbox" name="compare"> Compare: base, each adapter, all together (side by side)</label>
<button id="go">Generate</button></form><div id="status"></div><progress id="bar" max="1" value="0" hidden></progress>
<div id="result"></div><script>
const f=document.getElementById('f'),st=document.getElementById('status'),bar=document.getElementById('bar'),
res=document.getElementById('result'),go=document.getElementById('go');
const asDataUrl=file=>new Promise((ok,bad)=>{const r=new FileReader();r.onload=()=>ok(r.result);r.onerror=bad;
r.readAsDataURL(file)});
const H={'Content-Type':'application/json','X-Cogtune-Token':'%(token)s'};
const fail=m=>{bar.hidden=true;st.textContent='error: '+m;go.disabled=false};
const ask=async(url,opts)=>{const r=await fetch(url,{headers:H,...opts});let j;try{j=await r.json()}catch(e){
j={error:'HTTP '+r.status}}return [r,j]};
f.onsubmit=async e=>{e.preventDefault();const d=Object.fromEntries(new FormData(f));d.compare=f.compare.checked;
try{d.image=f.image.files.length?await asDataUrl(f.image.files[0]):null;go.disabled=true;res.innerHTML='';
const [r,j]=await ask('/api/generate',{method:'POST',body:JSON.stringify(d)});if(!r.ok)return fail(j.error);
poll()}catch(e){fail(e)}};
async function poll(){let r,j;try{[r,j]=await ask('/api/status')}catch(e){return fail(e)}
if(!r.ok)return fail(j.error);
if(j.state=='done'){bar.hidden=true;st.textContent='done (job '+j.id+')';go.disabled=false;
res.innerHTML='<video controls autoplay loop src="'+j.video+'?'+j.id+'"></video>'+
(j.sheet?'<p><a href="'+j.sheet+'">contact sheet</a></p>':'');return}
if(j.state=='error')return fail(j.message);
bar.hidden=false;bar.max=Math.max(1,j.steps*j.runs);bar.value=(j.run-1)*j.steps+j.step;
st.textContent=j.state+(j.runs>1?' run '+j.run+'/'+j.runs+' ('+j.message+')':'')+' step '+j.step+'/'+j.steps;
setTimeout(poll,500)}
</script></body></html>"""


SAFE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer",
                "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                           "frame-ancestors 'none'; form-action 'none'"}
FOREIGN = "refused: a request from another web page or site"


class Refusal(Exception):
    """An HTTP error reply: code, one line, extra headers."""

    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.message, self.headers = code, message, headers or {}


class Handler(BaseHTTPRequestHandler):
    server: "UiServer"
    _body_left = 0  # bytes of the request body not read yet: read away before closing (see _drain)
    _replied = False

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # a stalled client frees its thread
        super().setup()

    def log_message(self, format: str, *args) -> None:  # quiet: the status endpoint is polled twice a second
        if self.server.verbose:
            super().log_message(format, *args)

    def send_response(self, code: int, message: str | None = None) -> None:
        self._replied = True
        super().send_response(code, message)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if getattr(self, "headers", None) is None:  # the request line or headers were refused: the rest is unread
            self._body_left = max(self._body_left, 1 << 20)
        if self.request_version == "HTTP/0.9":  # http.server refuses HTTP/2.0 lines before it knows the version:
            self.request_version = "HTTP/1.0"   # without this the reply would have no status line
        super().send_error(code, message, explain)

    def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**SAFE_HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, data: dict, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(data).encode(), "application/json", headers)

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_HEAD(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _not_allowed(self) -> None:
        self._answer(lambda: self._refuse_method("GET, HEAD, POST"))

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _refuse_method(self, allow: str):
        raise Refusal(405, f"{bounded(self.command, 20)} is not allowed here (only {allow})", {"Allow": allow})

    def _answer(self, route) -> None:
        """Check who asks, route, and turn every failure into one HTTP error reply (never a traceback)."""
        length = self.headers.get("Content-Length", "").strip()
        if length.isdigit() and len(length) < 16:
            self._body_left = int(length)
        elif self.headers.get("Transfer-Encoding"):
            self._body_left = DRAIN_LIMIT
        try:
            self._check_caller()
            route()
        except Refusal as r:
            self._error(r.code, r.message, r.headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client left or stalled: nobody to answer
        except Exception as e:
            report(e, f"{bounded(self.command, 20)} {bounded(self.path, 200)}", self.server.verbose)
            self._error(500, "internal error in the server (its terminal has the details)")

    def _error(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.close_connection = True
        if self._replied:  # headers are out already: closing the connection is the only signal left
            return
        try:
            self._json(code, {"error": one_line(message)}, headers)
        except (ConnectionError, TimeoutError):
            pass

    def finish(self) -> None:
        try:
            self._drain()
        finally:
            super().finish()

    def _drain(self) -> None:
        """Read away a body we did not read: closing a socket with unread data resets it, and the client can lose
        the reply it was sent. Bounded in bytes and time."""
        left = min(self._body_left, DRAIN_LIMIT)
        if left <= 0:
            return
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)  # the reply is complete: the client may read it now
            self.connection.settimeout(1.0)
            deadline = time.monotonic() + DRAIN_SECONDS
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _route(self) -> str:
        return self.path.split("?", 1)[0]

    def _check_caller(self) -> None:
        """Only this server's own page: Host names this server (a rebound DNS name does not) and no other origin."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1 or not self.server.serves(hosts[0]):
            raise Refusal(403, "refused: the Host header does not name this server; open the address `cogtune ui` "
                               "printed")
        origins = self.headers.get_all("Origin") or []
        if origins and (len(origins) > 1 or origins[0].strip().lower() != f"http://{hosts[0].strip().lower()}"):
            raise Refusal(403, FOREIGN)
        site = (self.headers.get("Sec-Fetch-Site") or "").strip().lower()
        navigation = (self.command in ("GET", "HEAD") and self._route() == "/"
                      and (self.headers.get("Sec-Fetch-Mode") or "").lower() == "navigate")
        if site not in ("", "same-origin", "none") and not navigation:  # a link to the page is fine, nothing else
            raise Refusal(403, FOREIGN)

    def _has_token(self, cookie_ok: bool = False) -> bool:
        sent = self.headers.get(TOKEN_HEADER)
        if sent is None and cookie_ok:  # <video src> cannot send headers; the SameSite cookie goes with it
            pairs = (part.strip().partition("=") for part in (self.headers.get("Cookie") or "").split(";"))
            sent = next((value for name, _, value in pairs if name == self.server.cookie_name), None)
        return sent is not None and hmac.compare_digest(sent.strip().encode("utf-8", "surrogateescape"),
                                                        self.server.token.encode())

    def _need_token(self, cookie_ok: bool = False) -> None:
        if not self._has_token(cookie_ok):
            raise Refusal(403, f"refused: missing or wrong {TOKEN_HEADER}; reload the page (the server may have "
                               "restarted)")

    def _get(self) -> None:
        path = self._route()
        if path == "/":
            page = PAGE % {"model": html.escape(self.server.model), "loras": html.escape("\n".join(self.server.loras)),
                           "token": self.server.token}
            cookie = f"{self.server.cookie_name}={self.server.token}; Path=/; HttpOnly; SameSite=Strict"
            self._send(200, page.encode(), "text/html; charset=utf-8", {"Set-Cookie": cookie})
        elif path == "/api/status":
            self._need_token()  # the status names the job's files and its error, which may name local paths
            self._json(200, self.server.generator.status())
        elif path.startswith("/files/"):
            self._file(path[len("/files/"):])
        elif path == "/api/generate":
            self._refuse_method("POST")
        else:
            raise Refusal(404, f"no such page: {bounded(path, 100)}")

    def _file(self, name: str) -> None:
        if not FILE_NAME.match(name):  # no "..", "/", "%", NUL: only names this server writes
            raise Refusal(404, f"no such file: {bounded(name, 100)}")
        self._need_token(cookie_ok=True)
        try:
            data = (self.server.generator.out_dir / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise Refusal(404, f"no such file: {name}") from None
        except OSError as e:
            raise Refusal(500, os_error_text(e, f"reading {name}")) from None
        kind = "video/mp4" if name.endswith(".mp4") else "image/png"
        m = re.fullmatch(r"bytes=(\d{0,15})-(\d{0,15})", (self.headers.get("Range") or "").strip())
        if m and (m.group(1) or m.group(2)):  # Safari plays <video> only with range requests
            size = len(data)
            start = int(m.group(1)) if m.group(1) else max(0, size - int(m.group(2)))
            end = min(size - 1, int(m.group(2))) if m.group(1) and m.group(2) else size - 1
            if start >= size or start > end or (not m.group(1) and int(m.group(2)) == 0):
                raise Refusal(416, f"range {bounded(m.group(0), 60)} is outside the {size} bytes of {name}",
                              {"Content-Range": f"bytes */{size}"})
            return self._send(206, data[start:end + 1], kind,
                              {"Content-Range": f"bytes {start}-{end}/{size}", "Accept-Ranges": "bytes"})
        self._send(200, data, kind, {"Accept-Ranges": "bytes"})

    def _post(self) -> None:
        if self._route() != "/api/generate":
            raise Refusal(404, f"no such endpoint: {bounded(self.path, 100)}")
        length = self._content_length()
        if self.headers.get_content_type() != "application/json":
            raise Refusal(415, "send the job as JSON (Content-Type: application/json)")
        self._need_token()
        form = _parse_form(self._read_body(length))
        try:
            job = self.server.generator.submit(form)
        except CogtuneError as e:
            raise Refusal(400, str(e)) from None
        except Busy as e:
            raise Refusal(409, str(e)) from None
        except OSError as e:  # the out-dir is full or read-only
            raise Refusal(500, os_error_text(e, "starting the job")) from None
        self._json(202, {"job": job})

    def _content_length(self) -> int:
        values = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding") or not values:
            raise Refusal(411, "a POST needs a Content-Length header (chunked bodies are not taken)")
        if len(values) > 1 or not re.fullmatch(r"\d{1,15}", values[0].strip()):
            raise Refusal(400, f"Content-Length {bounded(', '.join(values), 60)} is not one byte count")
        length = int(values[0])
        if length > MAX_BODY:
            raise Refusal(413, f"request over {MAX_BODY // 2**20} MiB; use a smaller image")
        return length

    def _read_body(self, length: int) -> bytes:
        chunks, got = [], 0
        deadline = time.monotonic() + BODY_SECONDS
        while got < length:
            try:
                chunk = self.rfile.read1(min(length - got, 1 << 16))
            except TimeoutError:
                chunk = None
            if chunk is None or time.monotonic() > deadline:
                raise Refusal(408, f"the request body stopped arriving after {got} of {length} bytes")
            if not chunk:
                raise Refusal(400, f"the request body ended after {got} of the {length} bytes of its Content-Length")
            chunks.append(chunk)
            got += len(chunk)
            self._body_left = length - got
        return b"".join(chunks)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _parse_form(body: bytes) -> dict:
    try:
        form = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise Refusal(400, "bad request body: JSON nested too deeply") from None
    except ValueError as e:  # also bytes that are not UTF-8
        raise Refusal(400, f"bad request body: not JSON ({bounded(str(e), 200)})") from None
    if not isinstance(form, dict):
        raise Refusal(400, f"bad request body: a JSON object is expected, not {type(form).__name__}")
    return form


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


class UiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, generator: Generator, model: str = "", loras: list[str] | None = None,
                 verbose: bool = False, request_timeout: float = 10.0):
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)
        self.generator, self.model, self.loras, self.verbose = generator, model, list(loras or []), verbose
        self.request_timeout = request_timeout
        generator.verbose = verbose
        self.thread: threading.Thread | None = None
        self.token = secrets.token_urlsafe(32)  # the page carries it; other pages cannot read it
        self.port = self.server_address[1]
        self.cookie_name = f"cogtune_ui_{self.port}"  # cookies ignore the port: one name per server
        self._wildcard = host in ("", "0.0.0.0", "::")
        self._names = {"localhost", "127.0.0.1", "[::1]", _bracket(host.lower()), _bracket(self.server_address[0])}
        if self._wildcard:
            self._names |= {socket.gethostname().lower(), self.server_name.lower()}

    def serves(self, host_header: str) -> bool:
        """Whether a Host header names this server. IP literals cannot be rebound, names only as given."""
        m = re.fullmatch(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::(\d{1,5}))?", host_header.strip().lower())
        if not m or int(m.group(2) or 80) != self.port:
            return False
        return m.group(1) in self._names or (self._wildcard and _is_ip(m.group(1)))

    def handle_error(self, request, client_address) -> None:
        """Whatever escaped a handler (a client gone mid-reply, a malformed request line): one line at most."""
        e = sys.exc_info()[1]
        if not isinstance(e, (ConnectionError, TimeoutError)):
            report(e, "a request", self.verbose)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{_bracket(host)}:{port}"

    def start(self) -> "UiServer":
        """Serve in a background thread (tests, notebooks); `stop()` ends it."""
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.shutdown()
        self.server_close()
        if self.thread is not None:
            self.thread.join(timeout)


def make_server(host: str = "127.0.0.1", port: int = 7860, model: str | Path | None = None,
                loras: list[str] | None = None, out_dir: str | Path = "cogtune_ui",
                pipeline_options: dict[str, Any] | None = None, verbose: bool = False,
                request_timeout: float = 10.0) -> UiServer:
    """A server (not yet serving: call `.start()` or `.serve_forever()`); port 0 picks a free port."""
    if not 0 <= port <= 65535:
        raise CogtuneError(f"--port {port}: a port is a number from 1 to 65535 (0 picks a free one)")
    generator = Generator(out_dir, pipeline_options)
    try:
        return UiServer(host, port, generator, str(model or ""), loras, verbose, request_timeout)
    except OSError as e:
        raise CogtuneError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port") from None


