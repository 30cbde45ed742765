"""DHCP for netbooting: full mode (address pool and leases) and proxyDHCP, plus IPv6 RA.

Layout, pure to I/O:

* ``packets`` -- scapy parses bytes into a frozen ``DhcpMessage`` and builds replies;
* ``decide`` -- who is asking (architecture, PXE/iPXE/HTTP) and what the reply carries;
* ``leases`` -- full mode's address pool, written through to the store;
* ``handler`` -- one datagram in, replies out: parse, identify, decide, lease, record;
* ``probe`` -- is another DHCP server on the segment? (full mode refuses to start);
* ``ra`` -- answers IPv6 router solicitations so iPXE does not wait for SLAAC;
* ``sockets`` -- interface-bound UDP sockets, buffers, the interface's address;
* ``server`` -- ``DhcpService``, the asyncio adapter `metalseed serve` starts.

Import ``DhcpService`` from ``bootstrap.boot.dhcp.server``; this package
module stays empty so ``python -m bootstrap.boot.dhcp.server`` runs cleanly.
"""
