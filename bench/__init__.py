"""The benchmark harness (issue 8): masqued against the direct path, wireguard-go and
OpenVPN on one machine. Run it with ``make bench`` (see bench/README.md)."""
