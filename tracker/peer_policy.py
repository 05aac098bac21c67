"""Who may say what about a peer entry (DESIGN.md: "a peer entry is what its own connection says").

* ``ip=`` (HTTP) and the address field (UDP) are honoured only from trusted proxies
  (``--trusted-proxy CIDR``): anyone else could list any address, or reach another
  peer's entry through it.  Everyone else is listed at the address the packet came from.
* ``role=origin`` puts an entry in the origin-seed tier; it is granted, not claimed: only
  announces from ``--origin-seed ADDR`` may say it.
* An entry is stopped only by its owner: with the ``key`` it was announced with
  (:meth:`tracker.swarm.SwarmRegistry.announce` checks that part).

Pure: addresses in, decisions out; the per-address answers are cached, since this runs on
every announce.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from modelcast.errors import ModelcastError

from .announce import Announce, ProtocolError, normalize_ip

CACHE_MAX = 65536  # distinct client addresses remembered; the cache is simply cleared when full


def parse_networks(items: Iterable[str], flag: str) -> tuple:
    """``items`` (addresses or CIDRs) as ip_network objects; a bad one is a one-line error naming ``flag``."""
    nets = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ModelcastError(f"{flag} {item!r} is not an IP address or CIDR (e.g. 10.0.0.0/8)") from None
    return tuple(nets)


class PeerPolicy:
    """Decides the address an announce is listed at, and whether it may claim the origin's role."""

    def __init__(self, trusted_proxies: Iterable[str] = (), origin_seeds: Iterable[str] = ()) -> None:
        self.trusted = parse_networks(trusted_proxies, "--trusted-proxy")
        self.origin_seeds = parse_networks(origin_seeds, "--origin-seed")
        self._cache: dict[str, tuple[bool, bool]] = {}

    def _lookup(self, remote: str) -> tuple[bool, bool]:
        known = self._cache.get(remote)
        if known is None:
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            try:
                addr = ipaddress.ip_address(remote)
            except ValueError:
                addr = None
            known = self._cache[remote] = (
                addr is not None and any(addr in net for net in self.trusted),
                addr is not None and any(addr in net for net in self.origin_seeds),
            )
        return known

    def address(self, a: Announce, remote: str | None) -> str:
        """The address ``a`` is listed at; raises ProtocolError for a role it may not claim."""
        remote_ip = normalize_ip(remote) if remote else None
        if remote_ip is None:
            raise ProtocolError("cannot tell the client's IP address")
        if not self.trusted and not self.origin_seeds:
            # The default: nobody is trusted, no lookups.
            if a.origin_seed:
                raise _role_refused(remote_ip)
            return remote_ip
        trusted, origin_seed = self._lookup(remote_ip)
        if a.origin_seed and not origin_seed:
            raise _role_refused(remote_ip)
        return a.ip if a.ip and trusted else remote_ip


def _role_refused(remote: str) -> ProtocolError:
    return ProtocolError(f"role=origin is granted by the registry (--origin-seed), not claimed; {remote} is not an "
                         "origin seed")
