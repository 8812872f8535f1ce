"""Which ``Host`` names trio-swap answers: the DNS rebinding defence.

A web page on ``http://attacker.example:8080`` can rebind its name to
``127.0.0.1`` after loading; its scripts then talk to a trio-swap on that
port as the page's *own* origin (no CORS, no ``Sec-Fetch-Site: cross-site``),
and read ``/logs`` or unload models. The one thing that gives such a request
away is its ``Host`` header: the attacker's name. So every request whose
``Host`` names something else than these is refused (docs/security.md):

* ``localhost`` and ``*.localhost`` (RFC 6761: always loopback), and the
  loopback addresses (``127.0.0.0/8``, ``[::1]``);
* the ``--listen`` host (a name or an address); when that is ``0.0.0.0`` or
  ``::`` (every interface), *any* IP address literal. A page whose origin is
  an address was not loaded through a name, so nothing was rebound; and a
  server on every interface is reached through addresses the machine may not
  even know it has (a container's published port, a NAT'd address). On a
  specific address (``127.0.0.1``, the default) nothing but that address and
  loopback can be a legitimate ``Host``, so other addresses are refused too;
* this machine's host name (:func:`socket.gethostname`, and its first label);
* ``allowedHosts`` from the config: exact names, addresses and
  ``*.example.com`` patterns, or ``*`` to turn the check off.

A request without ``Host`` (HTTP/1.0) passes: a browser always sends one.
Names compare case-insensitively, without the port and a trailing dot.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Final, final

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = ["HostPolicy", "host_name"]

_LOOPBACK_NAMES: Final = ("localhost",)
_LOOPBACK_SUFFIXES: Final = (".localhost",)
_ANY: Final = "*"


def host_name(value: bytes) -> str | None:
    """The name a ``Host`` header value names: lower case, no port, no brackets, no
    trailing dot; None when it cannot be a host (``[::1``, ``name:port:x``, ``a:b``)."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return text[1:end]
    name, colon, port = text.rpartition(":")
    if not colon:
        return text.removesuffix(".")
    if ":" in name:  # an IPv6 address without brackets: not valid, but unambiguous
        return text if _address(text) is not None else None
    if port and not port.isdigit():
        return None
    return name.removesuffix(".")


@final
class HostPolicy:
    """The allowlist of one config, decided once; :meth:`allows` per request.

    A reload builds a new policy and the middleware swaps it in with one
    assignment, so a request sees either the old list or the new one. Each
    policy remembers the last ``Host`` value it allowed: clients send the same
    one on every request, which then costs one bytes comparison.
    """

    __slots__ = ("_addresses", "_any", "_any_address", "_last", "_names", "_suffixes")

    def __init__(
        self,
        allowed: Iterable[str] = (),
        *,
        listen_host: str | None = None,
        machine_name: str | None = None,
    ) -> None:
        """``allowed``: ``allowedHosts`` as loaded (lower case, no trailing dot);
        ``listen_host``: the host of ``--listen`` (None: loopback only);
        ``machine_name``: this machine's host name (None: :func:`socket.gethostname`)."""
        entries = tuple(allowed)
        self._any = _ANY in entries
        names = set(_LOOPBACK_NAMES)
        addresses: set[_Address] = set()
        for entry in (*entries, listen_host or ""):
            if not entry or entry.startswith("*."):
                continue
            address = _address(entry.strip("[]"))
            if address is None:
                names.add(entry.lower().removesuffix("."))
            else:
                addresses.add(address)
        machine = (socket.gethostname() if machine_name is None else machine_name).lower()
        machine = machine.removesuffix(".")
        if machine:
            names.update((machine, machine.partition(".")[0]))
        self._names = frozenset(names)
        self._addresses = frozenset(addresses)
        #: Listening on every interface: any address literal is a legitimate Host.
        self._any_address = any(address.is_unspecified for address in addresses)
        self._suffixes = (*_LOOPBACK_SUFFIXES, *(e[1:] for e in entries if e.startswith("*.")))
        self._last = b""

    @property
    def disabled(self) -> bool:
        """``allowedHosts: ["*"]``: every Host is answered."""
        return self._any

    def allows(self, value: bytes) -> bool:
        """Whether a request with ``Host: value`` may be answered."""
        if value == self._last or self._any:
            return True
        name = host_name(value)
        if name is None:
            return False
        if name in self._names or name.endswith(self._suffixes):
            self._last = value
            return True
        address = _address(name)
        if address is not None and (
            self._any_address or address.is_loopback or address in self._addresses
        ):
            self._last = value
            return True
        return False


def _address(text: str) -> _Address | None:
    """``text`` as an IP address (IPv4-mapped IPv6 as its IPv4 address), or None."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
