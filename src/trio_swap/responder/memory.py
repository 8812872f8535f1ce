"""--hold-memory's block: a model's weights, resident, and released by a sleep.

A sleeping vLLM or SGLang server gives its memory back while its process
lives; the responder stages that by unmapping the block on sleep (so RSS
really drops) and mapping and touching it again on wake.
"""

from __future__ import annotations

import mmap
from typing import final

import trio

__all__ = ["HeldMemory", "hold_memory"]


def hold_memory(size: int) -> mmap.mmap:
    """``size`` bytes of private anonymous memory, every page written, so all resident.

    Writing (not reading) is what matters: a read maps the shared zero page, and
    memory never touched is only promised, so RSS and PSS would not show it.
    Raises OSError (or OverflowError) when the kernel refuses the mapping; a
    mapping granted but not backed ends in the kernel's OOM killer, as a real
    server's would.
    """
    block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    return block


@final
class HeldMemory:
    """``size`` bytes held, or released; touched only from the responder's trio run."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._block: mmap.mmap | None = None

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"<HeldMemory {self.size} bytes {state}>"

    @property
    def held(self) -> bool:
        return self._block is not None

    async def hold(self) -> None:
        """Map and touch the block (in a thread: a signal is still noticed meanwhile).

        Raises:
            OSError, OverflowError: the kernel refused the mapping.
        """
        if self._block is None:
            self._block = await trio.to_thread.run_sync(hold_memory, self.size)

    def release(self) -> None:
        """Unmap the block: its pages go back to the kernel at once."""
        block, self._block = self._block, None
        if block is not None:
            block.close()
