"""A file whose decoding kills the Python worker (as YARN or a cgroup's OOM killer does) is recorded as a
``crashed`` error row by the task's retry; the run succeeds and the next night does not read the file again."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from PIL import Image, PngImagePlugin

from image_embeddings.ingest.stage import decode_in_child
from image_embeddings.testing.sample import PHOTOS, encode, photo, write_sales

REPO = Path(__file__).resolve().parents[1]
MARK = b"POISON-KILLS-ITS-DECODER"

# Loaded by every Python process started with this folder on PYTHONPATH (the CLI, Spark's Python daemon and the
# workers it forks): opening bytes that carry the mark kills the process with SIGKILL, as an OOM killer would.
SITECUSTOMIZE = f'''
import io
import os
import signal

import PIL.Image

_open = PIL.Image.open


def _killing_open(fp, *args, **kwargs):
    if isinstance(fp, io.BytesIO) and {MARK!r} in fp.getvalue():
        os.kill(os.getpid(), signal.SIGKILL)
    return _open(fp, *args, **kwargs)


PIL.Image.open = _killing_open
'''


def _poison_png() -> bytes:
    """A valid small PNG whose text chunk carries the mark."""
    info = PngImagePlugin.PngInfo()
    info.add_text("note", MARK.decode())
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _cli(tmp_path: Path, command: str, *extra: str) -> subprocess.CompletedProcess[str]:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    pythonpath = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "IMAGE_EMBEDDINGS_LOG_DIR": str(tmp_path / "logs")}
    args = [sys.executable, "-m", "image_embeddings", command, "--config", str(REPO / "conf" / "local.yaml"),
            "--set", f"input.images={tmp_path / 'images'}", "--set", f"input.sales={tmp_path / 'sales'}",
            "--set", f"output.images_table={tmp_path / 'delta' / 'images'}",
            "--set", f"output.embeddings_table={tmp_path / 'delta' / 'embeddings'}",
            "--set", f"output.runs_table={tmp_path / 'delta' / 'runs'}",
            "--set", f"spark.ivy_dir={REPO / '.cache' / 'ivy'}", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


def test_a_file_that_kills_its_worker_becomes_a_crashed_row_and_is_not_read_again(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    names = list(PHOTOS[:3])
    for name in names:
        (images / f"{name}.jpg").write_bytes(encode(photo(name), size=(320, 240)))
    (images / "poison.png").write_bytes(_poison_png())
    write_sales(tmp_path / "sales", [*names, "poison"])

    first = _cli(tmp_path, "ingest")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    status = _cli(tmp_path, "status", "--json")
    assert status.returncode == 0, status.stderr[-3000:]
    [ingest] = [r for r in json.loads(status.stdout)["runs"] if r["stage"] == "ingest"]
    assert ingest["status"] == "succeeded" and ingest["counts"]["errors"] == {"crashed": 1}
    assert ingest["counts"]["files_decoded"] == len(names) + 1

    # The rows, read in a process without the hook: the three photos decoded, the poison file an error row.
    rows = subprocess.run(
        [sys.executable, "-c", (
            "import json, sys, pyarrow.dataset as ds\n"
            f"t = ds.dataset({str(tmp_path / 'delta' / 'images')!r}, format='parquet').to_table("
            "columns=['image_id', 'error', 'width']).to_pylist()\n"
            "print(json.dumps({r['image_id']: [r['error'], r['width'] is not None] for r in t}))")],
        capture_output=True, text=True, timeout=120)
    assert rows.returncode == 0, rows.stderr
    by_id = json.loads(rows.stdout)
    assert {i: has for i, (_, has) in by_id.items()} == {**dict.fromkeys(names, True), "poison": False}
    assert by_id["poison"][0].startswith("crashed: the decoder process died with signal 9 (SIGKILL)")

    second = _cli(tmp_path, "ingest")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    runs = json.loads(_cli(tmp_path, "status", "--json").stdout)["runs"]
    latest = [r for r in runs if r["stage"] == "ingest"][0]
    assert latest["run_id"] != ingest["run_id"] and latest["counts"]["files_decoded"] == 0


def _die(data: bytes | None) -> tuple[bytes | None, int | None, int | None, str | None]:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def _allocate(data: bytes | None) -> tuple[bytes | None, int | None, int | None, str | None]:
    try:
        bytearray(4 << 30)  # 4 GiB: past the child's address-space bound (what it maps, 2 x 64 MiB, 256 MiB)
    except MemoryError:
        return None, None, None, "decode_error: MemoryError"
    return b"no bound", None, None, None


def _decode(data: bytes | None) -> tuple[bytes | None, int | None, int | None, str | None]:
    return (data or b"")[::-1], 1, 2, None


def test_decode_in_child_returns_the_result_or_a_crashed_error() -> None:
    assert decode_in_child(_decode, b"abc", 64 << 20) == (b"cba", 1, 2, None)
    image, width, height, error = decode_in_child(_die, b"x", 64 << 20)
    assert (image, width, height) == (None, None, None)
    assert error is not None and error.startswith("crashed: the decoder process died with signal 9 (SIGKILL)")
    # The child's address space is bounded, so a runaway allocation fails there instead of meeting the OOM killer.
    assert decode_in_child(_allocate, b"x", 64 << 20) == (None, None, None, "decode_error: MemoryError")
    # A result larger than a pipe's buffer comes back whole.
    big = os.urandom(1 << 20)
    assert decode_in_child(_decode, big, 64 << 20)[0] == big[::-1]
