"""polyak.io on real files: safetensors both ways, safe torch loading, corrupt files, atomic and killed writes."""

from __future__ import annotations

import os
import pathlib
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

from polyak.io import (
    CheckpointError,
    LazyStateDict,
    TensorSpec,
    atomic_write,
    load_torch,
    open_safetensors,
    open_writer,
    save_state_dict,
    torch_tensors,
)

SRC = str(Path(__file__).resolve().parent.parent / "src")


def assorted() -> dict[str, torch.Tensor]:
    """One tensor of each dtype and awkward shape a state dict may hold."""
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(5, 3, generator=g),
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "f16": torch.randn(3, 2, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "i64": torch.arange(6).view(2, 3),
        "i32": torch.tensor([1, -2, 3], dtype=torch.int32),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(3, 4, generator=g).t(),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def test_safetensors_written_here_read_by_the_library_and_back(tmp_path: Path) -> None:
    tensors = assorted()
    path = tmp_path / "out.safetensors"
    save_state_dict(tensors, path, metadata={"note": "hi"})
    assert_same(safetensors.torch.load_file(path), tensors)
    with safetensors.safe_open(path, "pt") as f:
        metadata = f.metadata()
        assert metadata.pop("polyak.crc32").count(" ") == len(tensors)  # the header's checksum, then each tensor's
        assert metadata == {"format": "pt", "note": "hi"}
    assert_same(dict(open_safetensors(path)), tensors)


def test_safetensors_written_by_the_library_read_here_in_pieces(tmp_path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in assorted().items()}
    path = tmp_path / "lib.safetensors"
    safetensors.torch.save_file(tensors, path)
    opened = open_safetensors(path)
    assert_same(dict(opened), tensors)
    assert opened.specs["f32"] == TensorSpec((5, 3), torch.float32)
    flat = tensors["f32"].reshape(-1)
    assert torch.equal(opened.read("f32", 4, 11), flat[4:11])
    assert torch.equal(opened.read("f32", 12, 100), flat[12:])  # stop is clipped


def test_torch_files_load_mapped_and_pages_released_keep_data_valid(tmp_path: Path) -> None:
    tensors = assorted()
    path = tmp_path / "sd.pt"
    torch.save(tensors, path)
    loaded, mapped = load_torch(path)
    assert mapped
    opened = torch_tensors(path, loaded, mapped=True)
    for _ in range(2):  # released pages are read again from the file
        assert_same(dict(opened), tensors)
    flat = tensors["f32"].reshape(-1)
    assert torch.equal(opened.read("f32", 2, 9), flat[2:9])


def test_legacy_torch_files_load_without_mapping(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(3, 3)}
    path = tmp_path / "old.pt"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    loaded, mapped = load_torch(path)
    assert not mapped and torch.equal(loaded["w"], tensors["w"])


def test_lazy_state_dict_is_streamed_and_checked(tmp_path: Path) -> None:
    made: list[str] = []

    def load(name: str) -> torch.Tensor:
        made.append(name)
        return torch.full((2,), float(len(made)))

    lazy = LazyStateDict({"a": TensorSpec((2,), torch.float32), "b": TensorSpec((2,), torch.float32)}, load)
    save_state_dict(lazy, tmp_path / "lazy.safetensors")
    assert made == ["a", "b"]
    bad = LazyStateDict({"a": TensorSpec((3,), torch.float32)}, lambda _: torch.zeros(2))
    with pytest.raises(RuntimeError, match="announced"):
        save_state_dict(bad, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    assert os.listdir(tmp_path) == ["lazy.safetensors"]  # no temporary file left behind


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_failed_write_keeps_the_old_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    save_state_dict({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(KeyError), atomic_write(path) as f:
        f.write(b"partial")
        raise KeyError("boom")
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


def _run(code: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_writers_leave_the_old_files_intact(tmp_path: Path) -> None:
    old = {"w": torch.arange(4.0)}
    writers = {}
    for suffix in (".safetensors", ".pt"):  # both children start at once: importing torch is the slow part
        folder = tmp_path / suffix[1:]
        folder.mkdir()
        path = folder / f"model{suffix}"
        save_state_dict(old, path)
        # The child writes 8 MB, then blocks: mid-stream for safetensors, just before fsync+rename for .pt.
        writers[path] = _run(
            f"""
            import os, time, torch
            from polyak.io import LazyStateDict, TensorSpec, save_state_dict

            def ready(*_):
                print("ready", flush=True)
                time.sleep(600)

            def load(name):
                if name == "b" and {suffix == ".safetensors"}:
                    ready()
                return torch.ones(1 << 20, dtype=torch.float32)

            os.fsync = ready
            specs = {{n: TensorSpec((1 << 20,), torch.float32) for n in "ab"}}
            save_state_dict(LazyStateDict(specs, load), {str(path)!r})
            """
        )
    try:
        for path, writer in writers.items():
            assert writer.stdout is not None and writer.stdout.readline() == "ready\n", writer.communicate()[1]
            assert any(p.name.endswith(".tmp") and p.stat().st_size > 4 << 20 for p in path.parent.iterdir())
    finally:
        for writer in writers.values():
            writer.send_signal(signal.SIGKILL)
            writer.communicate()
    for path in writers:
        assert_same(dict(open_safetensors(path)) if path.suffix == ".safetensors" else torch.load(path), old)


def test_disk_full_is_a_one_line_error_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_state_dict({"w": torch.zeros(4)}, path)
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # writes past 1 MB fail (EFBIG), as on a full disk
    try:
        with pytest.raises(CheckpointError) as caught:
            save_state_dict({"w": torch.zeros(1 << 20)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(caught.value)
    assert "disk full" in message and "nothing was changed" in message and "\n" not in message
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_state_dict({"a": torch.randn(100), "b": torch.randn(100)}, good)
    pt = tmp_path / "good.pt"
    torch.save({"a": torch.randn(100)}, pt)
    cases = {
        "missing.pt": (None, "no such file"),
        "empty.pt": (b"", "is empty"),
        "text.pt": (b"hello world, not a checkpoint", "not a safetensors or PyTorch"),
        "cut.safetensors": (good.read_bytes()[:-10], "truncated"),
        "header.safetensors": (good.read_bytes()[:8] + b"{" + b"x" * 200, "corrupt"),
        "cut.pt": (pt.read_bytes()[: len(pt.read_bytes()) // 2], "truncated or corrupt"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(CheckpointError) as caught:
            if name.endswith(".safetensors"):
                open_safetensors(path)
            else:
                load_torch(path)
        message = str(caught.value)
        assert expected in message and str(path) in message and "\n" not in message, (name, message)


class Payload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_objects_are_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="never unpickles") as caught:
        load_torch(path)
    assert "\n" not in str(caught.value) and "GLOBAL" in str(caught.value)
    assert not marker.exists()


def test_safetensors_files_interoperate(tmp_path: Path) -> None:
    """Our reader reads files from the safetensors package, and the package reads ours."""
    st = pytest.importorskip("safetensors.torch")
    tensors = {
        "a": torch.randn(3, 4, dtype=torch.bfloat16),
        "b": torch.arange(5),
        "c": torch.tensor(2.5, dtype=torch.float64),
        "d": torch.tensor([True, False]),
        "e": torch.empty(0, 3),
    }
    st.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"k": "v"})
    theirs = open_safetensors(tmp_path / "theirs.safetensors")
    assert theirs.metadata == {"k": "v"} and not theirs.checked and set(theirs) == set(tensors)
    for name, value in tensors.items():
        assert torch.equal(theirs[name], value), name
    specs = {name: TensorSpec(tuple(value.shape), value.dtype) for name, value in tensors.items()}
    with open_writer(tmp_path / "ours.safetensors", specs, metadata={"k": "v"}) as writer:
        for name in writer.names:  # whole tensors, or flat pieces of them in order
            for piece in tensors[name].reshape(-1).split(2):
                writer.write(piece)
    loaded = st.load_file(str(tmp_path / "ours.safetensors"))
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value), name
    with pytest.raises(RuntimeError, match="tensor 'b'"), open_writer(tmp_path / "bad.safetensors", specs) as w:
        w.write(torch.zeros(1))  # float32 data for the int64 tensor that comes first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.safetensors", "theirs.safetensors"]


def test_checksums_are_zlib_crc32_whichever_implementation_computes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file checksummed by the fast CRC-32 (isal, when installed) verifies with zlib's, and the other way round."""
    import zlib

    import polyak.io.safetensors as st_module
    from polyak.io import base

    data = os.urandom(1 << 16)
    assert base.crc32(data) == zlib.crc32(data) and base.crc32(data, 7) == zlib.crc32(data, 7)
    tensors = {"w": torch.randn(5000), "i": torch.arange(7, dtype=torch.int16)}
    fast, plain = tmp_path / "fast.safetensors", tmp_path / "plain.safetensors"
    save_state_dict(tensors, fast)
    monkeypatch.setattr(st_module, "crc32", zlib.crc32)
    save_state_dict(tensors, plain)
    assert fast.read_bytes() == plain.read_bytes()
    assert_same(dict(open_safetensors(fast)), tensors)


def test_many_open_files_hold_a_bounded_number_of_descriptors(tmp_path: Path) -> None:
    """Reads keep the last 32 files open (no open per piece), never one descriptor per file of a large average."""
    files = []
    for i in range(40):
        save_state_dict({"w": torch.full((10,), float(i))}, tmp_path / f"{i}.safetensors")
        files.append(open_safetensors(tmp_path / f"{i}.safetensors"))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        for i, opened in enumerate(files):
            assert torch.equal(opened["w"], torch.full((10,), float(i)))
    assert len(os.listdir("/proc/self/fd")) - before <= 32
