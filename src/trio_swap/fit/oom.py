"""Recognising a server that died of memory exhaustion while it started.

Matched against the failed start's last output lines and its exit reason.
Each pattern says which kind of memory ran out, so the ledger raises the need
of the right resources (``vramN`` for a device, ``ram`` for the host).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = ["exhausted_resources"]

#: Device memory: CUDA, HIP/ROCm, Metal, Vulkan and ggml's backend allocators.
_DEVICE: Final = re.compile(
    r"cuda(?:Malloc)?\s*(?:error)?[^\n]*out of memory|CUDA_ERROR_OUT_OF_MEMORY|"
    r"hip(?:Malloc)?[^\n]*out of memory|hipErrorOutOfMemory|"
    r"ErrorOutOfDeviceMemory|out of device memory|"
    r"failed to allocate (?:CUDA|ROCm|Metal|Vulkan|SYCL)\d*\s*buffer|"
    r"ggml_backend_\w+_buffer_type_alloc_buffer: allocating [^\n]* failed|"
    r"Insufficient Memory \(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory\)|"
    r"torch\.(?:cuda\.)?OutOfMemoryError|CUDA out of memory",
    re.IGNORECASE,
)
#: Host memory: the C++ and C allocators, Python, and the kernel's OOM killer.
_HOST: Final = re.compile(
    r"std::bad_alloc|Cannot allocate memory|\bMemoryError\b|"
    r"failed to allocate \d+(?:\.\d+)? ?[KMG]?i?B? (?:of )?(?:host|CPU)|"
    r"ggml_\w*: failed to allocate|out of memory",
    re.IGNORECASE,
)
#: How a process killed by the kernel's OOM killer ends (SIGKILL nobody sent).
OOM_KILLED: Final = "killed by SIGKILL"


def exhausted_resources(
    lines: Iterable[str], reason: str, resources: Mapping[str, int]
) -> tuple[str, ...] | None:
    """The resources that probably ran out, or None when this was not about memory.

    Device patterns name the ``vram*`` resources (all of them: the message
    rarely says which device), host patterns and an unexplained SIGKILL name
    ``ram``; a resource the config does not declare is left out, and when the
    named kind is not declared at all every resource is named (the need that
    matters is unknown, so each is raised).
    """
    text = "\n".join(lines)
    device = bool(_DEVICE.search(text))
    host = not device and bool(_HOST.search(text))
    if not device and not host and OOM_KILLED in reason:
        host = True
    if not device and not host:
        return None
    wanted = [
        name
        for name in resources
        if (device and name.startswith("vram")) or (host and name == "ram")
    ]
    return tuple(wanted) if wanted else tuple(resources)
