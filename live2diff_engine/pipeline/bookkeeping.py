"""Which cache slot each denoising step writes, which slots it sees, and their positions.

Live2Diff's rules, per cache row (one row per denoising step), applied after every UNet call:

* while the row still has closed slots, with ``n`` open slots: the next frame goes to slot ``n``
  and slots ``0..n`` become open;
* once the row is fully open: positional indices of the non-sink slots rotate one place right
  (the last wraps to the first non-sink slot), and the next frame goes to the slot that now holds
  the largest index, i.e. it overwrites the oldest non-sink frame.

Initially every row has its sink slots open; row 0 also has slot ``sink`` open; every row writes
to slot ``sink`` except row 1, which writes to ``sink + 1`` (so the zero placeholder it holds on
the first call lands in a closed slot). Rows 2 and up get no such treatment, as in the original.

The state depends only on the call number, never on data, so it is simulated here once, on the
host, and stored as a small table: a prefix until every row rolls, then one period of
``window - sink`` calls. Looking a call up is a slice of a device tensor: no host sync per frame,
no Python loop that grows with the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.motion import StreamContext


@dataclass
class _State:
    open: list[list[bool]]
    pe: list[list[int]]
    update: list[int]

    def key(self) -> tuple:
        return (tuple(map(tuple, self.open)), tuple(map(tuple, self.pe)), tuple(self.update))


def initial_state(steps: int, window: int, sink: int) -> _State:
    opened = [[j < sink for j in range(window)] for _ in range(steps)]
    opened[0][sink] = True
    update = [sink] * steps
    if steps > 1:
        update[1] = sink + 1
    return _State(opened, [list(range(window)) for _ in range(steps)], update)


def advance(state: _State, sink: int) -> _State:
    window = len(state.pe[0])
    opened = [row[:] for row in state.open]
    pe = [row[:] for row in state.pe]
    update = state.update[:]
    for r in range(len(opened)):
        n_open = sum(opened[r])
        if n_open < window:
            update[r] = n_open
        else:
            pe[r][sink:] = pe[r][-1:] + pe[r][sink:-1]
            update[r] = max(range(window), key=lambda j: pe[r][j])
        for j in range(min(n_open + 1, window)):
            opened[r][j] = True
    return _State(opened, pe, update)


class Bookkeeping:
    """Precomputed bookkeeping for every call of an endless stream."""

    def __init__(self, steps: int, window: int, sink: int, device=None, branches: int = 1):
        """``branches`` > 1 repeats every row's bookkeeping for that many batch halves (e.g. the
        conditional and unconditional branch of classifier-free guidance, rows ``b*T + r``)."""
        self.steps, self.window, self.sink = steps, window, sink
        period = window - sink
        states = [initial_state(steps, window, sink)]
        # Simulate until the last `period` states repeat: from then on the table is periodic.
        while True:
            states.append(advance(states[-1], sink))
            n = len(states)
            if n > 2 * period and all(states[n - 1 - k].key() == states[n - 1 - k - period].key() for k in range(period)):
                break
        self.prefix = len(states) - 2 * period
        self.period = period
        states = states[: self.prefix + period]
        bias = torch.tensor([[[0.0 if o else float("-inf") for o in row] for row in s.open] for s in states])
        pe_idx = torch.tensor([s.pe for s in states], dtype=torch.long)
        update = torch.tensor([s.update for s in states], dtype=torch.long)
        q_idx = pe_idx.gather(2, update.unsqueeze(2)).squeeze(2)
        if branches > 1:
            bias, pe_idx = bias.repeat(1, branches, 1), pe_idx.repeat(1, branches, 1)
            update, q_idx = update.repeat(1, branches), q_idx.repeat(1, branches)
        rows = torch.arange(steps * branches)
        self._tables = {"bias": bias, "pe_idx": pe_idx, "update_idx": update, "q_idx": q_idx, "rows": rows}
        self.to(device)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Bookkeeping":
        self._tables = {
            k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
            for k, v in self._tables.items()
        }
        return self

    def index(self, call: int) -> int:
        """Row of the table that holds the state passed into call number ``call`` (0-based)."""
        if call < self.prefix + self.period:
            return call
        return self.prefix + (call - self.prefix) % self.period

    def context(self, call: int) -> StreamContext:
        i = self.index(call)
        t = self._tables
        return StreamContext(
            bias=t["bias"][i], pe_idx=t["pe_idx"][i], update_idx=t["update_idx"][i], q_idx=t["q_idx"][i], rows=t["rows"]
        )

    def tables(self) -> tuple[torch.Tensor, ...]:
        """(bias, pe_idx, update_idx, q_idx, rows): the whole table on the device, for a stream call
        that picks its row on the device (see :func:`..accelerate.stream_call`)."""
        t = self._tables
        return (t["bias"], t["pe_idx"], t["update_idx"], t["q_idx"], t["rows"])

    def __len__(self) -> int:
        return self.prefix + self.period
