"""`cogtune ui`: the Gradio page over ui_jobs.Studio.

Gradio gives the page, the progress bar, the queue and an API client (`gradio_client`) for free; everything a job
does lives in ui_jobs.py. Errors are one line in the page, with the page's field names instead of the CLI's flags.
"""

import os
import re
import sys
import traceback
from pathlib import Path

from ..errors import CogtuneError, one_line
from .ui_jobs import Cancelled, Pick, Request, Studio

SLOTS = 4  # adapter rows on the page; compare shows base, each adapter and all together (6 players)
NONE = ""
EXAMPLES = ["a red fox trotting through fresh snow at dawn, cinematic, shallow depth of field",
            "a paper boat drifting down a rain-filled street gutter, close-up",
            "timelapse of clouds rolling over a mountain ridge, golden hour"]
FIELDS = {"--image PATH": "a first frame (the First frame box)", "--image": "First frame", "--frames": "Frames",
          "--height/--width": "Height/Width", "--height": "Height", "--width": "Width", "--steps": "Steps",
          "--guidance-scale": "Guidance", "--seed": "Seed", "--lora ...@": "adapter name ", "--lora": "adapter",
          "--compare": "Compare", "--dtype": "dtype (a `cogtune ui` option)"}
SYNC_JS = """() => { const vs = [...document.querySelectorAll('#compare-grid video')];
  vs.forEach(v => { v.pause(); v.currentTime = 0; }); vs.forEach(v => v.play()); }"""


def page_text(message: str) -> str:
    """A CLI message in the page's words: `--frames 10: ...` becomes `Frames 10: ...`."""
    for flag in sorted(FIELDS, key=len, reverse=True):
        message = message.replace(flag, FIELDS[flag])
    return one_line(re.sub(r"drop (Height/Width|First frame)", r"clear \1", message))


def _number(value, what: str, whole: bool = True):
    if value is None or value == "":
        return None
    number = float(value)
    if whole and number != int(number):
        raise CogtuneError(f"{what} {value}: give a whole number")
    return int(number) if whole else number


