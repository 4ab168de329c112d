"""The `daamkit` command: root Typer app, `info`, and the `vqvae` / `classify` sub-apps."""

from __future__ import annotations

import json
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

import typer

from daamkit import __version__
from daamkit.cli import classify, vqvae
from daamkit.cli.app import new_app
from daamkit.infra.local_weights import (FID_INCEPTION_FILE, LPIPS_TRUNK_FILES, cached_hf_models, hf_hub_cache_dir,
                                        lpips_trunk_path, torch_hub_checkpoints_dir)

app = new_app("daamkit: Density Adaptive Attention toolkit (DAAM core, DAAM VQ-VAE, DAT classifiers).")
app.add_typer(vqvae.app, name="vqvae")
app.add_typer(classify.app, name="classify")


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment_report() -> dict:
    """Versions, compute device and which pretrained weights are present in the local caches."""
    import torch

    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = "mps"
    else:
        device = "cpu"
    fid_path = torch_hub_checkpoints_dir() / FID_INCEPTION_FILE
    return {
        "daamkit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _package_version("torchvision"),
        "transformers": _package_version("transformers"),
        "accelerate": _package_version("accelerate"),
        "device": device,
        "lpips_trunk_weights": {
            net: {"path": str(lpips_trunk_path(net)), "present": lpips_trunk_path(net).is_file()}
            for net in LPIPS_TRUNK_FILES
        },
        "fid_inception_weights": {"path": str(fid_path), "present": fid_path.is_file()},
        "huggingface_cache": str(hf_hub_cache_dir()),
        "huggingface_models": cached_hf_models(),
    }


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text.")) -> None:
    """Show versions, the compute device, and which LPIPS / rFID / Hugging Face weights are available offline."""
    report = environment_report()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for key in ("daamkit", "python", "torch", "torchvision", "transformers", "accelerate", "device"):
        typer.echo(f"{key:<13} {report[key] or 'not installed'}")
    for net, entry in report["lpips_trunk_weights"].items():
        state = "present" if entry["present"] else "missing"
        typer.echo(f"lpips {net:<7} {state}: {entry['path']}")
    fid = report["fid_inception_weights"]
    typer.echo(f"rfid inception {'present' if fid['present'] else 'missing'}: {fid['path']}")
    models = report["huggingface_models"]
    typer.echo(f"hf cache      {report['huggingface_cache']}: {len(models)} model(s)")
    for name in models:
        typer.echo(f"  - {name}")


def _leave_process_group() -> None:
    """Tear down a torchrun / `accelerate launch` process group before the interpreter exits: left to exit,
    its gloo worker threads can abort the process (SIGABRT, "terminate called without an active
    exception") after the command itself has succeeded. A command that never imported torch has none."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    finally:
        _leave_process_group()


if __name__ == "__main__":
    main()
