"""`cogtune ui`: a small local web page for generating (and comparing) videos. Standard library only.

One job runs at a time in a worker thread; the page polls `/api/status` for progress. The last pipeline (model,
dtype and loaded adapters) is kept between jobs, so a new prompt or adapter weight does not reload any weights.
Endpoints: `GET /` (the page), `POST /api/generate` (JSON), `GET /api/status`, `GET /files/<name>` (outputs).
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import math
import re
import sys
import threading
import traceback
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..errors import CogtuneError
from .generate import (LoraSpec, Settings, activate_adapters, add_sampling_args, build_pipeline, load_image,
                       parse_loras, resolve_settings, sample)

MAX_BODY = 32 * 1024 * 1024  # an uploaded first frame, base64-encoded
FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.(mp4|png)$")


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
        """Check the form (CogtuneError: one line for the page), then start the job. RuntimeError if one is running."""
        with self._submitting:  # two quick clicks must not both pass the busy check
            return self._submit(form)

    def _submit(self, form: dict[str, Any]) -> int:
        with self.lock:
            if self.job and self.job.state in ("queued", "loading", "running"):
                raise RuntimeError(f"job {self.job.id} is still running")
            self._count += 1
            job = Job(self._count)
        model = str(form.get("model") or "").strip()
        if not model:
            raise CogtuneError("give a model folder")
        lines = [l.strip() for l in str(form.get("loras") or "").splitlines() if l.strip()]
        specs = parse_loras(lines)
        image = self._save_image(form.get("image"), job.id)
        settings = resolve_settings(model, Settings(
            prompt=str(form.get("prompt") or ""), negative_prompt=str(form.get("negative_prompt") or ""), image=image,
            frames=_int(form, "frames"), height=_int(form, "height"), width=_int(form, "width"),
            steps=_int(form, "steps", 50), seed=_int(form, "seed", 0),
            guidance_scale=_float(form, "guidance_scale", 6.0)))
        compare = bool(form.get("compare"))
        if compare and not specs:
            raise CogtuneError("compare needs at least one adapter")
        with self.lock:
            self.job = job
            self.worker = threading.Thread(target=self._run, args=(job, model, specs, settings, compare),
                                           name=f"cogtune-ui-job-{job.id}", daemon=True)
            self.worker.start()
        return job.id

    def _save_image(self, data_url: Any, job_id: int) -> Path | None:
        if not data_url:
            return None
        try:
            payload = str(data_url).split(",", 1)[-1]  # "data:image/png;base64,...."
            path = self.out_dir / f"job{job_id}-image"
            path.write_bytes(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise CogtuneError("the uploaded image is not valid base64 data") from None
        try:
            load_image(path, 16, 16)
        except CogtuneError:
            path.unlink()
            raise CogtuneError("the uploaded first frame is not an image file (use PNG, JPEG or WebP)") from None
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
            self._update(job, state="error", message=str(e))
        except Exception as e:  # the page shows one line; the traceback goes to the server's terminal
            traceback.print_exc()
            self._update(job, state="error", message=f"{e.__class__.__name__}: {e}")


def _field(form: dict, key: str) -> str:
    return "" if form.get(key) is None else str(form.get(key)).strip()


def _int(form: dict, key: str, default: int | None = None) -> int | None:
    value = _field(form, key)  # an empty field: `default` (0 is a value the checks judge)
    try:
        return int(value) if value else default
    except ValueError:
        raise CogtuneError(f"{key}: {value!r} is not a whole number") from None


def _float(form: dict, key: str, default: float) -> float:
    value = _field(form, key)
    try:
        number = float(value) if value else default
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise CogtuneError(f"{key}: {value!r} is not a number")
    return number


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
f.onsubmit=async e=>{e.preventDefault();const d=Object.fromEntries(new FormData(f));d.compare=f.compare.checked;
d.image=f.image.files.length?await asDataUrl(f.image.files[0]):null;go.disabled=true;res.innerHTML='';
const r=await fetch('/api/generate',{method:'POST',headers:{'Content-Type':'application/json'},body:JSON.stringify(d)});
const j=await r.json();if(!r.ok){st.textContent='error: '+j.error;go.disabled=false;return}poll()};
async function poll(){const j=await (await fetch('/api/status')).json();
if(j.state=='done'){bar.hidden=true;st.textContent='done (job '+j.id+')';go.disabled=false;
res.innerHTML='<video controls autoplay loop src="'+j.video+'?'+j.id+'"></video>'+
(j.sheet?'<p><a href="'+j.sheet+'">contact sheet</a></p>':'');return}
if(j.state=='error'){bar.hidden=true;st.textContent='error: '+j.message;go.disabled=false;return}
bar.hidden=false;bar.max=Math.max(1,j.steps*j.runs);bar.value=(j.run-1)*j.steps+j.step;
st.textContent=j.state+(j.runs>1?' run '+j.run+'/'+j.runs+' ('+j.message+')':'')+' step '+j.step+'/'+j.steps;
setTimeout(poll,500)}
</script></body></html>"""


