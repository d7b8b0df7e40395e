"""The one definition of who attends to whom.

Query i sees key j when
  * |i - j| <= dilation * (window // 2) and (i - j) % dilation == 0  (the local band), or
  * i or j is a global token, or
  * i is a global row (it reads every key without being read by every query),
and key j is not padding. A query that sees no key at all outputs zeros.
"""

from __future__ import annotations

import torch


def band_reach(window: int, dilation: int) -> int:
    """Largest |i - j| inside the local band."""
    return dilation * (window // 2)


def local_band(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int,
               dilation: int) -> torch.Tensor:
    """Boolean band mask for broadcastable query and key positions."""
    rel = key_pos - query_pos
    inside = rel.abs() <= band_reach(window, dilation)
    if dilation > 1:
        inside &= rel.remainder(dilation) == 0
    return inside


def sparse_mask(
    length: int,
    *,
    window: int,
    dilation: int = 1,
    global_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    batch: int = 1,
    device: torch.device | str | None = None,
    global_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full (batch, length, length) boolean mask, True where query i may attend key j.

    ``global_mask``, ``global_rows`` and ``key_padding_mask`` are (batch, length) bool; padding
    is True.
    This materialises length^2 booleans: it is the reference, not a fast path.
    """
    pos = torch.arange(length, device=device)
    mask = local_band(pos[:, None], pos[None, :], window, dilation).expand(batch, length, length)
    if global_mask is not None:
        mask = mask | global_mask[:, :, None] | global_mask[:, None, :]
    if global_rows is not None:
        mask = mask | global_rows[:, :, None]
    if key_padding_mask is not None:
        mask = mask & ~key_padding_mask[:, None, :]
    return mask.contiguous()


def marked_first(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a (B, L) bool mask: ``order`` (B, R), each row's marked positions first and in order
    (R = the most marked positions of any row), and ``valid`` (B, R), False on the filler
    positions that pad a row with fewer marks."""
    counts = rows.sum(1)
    most = int(counts.max()) if rows.numel() else 0
    order = torch.argsort((~rows).to(torch.int8), dim=1, stable=True)[:, :most]
    valid = torch.arange(most, device=rows.device)[None] < counts[:, None]
    return order, valid
