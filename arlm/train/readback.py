"""Numbers of past training steps read on the host without stalling the device.

Reading a GPU tensor with ``.item()`` waits for every kernel queued before the read, including
the next step's if it is already queued, so a loop that reads its loss each step leaves the GPU
idle while the host prepares the following step. Here each step's numbers are copied into
pinned host memory in the device's order, behind an event; the host reads a step's numbers later
(after it has queued the next step), waiting only for that copy. On the CPU the numbers are
ready at once.
"""

from __future__ import annotations

from collections import deque

import torch


class Readback:
    """A queue of (step, values) whose values reach the host as the device computes them."""

    def __init__(self) -> None:
        self._queue: deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = deque()

    def push(self, step: int, values: torch.Tensor) -> None:
        """Start copying ``values`` (a 1-D tensor) of ``step`` to the host; nothing waits."""
        event = None
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = values
        self._queue.append((step, host, event))

    def pop(self, through: int) -> list[tuple[int, list[float]]]:
        """The values of every pushed step up to ``through``, oldest first, waiting for their
        copies (and no other work) to finish."""
        out = []
        while self._queue and self._queue[0][0] <= through:
            step, host, event = self._queue.popleft()
            if event is not None:
                event.synchronize()
            out.append((step, host.tolist()))
        return out
