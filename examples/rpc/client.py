"""A small msgpack-RPC client for rpcserver.py.

    python3 client.py HOST:PORT METHOD [ARG ...]     (args parsed as JSON)

As a library:  c = Client('127.0.0.1', 6000); c.call('add', 1, 2)
A call never hangs: it has a timeout, and a connection that dies mid-call
(a worker killed) raises RpcError -- or, for calls marked idempotent with
retries=N, is retried on a new connection.
"""
import itertools
import json
import socket
import sys

import msgpack

REQUEST, RESPONSE, NOTIFY = 0, 1, 2


class RpcError(Exception):
    """The server answered with an error, or the connection failed."""


class Client(object):
    def __init__(self, host, port, timeout=10.0):
        self.address = (host, int(port))
        self.timeout = timeout
        self.sock = None
        self.ids = itertools.count(1)
        self.unpacker = None

    def connect(self):
        self.close()
        self.sock = socket.create_connection(self.address, self.timeout)
        self.sock.settimeout(self.timeout)
        self.unpacker = msgpack.Unpacker(raw=False)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def call(self, method, *params, retries=0):
        """Call ``method``; retry on a new connection up to ``retries``
        times when the connection breaks (only for idempotent calls)."""
        for attempt in range(retries + 1):
            try:
                return self._call(method, params)
            except (OSError, EOFError) as e:
                self.close()
                if attempt == retries:
                    raise RpcError('connection failed during %s: %s'
                                   % (method, e))

    def _call(self, method, params):
        if self.sock is None:
            self.connect()
        msgid = next(self.ids)
        self.sock.sendall(msgpack.packb([REQUEST, msgid, method,
                                         list(params)], use_bin_type=True))
        while True:
            for msg in self.unpacker:
                if msg[0] == RESPONSE and msg[1] == msgid:
                    if msg[2] is not None:
                        raise RpcError(msg[2])
                    return msg[3]
            data = self.sock.recv(65536)
            if not data:
                raise EOFError('server closed the connection')
            self.unpacker.feed(data)

    def notify(self, method, *params):
        if self.sock is None:
            self.connect()
        self.sock.sendall(msgpack.packb([NOTIFY, method, list(params)],
                                        use_bin_type=True))


def main(argv):
    if len(argv) < 3:
        print('usage: client.py HOST:PORT METHOD [ARG ...]', file=sys.stderr)
        return 2
    host, _, port = argv[1].rpartition(':')
    args = [json.loads(a) for a in argv[3:]]
    try:
        print(json.dumps(Client(host, port).call(argv[2], *args)))
    except RpcError as e:
        print('error: %s' % e, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
