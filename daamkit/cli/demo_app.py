"""The Gradio page of `daamkit vqvae demo`: wiring only; every number and picture comes from
`daamkit.vqvae.demo.DemoModel.run`.

Local and offline by design: no share link, no telemetry (GRADIO_ANALYTICS_ENABLED=False is set before
Gradio is imported), server-side rendering off, and Gradio's default theme, whose fonts ship inside the
package, so the page needs nothing from the internet.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402 - after the telemetry switch above
import torch  # noqa: E402

from daamkit.infra.checkpoint import atomic_write_bytes  # noqa: E402
from daamkit.infra.errors import DaamkitError  # noqa: E402
from daamkit.vqvae.demo import GATE_LEGEND, NO_DAAM, DemoModel, DemoResult, write_sample_photos  # noqa: E402
from daamkit.vqvae.evaluate import side_by_side  # noqa: E402
from daamkit.vqvae.io import save_png  # noqa: E402

CROP, FULL = "crop", "full"
MAX_UPLOAD = "200mb"


def _outputs(result: DemoResult, stem: str, folder: Path) -> list:
    """The values of one checkpoint's output components, downloads written into `folder`."""
    tokens_path = folder / f"{stem}_tokens.npz"
    atomic_write_bytes(tokens_path, result.token_file)
    recon_path = save_png(folder / f"{stem}_reconstruction.png", result.reconstruction.reconstruction)
    pair = side_by_side(result.reconstruction.original, result.reconstruction.reconstruction)
    return [pair, result.metrics_line, result.token_image, result.gate_maps, [str(tokens_path), str(recon_path)]]


def build_app(models: Sequence[DemoModel]) -> gr.Blocks:
    """The demo page for one checkpoint, or two side by side (`--compare`)."""
    # sample photos and per-request downloads; removed when the app is garbage-collected or the process exits
    workdir = tempfile.TemporaryDirectory(prefix="daamkit-demo-")
    examples = write_sample_photos(Path(workdir.name) / "samples")
    sizes = sorted({m.image_size for m in models})
    crop_label = f"crop: the center {'/'.join(map(str, sizes))} px (training size)"

    def predict(upload: str | None, region: str, progress=gr.Progress()):
        if not upload:
            raise gr.Error("Upload an image or pick one of the examples first.")
        folder = Path(tempfile.mkdtemp(dir=workdir.name))
        stem = Path(upload).stem
        values = []
        for index, model in enumerate(models):
            def report(fraction: float, stage: str, index: int = index, model: DemoModel = model) -> None:
                progress((index + fraction) / len(models), desc=f"{model.path}: {stage}")

            try:
                result = model.run(upload, full=region == FULL, report=report)
            except DaamkitError as err:
                raise gr.Error(str(err)) from err
            except (MemoryError, torch.OutOfMemoryError) as err:
                raise gr.Error("out of memory on this image: try the crop or a smaller image") from err
            suffix = f"_{index + 1}" if len(models) > 1 else ""
            values += _outputs(result, stem + suffix, folder)
        progress(1.0, desc="done")
        return values

    # Gradio's own copies of uploads and outputs older than an hour are deleted every hour
    with gr.Blocks(title="daamkit VQ-VAE demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("## daamkit · DAAM VQ-VAE reconstruction demo\n"
                    "Upload an image (or pick an example), choose the region, and press **Reconstruct**.")
        with gr.Row():
            upload = gr.File(label="Image", type="filepath")
            with gr.Column():
                region = gr.Radio([(crop_label, CROP), ("full image (trimmed to the down-sampling factor)", FULL)],
                                  value=CROP, label="Region")
                button = gr.Button("Reconstruct", variant="primary")
        gr.Examples([[str(p)] for p in examples], inputs=[upload], label="Built-in sample photos")
        outputs: list[gr.components.Component] = []
        with gr.Row():
            for model in models:
                with gr.Column():
                    gr.Markdown(f"**{model.label}**")
                    outputs += [
                        gr.Image(label="original | reconstruction", type="numpy", format="png", interactive=False),
                        gr.Markdown(),
                        gr.Image(label="token ids (one colour per code)", type="numpy", format="png",
                                 interactive=False),
                    ]
                    gr.Markdown(GATE_LEGEND if model.has_daam else NO_DAAM)
                    outputs += [
                        gr.Gallery(label="DAAM gate entropy per block (caption: block, grid, range)",
                                   columns=4 if len(models) == 1 else 2, height="auto", object_fit="contain",
                                   visible=model.has_daam, format="png"),
                        gr.File(label="downloads: tokens (.npz for `daamkit vqvae decode`) and reconstruction (PNG)",
                                file_count="multiple", interactive=False),
                    ]
        button.click(predict, inputs=[upload, region], outputs=outputs, api_name="reconstruct")
    app.daamkit_workdir = workdir  # lives as long as the page
    return app


def serve(checkpoints: Sequence[str | Path], host: str, port: int, raw_weights: bool = False,
          lpips_weights: str | Path | None = None) -> tuple[gr.Blocks, str]:
    """Load the checkpoints (their weight-EMA weights where saved, unless `raw_weights`) and start the page on
    `host:port` in a background thread; returns it and its URL (`app.block_thread()` then serves until
    interrupted, `app.close()` stops it)."""
    models = [DemoModel(path, raw_weights=raw_weights, lpips_weights=lpips_weights) for path in checkpoints]
    app = build_app(models)
    try:
        app.queue().launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True,
                           ssr_mode=False, max_file_size=MAX_UPLOAD, footer_links=["settings"])
    except OSError as err:  # port taken, address not on this machine
        raise DaamkitError(f"cannot listen on {host}:{port} (in use or not an address of this machine); "
                           "choose another `port` or `host`") from err
    return app, f"http://{host}:{port}/"
