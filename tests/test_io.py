"""File I/O: atomic writes, JSON with clear errors, state files with their SHA-256, the streaming writer."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from calexnet_fast import io


def test_atomic_write_replaces_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    io.write_text(path, "one")
    io.write_text(path, "two")
    assert path.read_text() == "two"

    def fail(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match=r"a\.txt.*disk is full") as e:
        io.atomic_write(path, fail)
    assert e.value.errno == errno.ENOSPC
    assert path.read_text() == "two" and sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]
    with pytest.raises(OSError, match="cannot write"):
        io.write_text(path / "below_a_file.txt", "x")  # the folder is a file
    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(path, lambda f: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_json_is_nan_safe_and_read_errors_name_the_file(tmp_path):
    import numpy as np

    path = tmp_path / "r.json"
    io.write_json(path, {"a": float("nan"), "b": [1.5, float("inf")], "c": np.float32(2.0), "d": (1, 2), "p": tmp_path})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "c": 2.0, "d": [1, 2], "p": str(tmp_path)}
    assert io.read_json(path)["c"] == 2.0
    io.write_json(path, {"x": 1}, indent=1)
    assert path.read_text() == '{\n "x": 1\n}\n'
    with pytest.raises(ValueError, match=r"run config .*none\.json does not exist"):
        io.read_json(tmp_path / "none.json", "run config")


@pytest.mark.parametrize(
    "name, content, reader, error, match",
    [
        ("bad.json", b'{"a": ', io.read_json, RuntimeError, r"bad\.json is not readable JSON"),
        ("list.json", b"[1, 2]", io.read_json, RuntimeError, r"list\.json: expected a JSON object, got list"),
        ("bin.json", b"\xff\xfe\x00", io.read_json, RuntimeError, r"bin\.json"),
        ("none.safetensors", None, io.load_state_file, ValueError, "does not exist"),
        ("junk.safetensors", b"junk", io.load_state_file, RuntimeError, r"junk\.safetensors: not a readable"),
    ],
)
def test_unreadable_files_are_reported(tmp_path, name, content, reader, error, match):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(error, match=match):
        reader(tmp_path / name)


def test_state_file_round_trip_and_sha256(tmp_path):
    path = tmp_path / "s.safetensors"
    tensors = {"w": torch.randn(3, 4), "i": torch.arange(5), "h": torch.randn(2).to(torch.bfloat16)}
    sha = io.save_state_file(path, tensors, {"epoch": 2, "loss": float("nan")})
    assert sha == io.file_sha256(path)
    assert json.loads(path.with_suffix(".json").read_text()) == {"epoch": 2, "loss": None}
    back, cfg = io.load_state_file(path, sha)
    assert cfg["epoch"] == 2 and all(torch.equal(back[k], v) for k, v in tensors.items())
    io.save_state_file(path, tensors, {"a": 1}, twin={"a": 1, "shown": [1, 2]})
    assert json.loads(path.with_suffix(".json").read_text()) == {"a": 1, "shown": [1, 2]}
    assert io.load_state_file(path)[1] == {"a": 1}
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"s\.safetensors: damaged or replaced"):
        io.load_state_file(path, io.save_state_file(tmp_path / "t.safetensors", tensors))


def test_streaming_writer_records_and_checks_each_tensor(tmp_path):
    path = tmp_path / "big.safetensors"
    a = torch.randn(10, 3)
    b = torch.arange(10)
    specs = {"a": (torch.float32, (10, 3)), "b": (torch.int64, (10,)), "e": (torch.float16, (0, 2))}
    with io.SafetensorsWriter(path, specs, {"meta": "x"}) as w:
        for s in range(0, 10, 4):
            w.write("a", s, a[s : s + 4])
            w.write("b", s, b[s : s + 4])
        with pytest.raises(ValueError, match="rows arrive in order"):
            w.write("a", 0, a[:2])
        digests = w.close()
    assert set(digests) == {"a", "b", "e"} and not (tmp_path / "big.safetensors.tmp").exists()
    assert io.verify_safetensors(path) is True
    from safetensors.torch import load_file

    st = load_file(str(path))
    assert torch.equal(st["a"], a) and torch.equal(st["b"], b) and st["e"].shape == (0, 2)
    arrays, meta = io.memmap_safetensors(path)
    assert meta["meta"] == "x" and torch.equal(torch.from_numpy(arrays["a"][2:4].copy()), a[2:4])
    # a writer whose rows do not all arrive keeps nothing
    w = io.SafetensorsWriter(tmp_path / "short.safetensors", {"a": (torch.float32, (4, 3))}, {})
    w.write("a", 0, a[:2])
    with pytest.raises(RuntimeError, match="not kept"):
        w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]
    with pytest.raises(ValueError, match="dtype"):
        io.SafetensorsWriter(tmp_path / "x.safetensors", {"a": (torch.complex64, (1,))}, {})
    # a file written elsewhere records no digests
    io.save_state_file(tmp_path / "plain.safetensors", {"a": a})
    assert io.verify_safetensors(tmp_path / "plain.safetensors") is False
