"""Open Inference Protocol tensor decoding: every malformed tensor is refused by field."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from cyclone.errors import InvalidArgument
from cyclone.oip.v2 import open_inference_pb2 as pb
from services.inference.convert import array_from_tensor, decode_bytes_tensor, encode_bytes_tensor


def tensor(datatype: str, shape: list[int]) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=shape)


def test_bytes_round_trip() -> None:
    values = np.array(["porto", "", "faro ünïcode"], dtype=object)
    raw = encode_bytes_tensor(values)
    assert list(decode_bytes_tensor(raw, 3, "f")) == list(values)


@pytest.mark.parametrize(
    ("raw", "count", "fragment"),
    [
        (struct.pack("<I", 5) + b"ab", 1, "runs past the end"),
        (struct.pack("<I", 1) + b"a" + b"zz", 1, "left over after 1 elements"),
        (struct.pack("<I", 1) + b"a", 2, "ends after 1 of 2 elements"),
    ],
)
def test_malformed_bytes_tensors(raw: bytes, count: int, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment) as info:
        decode_bytes_tensor(raw, count, "inputs[0] (city)")
    assert info.value.message.startswith("inputs[0] (city)")


def test_raw_numeric_data_must_match_the_shape() -> None:
    raw = np.arange(3, dtype="<f4").tobytes()
    assert list(array_from_tensor(tensor("FP32", [3, 1]), raw, "inputs[0]").ravel()) == [0, 1, 2]
    with pytest.raises(InvalidArgument, match=r"inputs\[0\]: raw data has 12 bytes"):
        array_from_tensor(tensor("FP32", [4, 1]), raw, "inputs[0]")


@pytest.mark.parametrize(
    ("datatype", "shape", "fragment"),
    [
        ("FP128", [1], "unsupported datatype 'FP128'"),
        ("FP32", [], "expected non-negative dimensions"),
        ("FP32", [-1, 1], "expected non-negative dimensions"),
        ("FP16", [1], "cannot be sent as typed contents"),
    ],
)
def test_bad_datatype_or_shape(datatype: str, shape: list[int], fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        array_from_tensor(tensor(datatype, shape), None, "inputs[0]")


def test_typed_contents_count_must_match_the_shape() -> None:
    t = tensor("FP64", [2])
    t.contents.fp64_contents.extend([1.5])
    with pytest.raises(InvalidArgument, match="has 1 elements, shape \\[2\\] needs 2"):
        array_from_tensor(t, None, "inputs[0]")
    t.contents.fp64_contents.append(2.5)
    assert list(array_from_tensor(t, None, "inputs[0]")) == [1.5, 2.5]
