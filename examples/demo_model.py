"""Write a small, real ONNX model plus weight shards: the demo's "model directory".

The ONNX graph is encoded by hand (protobuf wire format) so the demo needs no onnx
package: ``Y = MatMul(X, W) + B`` with X of shape [1, 4], W [4, 3], B [3].
"""

from __future__ import annotations

import random
import struct
from pathlib import Path


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, value) -> bytes:
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    if isinstance(value, str):
        value = value.encode()
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def _value_info(name: str, dims: list[int]) -> bytes:
    shape = b"".join(_field(1, _field(1, d)) for d in dims)
    tensor_type = _field(1, 1) + _field(2, shape)  # elem_type FLOAT, shape
    return _field(1, name) + _field(2, _field(1, tensor_type))


def _tensor(name: str, dims: list[int], values: list[float]) -> bytes:
    return (b"".join(_field(1, d) for d in dims) + _field(2, 1) + _field(8, name)
            + _field(9, struct.pack(f"<{len(values)}f", *values)))


W = [[1.0, 0.0, 2.0], [0.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.5, -1.0, 1.0]]
B = [0.5, 0.25, -1.0]


def onnx_model_bytes() -> bytes:
    matmul = _field(1, "X") + _field(1, "W") + _field(2, "XW") + _field(3, "matmul") + _field(4, "MatMul")
    add = _field(1, "XW") + _field(1, "B") + _field(2, "Y") + _field(3, "add") + _field(4, "Add")
    graph = (_field(1, matmul) + _field(1, add) + _field(2, "modelcast-demo")
             + _field(5, _tensor("W", [4, 3], [v for row in W for v in row]))
             + _field(5, _tensor("B", [3], B))
             + _field(11, _value_info("X", [1, 4])) + _field(12, _value_info("Y", [1, 3])))
    opset = _field(2, 17)
    return _field(1, 8) + _field(2, "modelcast") + _field(7, graph) + _field(8, opset)


def expected_output(x: list[float]) -> list[float]:
    return [sum(x[i] * W[i][j] for i in range(4)) + B[j] for j in range(3)]


def write_demo_model(root: Path, total_bytes: int = 200 << 20, shards: int = 4, seed: int = 7) -> Path:
    """Write model.onnx, a config, a tokenizer and ``shards`` weight files summing to ~total_bytes.

    Content is seeded, so the same call writes the same bytes (and publishes to the same digest).
    """
    root = Path(root)
    (root / "weights").mkdir(parents=True, exist_ok=True)
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(onnx_model_bytes())
    (root / "config.json").write_text('{"architecture": "demo-matmul", "inputs": [1, 4], "outputs": [1, 3]}\n')
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(f"token{i}" for i in range(1000)) + "\n")
    rng = random.Random(seed)
    per = max(1, total_bytes // shards)
    for i in range(shards):
        path = root / "weights" / f"shard-{i:05d}-of-{shards:05d}.bin"
        with open(path, "wb") as f:
            left = per
            while left:
                n = min(left, 16 << 20)
                f.write(rng.randbytes(n))
                left -= n
    return root
