"""Byte-deterministic safetensors writer.

safetensors.torch.save stores `__metadata__` through a hash map, so the header order (and hence the
file bytes) changes from run to run. This writer emits the same format with sorted keys: 8-byte
little-endian header length, JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}
padded with spaces to a multiple of 8, then the tensors' little-endian bytes in name order.
Files are read back with the ordinary `safetensors` library (and the Rust `safetensors` crate).
"""

import json
import struct

import torch

_DTYPES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def tensor_bytes(t):
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    return t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()


def _layout(tensors, metadata):
    """(header bytes incl. the 8-byte length prefix, tensor names in data order)."""
    header, offset, names = {}, 0, sorted(tensors)
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: unsupported dtype {t.dtype}")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, names


def serialize(tensors, metadata=None):
    """bytes of a safetensors file holding `tensors` (name -> torch.Tensor) and string `metadata`."""
    head, names = _layout(tensors, metadata)
    return head + b"".join(tensor_bytes(tensors[n]) for n in names)


def save_file(tensors, path, metadata=None):
    """Same bytes as `serialize`, streamed tensor by tensor (full-size checkpoints are ~0.9 GB)."""
    head, names = _layout(tensors, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for n in names:
            f.write(tensor_bytes(tensors[n]))
