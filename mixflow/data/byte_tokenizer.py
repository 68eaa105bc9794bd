"""A byte-level tokenizer: UTF-8 bytes are the token ids 0..255, plus EOS and PAD.

Byte-level modelling needs no vocabulary file and no training, and every string
round-trips exactly (as in ByT5: Xue et al., "ByT5: Towards a Token-Free Future with
Pre-trained Byte-to-Byte Models", TACL 2022, which also reserves ids for special
tokens next to the 256 byte values).

Anywhere mixflow takes a tokenizer, any callable ``str -> list[int]`` works too, given
its ``vocab_size`` and ``eos_id``; this class is the default that needs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

NUM_BYTES = 256


class ByteTokenizer:
    """UTF-8 bytes -> ids ``0..255``; ``eos_id = 256`` ends a document, ``pad_id = 257`` fills.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hé")
    [104, 195, 169]
    >>> tok.decode([104, 195, 169, tok.eos_id])
    'hé'
    """

    name = "bytes"
    eos_id = NUM_BYTES
    pad_id = NUM_BYTES + 1
    vocab_size = NUM_BYTES + 2

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; EOS and PAD are dropped, any other id is a ValueError.

        A byte sequence cut inside a multi-byte character (a packed sequence may start
        or end mid-character) decodes with U+FFFD replacement characters.
        """
        arr = np.asarray(list(ids), dtype=np.int64)
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the byte vocabulary [0, {self.vocab_size})")
        data = arr[arr < NUM_BYTES].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")