def build_app(studio: Studio, model: Path | None = None, loras: list[Pick] | None = None, debug: bool = False):
    import gradio as gr

    lib = studio.library
    loras = list(loras or [])

    def model_choices():
        return [(lib.label(p), str(p)) for p in lib.models()]

    def lora_choices():
        return [("(none)", NONE)] + [(lib.label(p), str(p)) for p in lib.loras()]

    def on_model(value):
        if not value:
            return gr.update(visible=False), "Choose a model.", gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            d = studio.defaults(lib.model(value))
        except CogtuneError as e:
            raise gr.Error(page_text(str(e)))
        kind = "image-to-video: give a first frame" if d["i2v"] else "text-to-video"
        size = "its native size only" if d["fixed_resolution"] else f"sizes in multiples of {d['size_multiple']}"
        info = f"**{d['variant']}** — {kind}; {d['frames']} frames at {d['height']}×{d['width']}, {d['fps']} fps; {size}."
        return (gr.update(visible=d["i2v"]), info, d["frames"], d["height"], d["width"], d["guidance_scale"])

    def request(compare, model_v, prompt, negative, image, seed, steps, guidance, frames, height, width, *slots):
        picks = []
        for i in range(SLOTS):
            path, weight, name = slots[3 * i:3 * i + 3]
            if path:
                picks.append(Pick(Path(path), float(weight if weight is not None else 1.0), (name or "").strip()))
        seed, steps = _number(seed, "Seed"), _number(steps, "Steps")
        return Request(model=Path(model_v or ""), prompt=prompt or "", adapters=picks, negative_prompt=negative or "",
                       image=Path(image) if image else None, seed=None if seed is None or seed < 0 else seed,
                       steps=50 if steps is None else steps, guidance_scale=_number(guidance, "Guidance", whole=False),
                       frames=_number(frames, "Frames"), height=_number(height, "Height"),
                       width=_number(width, "Width"), compare=compare)

    def results(record):
        out = studio.out_dir
        singles = record.get("videos", []) if record["kind"] == "compare" else []
        grid = [gr.update(value=str(out / v["file"]), label=v["label"], visible=True) for v in singles[:SLOTS + 2]]
        grid += [gr.update(value=None, visible=False)] * (SLOTS + 2 - len(grid))
        names = ", ".join(f"{a['name']} ×{a['weight']:g}" for a in record["adapters"]) or "no adapters"
        status = (f"Done: **{record['video']}** — seed **{record['seed']}**, {record['steps']} steps, "
                  f"{record['frames']}×{record['height']}×{record['width']}, {names}.")
        sheet = str(out / record["sheet"]) if record.get("sheet") else None
        return [status, str(out / record["video"]), gr.update(visible=bool(singles)), *grid,
                gr.update(value=sheet, visible=sheet is not None), record["command"], record, history()]

    def job(compare, *values, progress=gr.Progress()):
        def on_progress(done, total, text):
            progress((done, total), desc=text, unit="steps")
        try:
            record = studio.run(request(compare, *values), on_progress)
        except Cancelled as e:
            return [f"**Cancelled**: {e}", *[gr.skip()] * (len(outputs) - 1)]
        except CogtuneError as e:
            raise gr.Error(page_text(str(e)), print_exception=False) from None
        except ValueError as e:  # a number field Gradio let through as text
            raise gr.Error(page_text(one_line(str(e))), print_exception=False) from None
        except Exception as e:  # a bug of ours or a library's: one line here, more on the terminal
            if debug:
                traceback.print_exception(e)
            print(f"cogtune ui: internal error: {type(e).__name__}: {one_line(str(e))}", file=sys.stderr, flush=True)
            raise gr.Error(f"internal error: {type(e).__name__}: {one_line(str(e))[:300]} (the terminal has more)",
                           print_exception=False) from None
        return results(record)

    def history():
        return [(str(studio.out_dir / r["video"]), f"{r['created'][:19]} · seed {r['seed']} · {r['prompt'][:60]}")
                for r in studio.history()]

    def pick_earlier(evt: gr.SelectData):
        records = studio.history()
        if not 0 <= evt.index < len(records):
            return gr.skip(), gr.skip(), gr.skip()
        r = records[evt.index]
        return str(studio.out_dir / r["video"]), r["command"], r

    def cancel():
        return "Cancelling at the next step…" if studio.cancel() else "Nothing is running."

    def refresh():
        return [gr.update(choices=model_choices())] + [gr.update(choices=lora_choices())] * SLOTS + [history()]

    def arrived():  # a reload (or a second tab) while a job runs: say so instead of an empty page
        if studio.busy():
            return "A job is running (started before this page loaded): its video appears under *Earlier outputs*."
        return ""

    first = str(model) if model else (model_choices()[0][1] if model_choices() else None)
    # Gradio keeps a copy of every video it serves; the outputs themselves stay in the output folder
    with gr.Blocks(title="cogtune", delete_cache=(3600, 86400)) as app:
        gr.Markdown("## cogtune — generate videos and compare your adapters")
        with gr.Row():
            with gr.Column(scale=5):
                with gr.Row():
                    model_dd = gr.Dropdown(model_choices(), value=first, label="Model", elem_id="model", scale=5)
                    refresh_btn = gr.Button("Rescan folders", elem_id="refresh", scale=1, size="sm")
                model_info = gr.Markdown(elem_id="model-info")
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                image = gr.Image(type="filepath", label="First frame", sources=["upload", "clipboard"],
                                 elem_id="image", visible=False, height=240)
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    compare = gr.Button("Compare base and adapters", elem_id="compare")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                status = gr.Markdown(elem_id="status")
                slots = []
                with gr.Accordion("Adapters (LoRA): file, weight, name", open=True):
                    for i in range(SLOTS):
                        pre = loras[i] if i < len(loras) else None
                        with gr.Row(equal_height=True):
                            slots.append(gr.Dropdown(lora_choices(), value=str(pre.path) if pre else NONE,
                                                     show_label=False, elem_id=f"lora{i}", scale=4))
                            slots.append(gr.Slider(-2, 2, value=pre.weight if pre else 1.0, step=0.05,
                                                   show_label=False, elem_id=f"weight{i}", scale=2))
                            slots.append(gr.Textbox(value=pre.name if pre else "", show_label=False,
                                                    placeholder="name (from the file)", elem_id=f"name{i}", scale=1))
                with gr.Accordion("Settings (the model's own by default)", open=True):
                    with gr.Row():
                        seed = gr.Number(-1, label="Seed (-1: random)", precision=0, elem_id="seed")
                        steps = gr.Number(50, label="Steps", precision=0, elem_id="steps")
                        guidance = gr.Number(6.0, label="Guidance", elem_id="guidance")
                    with gr.Row():
                        frames = gr.Number(label="Frames", precision=0, elem_id="frames")
                        height = gr.Number(label="Height", precision=0, elem_id="height")
                        width = gr.Number(label="Width", precision=0, elem_id="width")
                gr.Examples([[e] for e in EXAMPLES], inputs=[prompt], label="Example prompts")
            with gr.Column(scale=6):
                video = gr.Video(label="Video", elem_id="video", autoplay=True, loop=True, buttons=["download"],
                                 interactive=False)
                with gr.Group(visible=False, elem_id="compare-grid") as grid_box:
                    sync = gr.Button("Play all from the start", size="sm", elem_id="sync")
                    grid = []
                    for row in range(2):  # base, each adapter, all together: three to a row, each its own player
                        with gr.Row():
                            grid += [gr.Video(visible=False, autoplay=True, loop=True, buttons=["download"],
                                              interactive=False, elem_id=f"grid{i}", min_width=160, height=200)
                                     for i in range(3 * row, 3 * row + 3)]
                sheet = gr.Image(label="Contact sheet", visible=False, elem_id="sheet", interactive=False)
                command = gr.Code(label="Reproduce with (run in the output folder)", language="shell",
                                  elem_id="command", interactive=False, lines=3, max_lines=8)
                with gr.Accordion("Record of this video (also beside it as .json)", open=False):
                    record = gr.JSON(elem_id="record", show_label=False)
        with gr.Accordion(f"Earlier outputs in {studio.out_dir}", open=True):
            gallery = gr.Gallery(history(), columns=4, height=360, elem_id="gallery", allow_preview=False,
                                 interactive=False)
        inputs = [model_dd, prompt, negative, image, seed, steps, guidance, frames, height, width, *slots]
        outputs = [status, video, grid_box, *grid, sheet, command, record, gallery]
        go.click(lambda *v, progress=gr.Progress(): job(False, *v, progress=progress), inputs, outputs,
                 concurrency_id="job", concurrency_limit=1, api_name="generate")
        compare.click(lambda *v, progress=gr.Progress(): job(True, *v, progress=progress), inputs, outputs,
                      concurrency_id="job", concurrency_limit=1, api_name="compare")
        stop.click(cancel, None, status, queue=False, api_name="cancel")
        sync.click(None, js=SYNC_JS)
        gallery.select(pick_earlier, None, [video, command, record], api_name=False)
        model_dd.change(on_model, model_dd, [image, model_info, frames, height, width, guidance], api_name=False)
        refresh_btn.click(refresh, None, [model_dd, *slots[0::3], gallery], api_name=False)
        app.load(arrived, None, status, api_name=False, queue=False)
        app.load(on_model, model_dd, [image, model_info, frames, height, width, guidance], api_name=False)
    return app


def launch(studio: Studio, host: str, port: int, model: Path | None = None, loras: list[Pick] | None = None,
           share: bool = False, debug: bool = False):
    """Start the server without blocking; returns the Blocks (call `.close()` to stop) and its URL."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    app = build_app(studio, model, loras, debug)
    app.queue(default_concurrency_limit=1)
    try:
        _, url, _ = app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                               allowed_paths=[str(studio.out_dir.resolve())], ssr_mode=False, quiet=True,
                               show_error=True, footer_links=["api", "gradio"])
    except OSError as e:
        raise CogtuneError(f"--host {host} --port {port}: cannot listen there ({one_line(str(e))}); "
                           "pick another --port") from None
    return app, url
