"""masqued: IP VPN over HTTP/3 CONNECT-IP (RFC 9484)."""

__version__ = "0.1.0"
