"""One handler per command a client may send: the SOCKS handshake hands a complete
request to :mod:`~tunnel.handlers.connect`, :mod:`~tunnel.handlers.bind` or
:mod:`~tunnel.handlers.associate`; HTTP is :mod:`tunnel.http_proxy`. Each sees the
client connection only as :class:`~tunnel.handlers.base.Client`."""
