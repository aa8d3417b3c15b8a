"""A tiny filter speaking the real milter protocol on loopback, for tests.

Each connection runs in a thread; `script(command, data)` says what to send
back for each step: a list of reply packets, HANG (send nothing, keep the
connection), DROP (close it), or None for CONTINUE. Steps the filter
negotiated away with a no-reply flag get no reply, as a real filter would.
Everything received is kept in `seen` as (command, data) pairs.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from mailwarden.protocol import milter as m

HANG = "hang"
DROP = "drop"

_NO_REPLY = {
    m.CONNECT: m.P_NR_CONN,
    m.HELO: m.P_NR_HELO,
    m.MAIL: m.P_NR_MAIL,
    m.RCPT: m.P_NR_RCPT,
    m.DATA: m.P_NR_DATA,
    m.HEADER: m.P_NR_HDR,
    m.EOH: m.P_NR_EOH,
    m.BODY: m.P_NR_BODY,
    m.UNKNOWN: m.P_NR_UNKN,
}


class PeerMilter:
    def __init__(
        self,
        script: Callable[[bytes, bytes], Any] | None = None,
        protocol: int = 0,
        actions: int = m.ALL_ACTIONS,
        symlists: dict[int, tuple[str, ...]] | None = None,
        unix_path: str = "",
    ) -> None:
        self.script = script or (lambda command, data: None)
        self.protocol = protocol
        self.actions = actions
        self.symlists = symlists or {}
        self.seen: list[tuple[bytes, bytes]] = []
        self.connections = 0
        if unix_path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.bind(unix_path)
            self._sock.listen()
            self.port = 0
            self.address = f"unix:{unix_path}"
        else:
            self._sock = socket.create_server(("127.0.0.1", 0))
            self.port = self._sock.getsockname()[1]
            self.address = f"inet:127.0.0.1:{self.port}"
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name=f"milter-peer-{self.port}").start()

    def commands(self, command: bytes) -> list[bytes]:
        with self._lock:
            return [data for c, data in self.seen if c == command]

    def macros(self) -> dict[str, str]:
        """Every macro received, by name (later values win)."""
        out: dict[str, str] = {}
        for data in self.commands(m.MACRO):
            parts = data[1:].split(b"\x00")[:-1]
            for name, value in zip(parts[::2], parts[1::2], strict=True):
                out[name.decode()] = value.decode()
        return out

    def headers(self) -> list[tuple[str, str]]:
        return [tuple(p.decode() for p in d.split(b"\x00")[:2]) for d in self.commands(m.HEADER)]  # type: ignore[misc]

    def close(self) -> None:
        self._sock.close()
        with self._lock:
            for conn in self._open:
                try:
                    conn.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._open.append(conn)
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                length = struct.unpack(">I", buf[:4])[0]
                command, data = buf[4:5], buf[5 : 4 + length]
                buf = buf[4 + length :]
                with self._lock:
                    self.seen.append((command, data))
                if command == m.OPTNEG:
                    conn.sendall(m.encode_reply(m.OptNeg(m.OPTNEG, 6, self.actions, self.protocol, self.symlists)))
                    continue
                if command in (m.MACRO, m.ABORT):
                    continue
                if command in (m.QUIT, m.QUIT_NC):
                    return
                answer = self.script(command, data)
                if answer == HANG:
                    continue
                if answer == DROP:
                    return
                if self.protocol & _NO_REPLY.get(command, 0):
                    continue
                for reply in answer or [m.Reply(m.CONTINUE)]:
                    conn.sendall(reply if isinstance(reply, bytes) else m.encode_reply(reply))
        except OSError:
            return
        finally:
            conn.close()
