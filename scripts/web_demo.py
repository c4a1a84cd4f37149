"""A web page to try STARFlow models in a browser: a caption in, an image or a video out (Gradio).

    python -m scripts.web_demo                                   # the bundled image and video models
    python -m scripts.web_demo --checkpoint logs/run/model.safetensors --port 7860

One tab per checkpoint: caption, guidance scale, seed, aspect ratio (models trained with mixed aspect ratios), for
video models the number of frames and an optional first frame (image-to-video); the output with the time and
settings used.  Each model is loaded on its first request and kept (utils.pipeline.STARFlowPipeline), so later
requests are faster.  Everything runs on this machine: no share link, no analytics, no fonts or scripts from the
internet.  Settings the model cannot make are a message in the page.
"""
import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from utils.config import ConfigError, Parser, device_name, number, run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = [ROOT / "ckpts" / "starflow_shapes_t2i_32x32.safetensors", ROOT / "ckpts" / "starflow-v_shapes_t2v_32x32.safetensors"]
EXAMPLES = {"image": "a big red circle in the middle", "video": "a blue square moving to the right"}
# Samples of small models are shown at the output's size, and stay sharp.
CSS = ("#image-output img, #video-output video { width: 100%; height: 100%; object-fit: contain; "
       "image-rendering: pixelated; }")


class Models:
    """Pipelines by checkpoint, each loaded on its first use (one at a time) and kept."""

    def __init__(self, checkpoints: list[Path], device: str | None):
        self.checkpoints, self.device = checkpoints, device
        self.loaded, self.lock = {}, threading.Lock()

    def get(self, checkpoint: Path):
        from utils.pipeline import STARFlowPipeline

        with self.lock:
            if checkpoint not in self.loaded:
                pipe = STARFlowPipeline.from_pretrained(checkpoint, device=self.device)
                pipe.set_progress_bar_config(disable=True)
                self.loaded[checkpoint] = pipe
            return self.loaded[checkpoint]


def describe(checkpoint: Path) -> dict:
    """What a tab needs before the model is loaded: kind, trained frames, aspect ratios, default guidance scale."""
    from dataset import parse_vid_size
    from utils.config import ASPECT_RATIOS
    from utils.model_setup import stored_metadata

    run = stored_metadata(checkpoint).get("run", {})
    frames, _ = parse_vid_size(run.get("vid_size"))
    return {"video": frames > 1, "frames": frames, "ratios": ASPECT_RATIOS if run.get("mix_aspect") else ["1:1"],
            "guidance": float(run.get("cfg", 5) or 0)}


def generate(models: Models, checkpoint: Path, caption, guidance, seed, ratio, frames, first_frame, progress):
    """One request: (image or video file, a line with the time and settings).  Bad settings raise gr.Error."""
    import gradio as gr

    from utils.media import save_video

    caption = (caption or "").strip()
    if not caption:
        raise gr.Error("Enter a caption first.")
    if seed is None or seed < 0 or seed != int(seed):
        raise gr.Error(f"The seed must be a whole number from 0, got {seed}.")
    start = time.perf_counter()
    loading = checkpoint not in models.loaded
    progress(0, desc="loading the model" if loading else "sampling")
    try:
        pipe = models.get(checkpoint)
        loaded = time.perf_counter() - start if loading else None
        video = pipe.trained_frames > 1
        out = pipe(caption, guidance_scale=float(guidance), seed=int(seed), aspect_ratio=ratio,
                   num_frames=int(frames) if video and frames and int(frames) != pipe.trained_frames else None,
                   image=first_frame if video else None,
                   callback=lambda info: progress((info["blocks_done"] + info["tokens"] / info["total"])
                                                  / info["blocks"], desc="sampling"))
    except (ConfigError, ValueError, FileNotFoundError) as err:
        raise gr.Error(str(err)) from None
    seconds = time.perf_counter() - start
    if video:
        path = save_video(out.as_uint8()[0], Path(tempfile.mkdtemp(prefix="starflow-")) / "sample.mp4", out.fps)
        result, size = str(path), f"{len(out.frames[0])} frames of {out.frames[0][0].width}x{out.frames[0][0].height}"
    else:
        result, size = out.images[0], f"{out.images[0].width}x{out.images[0].height}"
    info = (f"{seconds:.2f} s on {pipe.device}{f' (loading the model: {loaded:.1f} s)' if loaded else ''} · "
            f"seed {int(seed)} · guidance {float(guidance):g} · {size}"
            f"{f' · aspect ratio {ratio}' if ratio and ratio != '1:1' else ''} · {checkpoint.name}")
    return result, info


def build_page(checkpoints: list[Path], models: Models):
    import gradio as gr

    with gr.Blocks(title="STARFlow", analytics_enabled=False) as page:
        gr.Markdown("# STARFlow\nA normalizing flow turns your caption into an image or a video, on this machine.")
        for checkpoint in checkpoints:
            facts = describe(checkpoint)
            key = "video" if facts["video"] else "image"
            with gr.Tab(f"{checkpoint.stem} ({key})"):
                with gr.Row():
                    with gr.Column():
                        caption = gr.Textbox(label="Caption", value=EXAMPLES[key], lines=2, elem_id=f"{key}-caption")
                        guidance = gr.Slider(0, 10, value=facts["guidance"], step=0.5, label="Guidance scale",
                                             elem_id=f"{key}-guidance")
                        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id=f"{key}-seed")
                        ratio = gr.Dropdown(facts["ratios"], value="1:1", label="Aspect ratio",
                                            interactive=len(facts["ratios"]) > 1, elem_id=f"{key}-ratio")
                        frames = gr.Number(value=facts["frames"], precision=0, minimum=1, label="Frames",
                                           visible=facts["video"], elem_id=f"{key}-frames")
                        first = gr.Image(type="filepath", label="First frame (optional)", visible=facts["video"],
                                         sources=["upload"], elem_id=f"{key}-first-frame")
                        button = gr.Button("Generate", variant="primary", elem_id=f"{key}-generate")
                    with gr.Column():
                        output = gr.Video(label="Video", elem_id=f"{key}-output", height=320) if facts["video"] \
                            else gr.Image(label="Image", type="pil", format="png", elem_id=f"{key}-output",
                                          height=320)
                        info = gr.Markdown(elem_id=f"{key}-info")

                def run(caption, guidance, seed, ratio, frames, first, checkpoint=checkpoint,
                        progress=gr.Progress()):  # noqa: B008 (how Gradio passes a progress tracker)
                    return generate(models, checkpoint, caption, guidance, seed, ratio, frames, first, progress)

                button.click(run, [caption, guidance, seed, ratio, frames, first], [output, info])
    return page


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, nargs="+", default=BUNDLED,
                   help="exported .safetensors or training checkpoint folders, one tab each (default: the bundled "
                        "image and video models)")
    p.add_argument("--port", type=number(int, minimum=1, maximum=65535), default=7860, help="HTTP port")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    args = p.parse_args(argv)
    for checkpoint in args.checkpoint:
        if not checkpoint.exists():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file or folder")
    import gradio as gr

    page = build_page(args.checkpoint, Models(args.checkpoint, args.device))
    print(f"STARFlow web demo on http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
    page.queue().launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False,
                        mcp_server=False, show_error=True, quiet=True, css=CSS,
                        theme=gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                                font_mono=["ui-monospace", "monospace"]))


if __name__ == "__main__":
    run_cli(main)
