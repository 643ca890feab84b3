"""
Token layout for sequence models: OptVQ code indices (B, num_heads, h, w) <-> flat token sequences (B, L).

A latent position of OptVQ carries `num_heads` indices, each in [0, num_codes) of one shared codebook, so an image
is `L = num_heads * h * w` tokens. Two choices define a sequence, and both are offered because generators differ:

Order (where the heads go):
    - `"position-major"`: raster order over positions (row by row), the `num_heads` tokens of one position adjacent:
      `[p0h0, p0h1, ..., p0h(n-1), p1h0, ...]`. The natural order for next-token prediction: a position is complete
      as soon as its heads are emitted.
    - `"head-major"`: all positions of head 0 in raster order, then all positions of head 1, ...:
      `[h0p0, h0p1, ..., h1p0, ...]`. The order of the original authors' generator code (`indices.view(B, -1)` of the
      (B, num_heads, h, w) tensor, fed to MaskGIT).

Vocabulary (what an id means):
    - `"shared"`: ids are code indices in [0, num_codes); the head of a token is given by its place in the sequence.
      `vocab_size = num_codes`.
    - `"per-head"`: per-head offsets, head j uses ids [j * num_codes, (j + 1) * num_codes), so that an id alone says
      which head it belongs to (an embedding table learns one vector per (head, code)).
      `vocab_size = num_heads * num_codes`.

Conversions are exact inverses; wrong shapes, lengths, dtypes and out-of-range ids raise a `ValueError` that names
the problem.

Example:

```python
>>> import torch
>>> from optvq_hf.tokens import TokenLayout
>>> layout = TokenLayout(num_codes=64, num_heads=2, latent_shape=(2, 2), vocabulary="per-head")
>>> indices = torch.tensor([[[[1, 2], [3, 4]], [[5, 6], [7, 8]]]])  # (B=1, heads=2, h=2, w=2)
>>> layout.to_tokens(indices)  # position-major: p0h0, p0h1, p1h0, ...; head 1 is offset by 64
tensor([[ 1, 69,  2, 70,  3, 71,  4, 72]])
>>> torch.equal(layout.to_indices(layout.to_tokens(indices)), indices)
True
```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantization import checks_tensor_values

ORDERS = ("position-major", "head-major")
VOCABULARIES = ("shared", "per-head")

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_integer_tensor(name: str, tensor: object) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"{name} must be an integer tensor (e.g. torch.long), got dtype {tensor.dtype}")


@dataclass(frozen=True)
class TokenLayout:
    """
    How the indices of one image are laid out as a sequence of token ids (see the module docstring).

    Args:
        num_codes (`int`): codes in the shared codebook (`config.num_codes`).
        num_heads (`int`): quantizer heads, i.e. indices per latent position (`config.num_heads`).
        latent_shape (`tuple[int, int]`): (h, w) of the latent grid.
        order (`str`, *optional*, defaults to `"position-major"`): `"position-major"` or `"head-major"`.
        vocabulary (`str`, *optional*, defaults to `"shared"`): `"shared"` or `"per-head"` (per-head offsets).
    """

    num_codes: int
    num_heads: int
    latent_shape: tuple[int, int]
    order: str = "position-major"
    vocabulary: str = "shared"

    def __post_init__(self) -> None:
        _check_positive_int("num_codes", self.num_codes)
        _check_positive_int("num_heads", self.num_heads)
        shape = self.latent_shape
        if not isinstance(shape, (tuple, list)) or len(shape) != 2:
            raise ValueError(f"latent_shape must be a pair (h, w), got {shape!r}")
        for value in shape:
            _check_positive_int("latent_shape entries", value)
        object.__setattr__(self, "latent_shape", (int(shape[0]), int(shape[1])))  # frozen: normalise lists once
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.vocabulary not in VOCABULARIES:
            raise ValueError(f"vocabulary must be one of {VOCABULARIES}, got {self.vocabulary!r}")

    # -- serialisation ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-serialisable dict of the layout; `TokenLayout.from_dict` rebuilds it."""
        return {
            "num_codes": self.num_codes,
            "num_heads": self.num_heads,
            "latent_shape": list(self.latent_shape),
            "order": self.order,
            "vocabulary": self.vocabulary,
        }

    @classmethod
    def from_dict(cls, values: dict) -> TokenLayout:
        """The layout of a `to_dict` dict; unknown keys are a `ValueError`."""
        unknown = sorted(set(values) - {"num_codes", "num_heads", "latent_shape", "order", "vocabulary"})
        if unknown:
            raise ValueError(f"unknown TokenLayout field(s) {unknown}")
        return cls(**values)

    # -- sizes --------------------------------------------------------------------------------------------------------
    @property
    def num_positions(self) -> int:
        """Latent positions h * w."""
        return self.latent_shape[0] * self.latent_shape[1]

    @property
    def sequence_length(self) -> int:
        """Tokens per image: num_heads * h * w."""
        return self.num_heads * self.num_positions

    @property
    def vocab_size(self) -> int:
        """Distinct token ids: num_codes (shared) or num_heads * num_codes (per-head)."""
        return self.num_codes * (self.num_heads if self.vocabulary == "per-head" else 1)

    def head_of_slot(self, device: torch.device | str | None = None) -> torch.LongTensor:
        """(L,) the head that each place of the sequence belongs to."""
        slots = torch.arange(self.sequence_length, device=device)
        if self.order == "position-major":
            return slots % self.num_heads
        return slots // self.num_positions

    def id_bounds(self, device: torch.device | str | None = None) -> tuple[torch.LongTensor, torch.LongTensor]:
        """
        (low, high), each (L,): the ids allowed at each place of the sequence are low <= id < high. With the shared
        vocabulary that is [0, num_codes) everywhere; with per-head offsets the range of the slot's head. A generator
        can mask its logits with these bounds so that every sample decodes.
        """
        if self.vocabulary == "shared":
            low = torch.zeros(self.sequence_length, dtype=torch.long, device=device)
        else:
            low = self.head_of_slot(device) * self.num_codes
        return low, low + self.num_codes

    # -- conversions --------------------------------------------------------------------------------------------------
    def to_tokens(self, indices: torch.Tensor) -> torch.LongTensor:
        """Code indices (B, num_heads, h, w) -> token ids (B, L), int64."""
        _check_integer_tensor("indices", indices)
        expected = (self.num_heads, *self.latent_shape)
        if indices.ndim != 4 or tuple(indices.shape[1:]) != expected:
            raise ValueError(
                f"indices must have shape (batch, num_heads, h, w) = (batch, {', '.join(map(str, expected))}), "
                f"got {tuple(indices.shape)}"
            )
        indices = indices.long()
        if checks_tensor_values() and indices.numel():  # eager only: compiled and exported graphs skip it
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.num_codes:
                raise ValueError(f"indices must lie in [0, {self.num_codes}), got values in [{low}, {high}]")
        indices = indices + self._offsets(indices.device)
        if self.order == "position-major":
            indices = indices.permute(0, 2, 3, 1)  # (B, h, w, heads): heads of one position adjacent
        return indices.reshape(indices.shape[0], self.sequence_length)

    def to_indices(self, tokens: torch.Tensor) -> torch.LongTensor:
        """Token ids (B, L) -> code indices (B, num_heads, h, w), int64; the exact inverse of `to_tokens`."""
        _check_integer_tensor("tokens", tokens)
        if tokens.ndim != 2:
            hint = " (use tokens[None] for a single sequence)" if tokens.ndim == 1 else ""
            raise ValueError(f"tokens must have shape (batch, sequence_length), got {tuple(tokens.shape)}{hint}")
        if tokens.shape[1] != self.sequence_length:
            raise ValueError(
                f"tokens have length {tokens.shape[1]}, the layout needs num_heads * h * w = {self.num_heads} * "
                f"{self.latent_shape[0]} * {self.latent_shape[1]} = {self.sequence_length}"
            )
        tokens = tokens.long()
        if checks_tensor_values():  # eager only: compiled and exported graphs skip the value check
            low, high = self.id_bounds(tokens.device)
            outside = (tokens < low) | (tokens >= high)
            if bool(outside.any()):
                row, slot = (int(i) for i in outside.nonzero()[0])
                head = int(self.head_of_slot()[slot])
                raise ValueError(
                    f"token id {int(tokens[row, slot])} at sequence {row}, place {slot} is out of range: that place "
                    f"holds head {head}, whose ids lie in [{int(low[slot])}, {int(high[slot])}) with the "
                    f"{self.vocabulary!r} vocabulary and {self.order!r} order"
                )
        batch, (height, width) = tokens.shape[0], self.latent_shape
        if self.order == "position-major":
            indices = tokens.reshape(batch, height, width, self.num_heads).permute(0, 3, 1, 2)
        else:
            indices = tokens.reshape(batch, self.num_heads, height, width)
        return (indices - self._offsets(tokens.device)).contiguous()

    def _offsets(self, device: torch.device) -> torch.LongTensor:
        """(1, num_heads, 1, 1) id offset of each head."""
        step = self.num_codes if self.vocabulary == "per-head" else 0
        return (torch.arange(self.num_heads, device=device) * step).view(1, -1, 1, 1)


def indices_to_tokens(
    indices: torch.Tensor, num_codes: int, order: str = "position-major", vocabulary: str = "shared"
) -> torch.LongTensor:
    """Code indices (B, num_heads, h, w) -> token ids (B, num_heads * h * w); see `TokenLayout`."""
    _check_integer_tensor("indices", indices)
    if indices.ndim != 4:
        raise ValueError(f"indices must have shape (batch, num_heads, h, w), got {tuple(indices.shape)}")
    layout = TokenLayout(num_codes, indices.shape[1], tuple(indices.shape[2:]), order=order, vocabulary=vocabulary)
    return layout.to_tokens(indices)


def tokens_to_indices(
    tokens: torch.Tensor,
    num_codes: int,
    num_heads: int,
    latent_shape: tuple[int, int],
    order: str = "position-major",
    vocabulary: str = "shared",
) -> torch.LongTensor:
    """Token ids (B, num_heads * h * w) -> code indices (B, num_heads, h, w); the inverse of `indices_to_tokens`."""
    return TokenLayout(num_codes, num_heads, latent_shape, order=order, vocabulary=vocabulary).to_indices(tokens)


__all__ = ["ORDERS", "VOCABULARIES", "TokenLayout", "indices_to_tokens", "tokens_to_indices"]
