"""CLI skeleton, one-line user errors, atomic checkpoints and TOML config merging."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from daamkit.cli.app import new_app
from daamkit.cli.main import app, main
from daamkit.infra import checkpoint
from daamkit.infra.config_file import read_toml
from daamkit.infra.cpu_memory import reuse_freed_memory, user_chose_allocator
from daamkit.infra.errors import DaamkitError
from daamkit.infra.local_weights import resolve_hf_model

runner = CliRunner()


def test_help_lists_sub_apps():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("info", "vqvae", "classify"):
        assert name in result.output


def test_help_keeps_the_default_notes_in_brackets():
    """`[default: ...]` in a help text is shown, not swallowed as a Rich style tag."""
    result = runner.invoke(app, ["classify", "train", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "[default: mix on your own data; conv on iemocap/agnews/cifar100]" in result.output
    result = runner.invoke(app, ["vqvae", "compare", "--help"], env={"COLUMNS": "300"})
    assert "(OUT/VARIANT-seedK/, e.g. daam-seed0/)" in result.output


def test_info_reports_versions_and_offline_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["torch"] == torch.__version__
    assert report["device"] == "cpu" or report["device"].startswith(("cuda", "mps"))
    assert report["lpips_trunk_weights"]["alex"]["present"] is False
    assert report["lpips_trunk_weights"]["alex"]["path"].startswith(str(tmp_path / "torch"))
    assert report["huggingface_models"] == ["org/tiny"]
    assert resolve_hf_model("org/tiny") == snapshot
    text = runner.invoke(app, ["info"]).output
    assert "lpips alex    missing" in text and "org/tiny" in text
    assert report["fid_inception_weights"] == {
        "path": str(tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"),
        "present": False}
    assert "rfid inception missing" in text


def test_user_errors_are_one_line_and_nonzero():
    demo = new_app("demo")

    @demo.command()
    def fail() -> None:
        raise DaamkitError("checkpoint runs/x has no config.json")

    @demo.command()
    def other() -> None:
        """A second command so Typer keeps sub-command names."""

    result = runner.invoke(demo, ["fail"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: checkpoint runs/x has no config.json"
    assert "Traceback" not in result.output


def test_ctrl_c_that_reaches_the_cli_is_one_line_and_exit_130():
    demo = new_app("demo")

    @demo.command()
    def stop() -> None:
        raise KeyboardInterrupt

    @demo.command()
    def other() -> None:
        """A second command so Typer keeps sub-command names."""

    result = runner.invoke(demo, ["stop"])
    assert result.exit_code == 130
    assert result.stderr.startswith("interrupted (Ctrl-C): files already written are kept") and "Traceback" not in result.output


def test_unknown_command_fails():
    assert runner.invoke(app, ["nonsense"]).exit_code != 0


def test_the_command_leaves_its_process_group_before_exit(tmp_path, monkeypatch):
    """A torchrun worker exits with its process group torn down (left to the interpreter, gloo's threads
    can abort a command that has succeeded)."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    monkeypatch.setattr("sys.argv", ["daamkit", "info", "--json"])
    with pytest.raises(SystemExit) as finished:
        main()
    assert finished.value.code == 0
    assert not dist.is_initialized()


HEAP_SCRIPT = """
import ctypes, sys, torch
from daamkit.infra.cpu_memory import reuse_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = sys.argv[1] == "reuse" and reuse_freed_memory()
size = 16 * 2**20
tensor = torch.empty(size // 4)  # a step's temporary
mapped = libc.mallinfo2().hblkhd >= size  # mmap'ed on its own
del tensor
unmapped = libc.mallinfo2().hblkhd < size  # given back to the kernel: the next one is paged in again
kept = libc.mallinfo2().fordblks >= size  # free in the heap, ready for the next step's tensor
print(applied, mapped, unmapped, kept)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_cpu_training_keeps_freed_tensor_memory_for_the_next_step():
    """glibc's defaults map a 16 MiB tensor on its own and unmap it when freed (the next one is paged in again);
    with `reuse_freed_memory` it comes from the heap and stays there, free, when freed."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_") and name != "LD_PRELOAD"}
    seen = {}
    for mode in ("defaults", "reuse"):
        done = subprocess.run([sys.executable, "-c", HEAP_SCRIPT, mode], env=env, capture_output=True, text=True,
                              check=True)
        seen[mode] = done.stdout.split()
    assert seen["defaults"][:3] == ["False", "True", "True"]
    assert seen["reuse"] == ["True", "False", "True", "True"]


def test_a_configured_allocator_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert user_chose_allocator() and not reuse_freed_memory()


def test_missing_hf_model_names_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(DaamkitError, match="neither a local folder nor in the Hugging Face cache"):
        resolve_hf_model("microsoft/wavlm-large")


def test_checkpoint_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    state = {"step": 7, "rng": torch.get_rng_state()}
    checkpoint.save_checkpoint(tmp_path / "last", model.state_dict(), {"width": 3}, state)
    assert checkpoint.load_config(tmp_path / "last") == {"width": 3}
    restored = torch.nn.Linear(3, 2)
    checkpoint.load_state_dict_strict(restored, checkpoint.load_weights(tmp_path / "last"), "last")
    assert torch.equal(restored.weight, model.weight)
    assert checkpoint.load_training_state(tmp_path / "last")["step"] == 7
    with pytest.raises(DaamkitError, match="does not fit"):
        checkpoint.load_state_dict_strict(torch.nn.Linear(4, 2), checkpoint.load_weights(tmp_path / "last"), "last")


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    checkpoint.save_checkpoint(tmp_path / "last", model.state_dict(), {"version": 1})

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_save)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(tmp_path / "last", model.state_dict(), {"version": 2})
    assert checkpoint.load_config(tmp_path / "last") == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_missing_checkpoint_files_are_user_errors(tmp_path):
    with pytest.raises(DaamkitError, match="config.json is missing"):
        checkpoint.load_config(tmp_path)
    with pytest.raises(DaamkitError, match="model.safetensors is missing"):
        checkpoint.load_weights(tmp_path)


def test_toml_config_is_read_with_option_names_and_types(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('steps = 500\nbatch-size = 16\nlr = 1\n')
    values = read_toml(config, {"steps": int, "batch_size": int, "lr": float})
    assert values == {"steps": 500, "batch_size": 16, "lr": 1.0} and isinstance(values["lr"], float)
    config.write_text('lr = "fast"\n')
    with pytest.raises(DaamkitError, match="`lr` must be a number, got 'fast'"):
        read_toml(config, {"lr": float})
    config.write_text("stepz = 5\n")
    with pytest.raises(DaamkitError, match="unknown option"):
        read_toml(config, {"steps"})
    config.write_text("steps = [\n")
    with pytest.raises(DaamkitError, match="not valid TOML"):
        read_toml(config, {"steps"})
    with pytest.raises(DaamkitError, match="does not exist"):
        read_toml(tmp_path / "missing.toml", {"steps"})
    with pytest.raises(DaamkitError, match="is a folder"):
        read_toml(tmp_path, {"steps"})


def test_atomic_json_is_readable_by_others(tmp_path):
    checkpoint.atomic_write_json(tmp_path / "manifest.json", {"a": 1})
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~checkpoint._UMASK
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"a": 1}
