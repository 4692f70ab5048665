"""The adapter codec: a LoRA state dict <-> one flat fp32 vector.

Every place where adapters move (object store, checkpoints) or are aggregated (robust rules, server
optimizers) uses this one representation, so an aggregation rule never sees parameter names and the
flattening logic exists exactly once.

bf16 and fp16 tensors widen to fp32 exactly, so ``unflatten(flatten(sd))`` is bitwise identical for
fp32, bf16 and fp16 state dicts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CodecError(ValueError):
    """A state dict or vector that does not match the codec's parameter spec."""


@dataclass(frozen=True)
class AdapterCodec:
    """Names, shapes and dtypes of an adapter's tensors, in a fixed order.

    Build it once from a state dict (``AdapterCodec.from_state_dict``); then ``flatten`` and
    ``unflatten`` are inverse maps between state dicts of that layout and vectors of length ``dim``.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> AdapterCodec:
        names = tuple(sorted(state_dict))
        for n in names:
            if str(state_dict[n].dtype).removeprefix("torch.") not in _DTYPES:
                raise CodecError(f"tensor {n!r} has dtype {state_dict[n].dtype}; "
                                 f"supported: {', '.join(_DTYPES)}")
        return cls(
            names=names,
            shapes=tuple(tuple(state_dict[n].shape) for n in names),
            dtypes=tuple(str(state_dict[n].dtype).removeprefix("torch.") for n in names),
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def flatten(self, state_dict: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Concatenate the tensors (in ``names`` order) into one fp32 numpy vector."""
        if set(state_dict) != set(self.names):
            missing = sorted(set(self.names) - set(state_dict))[:3]
            extra = sorted(set(state_dict) - set(self.names))[:3]
            raise CodecError(f"state dict keys differ from the codec: missing {missing}, "
                             f"unexpected {extra}")
        out = np.empty(self.dim, dtype=np.float32)
        offset = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes, strict=True):
            t = state_dict[name]
            if tuple(t.shape) != shape:
                raise CodecError(f"tensor {name!r} has shape {tuple(t.shape)}, codec expects {shape}")
            out[offset : offset + size] = t.detach().to("cpu", torch.float32).reshape(-1).numpy()
            offset += size
        return out

    def unflatten(self, vector: np.ndarray) -> dict[str, torch.Tensor]:
        """Split a vector of length ``dim`` back into tensors of the original shapes and dtypes."""
        vector = np.asarray(vector)
        if vector.shape != (self.dim,):
            raise CodecError(f"vector has shape {vector.shape}, codec expects ({self.dim},)")
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape, dtype, size in zip(
            self.names, self.shapes, self.dtypes, self.sizes, strict=True
        ):
            chunk = torch.from_numpy(np.array(vector[offset : offset + size], dtype=np.float32))
            out[name] = chunk.reshape(shape).to(_DTYPES[dtype])
            offset += size
        return out

    def to_json(self) -> dict[str, list]:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "dtypes": list(self.dtypes)}

    @classmethod
    def from_json(cls, data: Mapping[str, list]) -> AdapterCodec:
        return cls(names=tuple(data["names"]), shapes=tuple(tuple(s) for s in data["shapes"]),
                   dtypes=tuple(data["dtypes"]))

    def fingerprint(self) -> str:
        """A short hash of the layout, stored with checkpoints to refuse mismatched resumes."""
        return hashlib.sha256(json.dumps(self.to_json()).encode()).hexdigest()[:16]
