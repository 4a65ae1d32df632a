"""Tensors on the wire: dtype, shape and raw little-endian bytes, with size limits."""

from __future__ import annotations

import math
from typing import Annotated, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._errors import TensorError

__all__ = [
    "DTYPES",
    "MAX_TENSOR_BYTES",
    "MAX_TENSOR_ELEMENTS",
    "MAX_TENSOR_RANK",
    "DType",
    "Tensor",
]

DType = Literal["bool", "int8", "uint8", "int16", "int32", "int64", "float16", "float32", "float64"]
DTYPES: tuple[str, ...] = DType.__args__  # type: ignore[attr-defined]

MAX_TENSOR_RANK = 8
MAX_TENSOR_ELEMENTS = 1 << 22  # 4 Mi elements
MAX_TENSOR_BYTES = 16 << 20  # 16 MiB


class Tensor(BaseModel):
    """A dense tensor. ``data`` holds ``prod(shape)`` elements of ``dtype``, C order,
    little-endian. Validation checks the dtype whitelist, the rank, the element and byte
    limits, and that ``data`` has exactly the right length."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    dtype: DType
    # Each axis is bounded too: with a zero-length axis the product stays 0, but numpy
    # still cannot reshape to an axis beyond its index type.
    shape: Annotated[
        list[Annotated[int, Field(ge=0, le=MAX_TENSOR_ELEMENTS)]], Field(max_length=MAX_TENSOR_RANK)
    ]
    data: bytes

    @model_validator(mode="after")
    def _check_size(self) -> Self:
        elements = math.prod(self.shape)
        if elements > MAX_TENSOR_ELEMENTS:
            raise ValueError(f"tensor has {elements} elements; at most {MAX_TENSOR_ELEMENTS}")
        expected = elements * np.dtype(self.dtype).itemsize
        if expected > MAX_TENSOR_BYTES:
            raise ValueError(f"tensor is {expected} bytes; at most {MAX_TENSOR_BYTES}")
        if len(self.data) != expected:
            raise ValueError(
                f"tensor data is {len(self.data)} bytes but dtype {self.dtype} and shape "
                f"{self.shape} need {expected}"
            )
        return self

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> Tensor:
        """Wrap a numpy array; raises :class:`TensorError` for dtypes off the whitelist."""
        if not isinstance(array, np.ndarray):
            raise TensorError(f"expected a numpy array, got {type(array).__name__}")
        name = array.dtype.name
        if name not in DTYPES:
            allowed = ", ".join(DTYPES)
            raise TensorError(f"dtype {name} is not allowed on the wire; allowed: {allowed}")
        contiguous = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        try:
            return cls.model_validate(
                {"dtype": name, "shape": list(array.shape), "data": contiguous.tobytes()}
            )
        except ValueError as exc:
            raise TensorError(str(exc)) from None

    def to_numpy(self) -> np.ndarray:
        """A read-only view of the bytes as an array (no copy)."""
        dtype = np.dtype(self.dtype).newbyteorder("<")
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape)
