"""tfkernels._philox: the torch Philox-4x32-10 against the published known answers (Random123's
kat_vectors), and the constants the Triton kernel reads."""

import pytest
import torch

from tfkernels import _philox
from tfkernels._philox import philox4x32


@pytest.mark.parametrize("counter, key, expected", [
    # Random123 kat_vectors, philox4x32 with 10 rounds.
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    words = philox4x32(*(torch.tensor([c]) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


def test_constants_are_philox_4x32_10():
    assert (_philox.PHILOX_ROUND_A, _philox.PHILOX_ROUND_B) == (0xD2511F53, 0xCD9E8D57)
    assert (_philox.PHILOX_KEY_A, _philox.PHILOX_KEY_B) == (0x9E3779B9, 0xBB67AE85)
    assert _philox.PHILOX_ROUNDS == 10 and _philox.UNIFORM_BITS == 24


def test_counters_beyond_one_word_and_a_batch_of_counters():
    """Element-wise over tensors: each lane equals the same draw made alone."""
    c0 = torch.tensor([0, 1, 0xFFFFFFFF, 12345])
    c1 = torch.tensor([0, 0, 7, 1])
    zero = torch.zeros_like(c0)
    words = philox4x32(c0, c1, zero, zero, 11, 22)
    for i in range(4):
        alone = philox4x32(c0[i : i + 1], c1[i : i + 1], zero[:1], zero[:1], 11, 22)
        assert [int(w[i]) for w in words] == [int(w) for w in alone]
        assert all(0 <= int(w[i]) <= 0xFFFFFFFF for w in words)
