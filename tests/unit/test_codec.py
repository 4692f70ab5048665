"""The adapter codec: a state dict <-> one flat fp32 vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_fedit.models.codec import AdapterCodec, CodecError


def _state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.lora_B.weight": torch.randn(4, 2, generator=g).to(dtype),
        "a.lora_A.weight": torch.randn(2, 3, generator=g).to(dtype),
    }


def test_layout_is_sorted_by_name_and_flatten_concatenates_in_that_order():
    """names sorted: a (2x3 = 6 values) then b (4x2 = 8 values) -> d = 14."""
    sd = {"b": torch.tensor([[5.0, 6.0]]), "a": torch.tensor([1.0, 2.0, 3.0])}
    codec = AdapterCodec.from_state_dict(sd)
    assert codec.names == ("a", "b") and codec.dim == 5
    np.testing.assert_array_equal(codec.flatten(sd), np.array([1, 2, 3, 5, 6], dtype=np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bitwise(dtype):
    sd = _state(dtype)
    codec = AdapterCodec.from_state_dict(sd)
    vec = codec.flatten(sd)
    assert vec.dtype == np.float32 and vec.shape == (codec.dim,) == (14,)
    back = codec.unflatten(vec)
    for k, v in sd.items():
        assert back[k].dtype == dtype
        assert torch.equal(back[k].view(torch.int16 if dtype != torch.float32 else torch.int32),
                           v.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_json_round_trip_and_fingerprint():
    codec = AdapterCodec.from_state_dict(_state(torch.bfloat16))
    again = AdapterCodec.from_json(codec.to_json())
    assert again == codec and again.fingerprint() == codec.fingerprint()
    other = AdapterCodec.from_state_dict(_state(torch.float32))
    assert other.fingerprint() != codec.fingerprint()


def test_mismatches_are_errors():
    sd = _state(torch.float32)
    codec = AdapterCodec.from_state_dict(sd)
    with pytest.raises(CodecError, match="missing"):
        codec.flatten({"a.lora_A.weight": sd["a.lora_A.weight"]})
    with pytest.raises(CodecError, match="shape"):
        codec.flatten({**sd, "a.lora_A.weight": torch.zeros(3, 2)})
    with pytest.raises(CodecError, match=r"\(14,\)"):
        codec.unflatten(np.zeros(13, dtype=np.float32))
    with pytest.raises(CodecError, match="dtype"):
        AdapterCodec.from_state_dict({"x": torch.zeros(2, dtype=torch.int64)})
