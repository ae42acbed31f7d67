"""The few GDB remote serial protocol packets the QEMU monitor needs: read and write registers by
name, numbered from the target description (docs/oracles.md §5).

Framing ($payload#checksum, '+'/'-' acknowledgements, '}' escapes) as the GDB manual's "Remote
Protocol" appendix describes it.
"""

from __future__ import annotations

import re
import socket
import time

from x86pt.errors import OracleError


class GdbClient:
    """The few RSP packets we need: register read/write and memory-free queries."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self._buf = b""
        self.registers: dict[str, tuple[int, int]] = {}  # name -> (number, bytes)

    def _recv(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise OracleError("gdbstub: no answer in time")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 16)
        except socket.timeout:
            raise OracleError("gdbstub: no answer in time") from None
        except OSError as e:
            raise OracleError(f"gdbstub: {e}") from None
        if not data:
            raise OracleError("gdbstub: QEMU closed the connection")
        self._buf += data

    def packet(self, data: str) -> str:
        body = data.encode()
        frame = b"$" + body + b"#" + b"%02x" % (sum(body) & 0xFF)
        deadline = time.monotonic() + self.timeout
        for _attempt in range(3):
            self.sock.sendall(frame)
            while True:
                # Skip acks and stray characters up to the reply frame.
                start = self._buf.find(b"$")
                nack = self._buf.find(b"-")
                if nack >= 0 and (start < 0 or nack < start):
                    self._buf = self._buf[nack + 1 :]
                    break  # resend
                if start >= 0:
                    end = self._buf.find(b"#", start)
                    if end >= 0 and len(self._buf) >= end + 3:
                        payload = self._buf[start + 1 : end]
                        self._buf = self._buf[end + 3 :]
                        self.sock.sendall(b"+")
                        return _rsp_unescape(payload).decode(errors="replace")
                self._recv(deadline)
        raise OracleError(f"gdbstub: packet {data[:20]!r} was refused three times")

    def load_register_map(self) -> None:
        """Number the registers from the target description (comments stripped: QEMU's i386
        XML has commented-out *_base registers that would shift the numbering, docs/oracles.md §5)."""
        regs: list[tuple[str, int, int | None]] = []
        self._collect("target.xml", regs, depth=0)
        num = 0
        for name, bits, regnum in regs:
            if regnum is not None:
                num = regnum
            self.registers[name] = (num, bits // 8)
            num += 1
        missing = [r for r in ("cs", "cr0", "cr3", "cr4", "efer") if r not in self.registers]
        if missing:
            raise OracleError(f"gdbstub target description lacks {', '.join(missing)}")

    def _collect(self, annex: str, regs: list, depth: int) -> None:
        if depth > 4:
            raise OracleError("gdbstub: target description includes nest too deep")
        xml = self._xfer(annex)
        xml = re.sub(r"<!--.*?-->", "", xml, flags=re.S)
        for m in re.finditer(r"<xi:include\s+href=\"([^\"]+)\"\s*/>|<reg\s([^>]*)>", xml):
            if m.group(1):
                self._collect(m.group(1), regs, depth + 1)
                continue
            attrs = dict(re.findall(r"(\w+)=\"([^\"]*)\"", m.group(2)))
            regs.append(
                (
                    attrs.get("name", "?"),
                    int(attrs.get("bitsize", "0")),
                    int(attrs["regnum"]) if "regnum" in attrs else None,
                )
            )

    def _xfer(self, annex: str) -> str:
        out = ""
        while True:
            reply = self.packet(f"qXfer:features:read:{annex}:{len(out):x},ffb")
            if not reply or reply[0] not in "ml":
                raise OracleError(f"gdbstub: cannot read {annex}: {reply[:40]!r}")
            out += reply[1:]
            if reply[0] == "l":
                return out

    def read_register(self, name: str) -> int:
        num, _width = self.registers[name]
        reply = self.packet(f"p{num:x}")
        try:
            return int.from_bytes(bytes.fromhex(reply), "little")
        except ValueError:
            raise OracleError(f"gdbstub: bad register read of {name}: {reply[:40]!r}") from None

    def write_register(self, name: str, value: int) -> None:
        num, width = self.registers[name]
        reply = self.packet(f"P{num:x}={value.to_bytes(width, 'little').hex()}")
        if reply != "OK":
            raise OracleError(f"gdbstub: write of {name}={value:#x} answered {reply!r}")


def _rsp_unescape(payload: bytes) -> bytes:
    if b"}" not in payload:
        return payload
    out = bytearray()
    it = iter(payload)
    for b in it:
        out.append((next(it, 0) ^ 0x20) if b == 0x7D else b)
    return bytes(out)