class Handler(BaseHTTPRequestHandler):
    server: "UiServer"

    def log_message(self, format: str, *args) -> None:  # quiet: the status endpoint is polled twice a second
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, data: dict) -> None:
        self._send(code, json.dumps(data).encode(), "application/json")

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/":
            page = PAGE % {"model": html.escape(self.server.model), "loras": html.escape("\n".join(self.server.loras))}
            self._send(200, page.encode(), "text/html; charset=utf-8")
        elif path == "/api/status":
            self._json(200, self.server.generator.status())
        elif path.startswith("/files/") and FILE_NAME.match(name := path[len("/files/"):]):
            self._file(self.server.generator.out_dir / name)
        else:
            self._json(404, {"error": f"no such page: {path}"})

    do_HEAD = do_GET

    def _file(self, file: Path) -> None:
        if not file.is_file():
            return self._json(404, {"error": f"no such file: {file.name}"})
        data = file.read_bytes()
        kind = "video/mp4" if file.suffix == ".mp4" else "image/png"
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if m and (m.group(1) or m.group(2)):  # Safari plays <video> only with range requests
            start = int(m.group(1)) if m.group(1) else max(0, len(data) - int(m.group(2)))
            end = min(len(data) - 1, int(m.group(2))) if m.group(1) and m.group(2) else len(data) - 1
            return self._send(206, data[start:end + 1], kind,
                              {"Content-Range": f"bytes {start}-{end}/{len(data)}", "Accept-Ranges": "bytes"})
        self._send(200, data, kind, {"Accept-Ranges": "bytes"})

    def do_POST(self) -> None:
        if self.path != "/api/generate":
            return self._json(404, {"error": f"no such endpoint: {self.path}"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self._json(413, {"error": f"request over {MAX_BODY // 2**20} MiB; use a smaller image"})
        try:
            form = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(form, dict):
                raise ValueError("not an object")
            job = self.server.generator.submit(form)
        except (ValueError, json.JSONDecodeError) as e:
            return self._json(400, {"error": f"bad request body: {e}"})
        except CogtuneError as e:
            return self._json(400, {"error": str(e)})
        except RuntimeError as e:
            return self._json(409, {"error": str(e)})
        self._json(202, {"job": job})


class UiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, generator: Generator, model: str = "", loras: list[str] | None = None,
                 verbose: bool = False):
        super().__init__((host, port), Handler)
        self.generator, self.model, self.loras, self.verbose = generator, model, list(loras or []), verbose
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

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
                pipeline_options: dict[str, Any] | None = None, verbose: bool = False) -> UiServer:
    """A server (not yet serving: call `.start()` or `.serve_forever()`); port 0 picks a free port."""
    if not 0 <= port <= 65535:
        raise CogtuneError(f"--port {port}: a port is a number from 1 to 65535 (0 picks a free one)")
    generator = Generator(out_dir, pipeline_options)
    try:
        return UiServer(host, port, generator, str(model or ""), loras, verbose)
    except OSError as e:
        raise CogtuneError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port") from None


def _cmd_ui(args) -> None:
    options = dict(dtype=args.dtype, cpu_offload=args.cpu_offload, vae_tiling=args.vae_tiling,
                   vae_slicing=args.vae_slicing)
    server = make_server(args.host, args.port, args.model, args.lora, args.out_dir, options, verbose=args.debug)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach it can run jobs and read model folders",
              file=sys.stderr)
    print(f"cogtune ui at {server.url} (outputs in {Path(args.out_dir).resolve()}); Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


def register_cli(subparsers) -> None:
    """`cogtune ui`: the local web page."""
    u = subparsers.add_parser("ui", help="a small local web page to generate and compare videos")
    u.add_argument("--model", help="model folder to prefill")
    add_sampling_args(u)
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--out-dir", default="cogtune_ui", help="where videos are written")
    u.set_defaults(func=_cmd_ui)
