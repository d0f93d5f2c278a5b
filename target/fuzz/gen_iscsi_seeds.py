#!/usr/bin/env python3
"""Writes seed inputs for the `iscsi` fuzz target into corpus/iscsi/: whole
initiator byte streams (login, then commands) built from RFC 7143's PDU
layouts, so the fuzzer starts inside the full feature phase instead of
having to discover a login first. Run from target/fuzz:
    python3 gen_iscsi_seeds.py
"""
import hashlib
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "iscsi")
IQN = b"iqn.2026-12.io.cairn:vol"


def pad(b):
    return b + b"\0" * ((4 - len(b) % 4) % 4)


def pdu(op, flags, itt, rest=b"", lun=0, data=b"", hdr=None):
    """A BHS with opcode, flags, data length, LUN, ITT and bytes 20..48."""
    bhs = bytearray(48)
    bhs[0] = op
    bhs[1] = flags
    bhs[5:8] = len(data).to_bytes(3, "big")
    bhs[8:16] = struct.pack(">Q", lun)
    bhs[16:20] = struct.pack(">I", itt)
    bhs[20:20 + len(rest)] = rest
    if hdr:
        for at, v in hdr.items():
            bhs[at] = v
    return bytes(bhs) + pad(data)


def keys(*kv):
    return b"".join(k + b"=" + v + b"\0" for k, v in kv)


def login(target=IQN, discovery=False, digest=b"None"):
    out = b""
    k = [(b"InitiatorName", b"iqn.2026-12.test:fuzz")]
    k += [(b"SessionType", b"Discovery")] if discovery else [(b"TargetName", target)]
    k += [(b"AuthMethod", b"None")]
    isid = b"\x80\0\0\0\0\x01"
    rest = b"\0\0\0\0" + struct.pack(">II", 1, 0)  # CID, CmdSN, ExpStatSN
    out += pdu(0x43, 0x81, 1, rest, data=keys(*k), lun=int.from_bytes(isid + b"\0\0", "big"))
    ops = keys((b"HeaderDigest", digest), (b"DataDigest", b"None"),
               (b"ImmediateData", b"Yes"), (b"InitialR2T", b"No"),
               (b"MaxRecvDataSegmentLength", b"8192"), (b"MaxBurstLength", b"16384"),
               (b"FirstBurstLength", b"8192"), (b"MaxOutstandingR2T", b"2"))
    out += pdu(0x43, 0x87, 1, rest, data=ops, lun=int.from_bytes(isid + b"\0\0", "big"))
    return out


def cmd(itt, cmdsn, cdb, edtl=0, read=False, write=False, data=b"", lun=0):
    flags = 0x80 | (0x40 if read else 0) | (0x20 if write else 0)
    rest = struct.pack(">III", edtl, cmdsn, 0) + b"\0" * 4 + cdb.ljust(16, b"\0")
    return pdu(0x01, flags, itt, rest[:28], lun=lun, data=data)


def data_out(itt, ttt, datasn, offset, data, final=True):
    rest = struct.pack(">I", ttt) + b"\0" * 12 + struct.pack(">II", datasn, offset)
    return pdu(0x05, 0x80 if final else 0, itt, rest, data=data)


def write10(lba, blocks):
    return bytes([0x2a, 0]) + struct.pack(">I", lba) + b"\0" + struct.pack(">H", blocks) + b"\0"


def read10(lba, blocks):
    return bytes([0x28, 0]) + struct.pack(">I", lba) + b"\0" + struct.pack(">H", blocks) + b"\0"


def seeds():
    yield "login", login()
    yield "login-digests", login(digest=b"CRC32C,None")
    yield "discovery", login(discovery=True) + pdu(
        0x44, 0x80, 2, struct.pack(">III", 0xffffffff, 1, 0), data=keys((b"SendTargets", b"All")))
    yield "no-such-target", login(target=b"iqn.2026-12.io.cairn:nope")
    s = login()
    s += cmd(2, 1, b"\x00" * 6)  # TEST UNIT READY
    s += cmd(3, 2, bytes([0x12, 0, 0, 0, 96, 0]), 96, read=True)  # INQUIRY
    s += cmd(4, 3, bytes([0x12, 1, 0x83, 0, 255, 0]), 255, read=True)  # VPD 0x83
    s += cmd(5, 4, bytes([0x9e, 0x10]) + b"\0" * 11 + bytes([32, 0, 0]), 32, read=True)
    s += cmd(6, 5, bytes([0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), 256, read=True)
    yield "inquiry-capacity-luns", s
    s = login()
    payload = bytes(range(256)) * 16  # 4 KiB
    s += cmd(2, 1, write10(8, 8), 4096, write=True, data=payload)
    s += cmd(3, 2, read10(8, 8), 4096, read=True)
    s += cmd(4, 3, bytes([0x35]) + b"\0" * 9)  # SYNCHRONIZE CACHE 10
    yield "write-immediate-read", s
    s = login()
    s += cmd(2, 1, write10(0, 32), 16384, write=True, data=payload * 2)
    s += data_out(2, 0xffffffff, 0, 8192, payload * 2)  # rest of the first burst? (unsolicited)
    s += data_out(2, 1, 0, 8192, payload * 2)  # as if answering R2T ttt 1
    yield "write-unsolicited-and-r2t", s
    s = login()
    s += pdu(0x40, 0x80, 2, struct.pack(">III", 0xffffffff, 1, 0), data=b"ping")  # NOP-Out
    s += pdu(0x02 | 0x40, 0x81, 3, struct.pack(">III", 2, 1, 0))  # ABORT TASK
    s += pdu(0x02 | 0x40, 0x85, 4, struct.pack(">III", 0xffffffff, 1, 0))  # LUN RESET
    s += pdu(0x46, 0x80, 5, struct.pack(">III", 0, 1, 0))  # Logout
    yield "nop-tmf-logout", s
    s = login()
    s += cmd(2, 1, bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), 24, write=True,
             data=struct.pack(">HH", 22, 16) + b"\0" * 4 + struct.pack(">QI", 0, 8) + b"\0" * 4)  # UNMAP
    s += cmd(3, 2, bytes([0x93, 0x08]) + struct.pack(">QI", 16, 8) + b"\0\0", 512, write=True,
             data=b"\0" * 512)  # WRITE SAME 16 with UNMAP
    s += cmd(4, 3, bytes([0x89, 0]) + struct.pack(">Q", 0) + b"\0\0\0\x01\0\0", 1024, write=True,
             data=b"\0" * 1024)  # COMPARE AND WRITE
    s += cmd(5, 4, bytes([0x9e, 0x12]) + struct.pack(">QI", 0, 64) + b"\0\0", 64, read=True)
    yield "unmap-writesame-caw-lbastatus", s


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, data in seeds():
        h = hashlib.sha1(data).hexdigest()
        with open(os.path.join(OUT, h), "wb") as f:
            f.write(data)
        print(f"{name}: {len(data)} bytes -> corpus/iscsi/{h}")


if __name__ == "__main__":
    main()
