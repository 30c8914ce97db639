"""A prefork msgpack-RPC server on processhandler's handle().

    python3 ../../processhandler.py -c config.ini        # from this folder
    python3 client.py 127.0.0.1:6000 add 1 2             # -> 3

Wire protocol (msgpack-rpc): request [0, msgid, method, params], response
[1, msgid, error, result], notification [2, method, params].  A connection
carries any number of messages; each worker serves one connection at a time
per thread (worker_type = thread gives `threads` at once).  Methods are the
`rpc_<name>` methods below.  msgpack is an optional extra: without it the
workers fail to boot with a one-line reason.
"""
import os
import time

import processhandler

REQUEST, RESPONSE, NOTIFY = 0, 1, 2


class RpcWorker(processhandler.Worker):

    def init(self):
        try:
            import msgpack
        except ImportError:
            raise RuntimeError('msgpack is not installed: pip install msgpack')
        self.msgpack = msgpack
        self.notified = 0

    def handle(self, conn, addr):
        unpacker = self.msgpack.Unpacker(raw=False)
        packer = self.msgpack.Packer(use_bin_type=True)
        while self.alive:
            data = conn.recv(65536)
            if not data:
                return                      # client closed the connection
            unpacker.feed(data)
            for msg in unpacker:
                reply = self.dispatch(msg)
                if reply is not None:
                    conn.sendall(packer.pack(reply))

    def dispatch(self, msg):
        if not isinstance(msg, (list, tuple)) or not msg:
            return [RESPONSE, 0, 'malformed message', None]
        if msg[0] == NOTIFY and len(msg) == 3:
            self.call(msg[1], msg[2])
            return None
        if msg[0] != REQUEST or len(msg) != 4:
            return [RESPONSE, 0, 'malformed message', None]
        _, msgid, method, params = msg
        try:
            return [RESPONSE, msgid, None, self.call(method, params)]
        except Exception as e:
            return [RESPONSE, msgid, '%s: %s' % (type(e).__name__, e), None]

    def call(self, method, params):
        fn = getattr(self, 'rpc_' + str(method), None)
        if fn is None:
            raise LookupError('no method %r' % method)
        return fn(*params)

    # -- the methods -----------------------------------------------------------

    def rpc_add(self, a, b):
        return a + b

    def rpc_echo(self, value):
        return value

    def rpc_pid(self):
        return os.getpid()

    def rpc_sleep(self, seconds):
        time.sleep(seconds)
        return seconds

    def rpc_notified(self):
        return self.notified

    def rpc_note(self, *args):
        self.notified += 1
