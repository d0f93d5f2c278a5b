#!/usr/bin/env python3
"""Writes the seed corpus of the NBD fuzz targets (corpus/seed-*).

Each seed is what a real client sends (qemu-nbd/nbdinfo/nbd-client style):
client flags, options, then requests. Run from anywhere:

    python3 target/fuzz/gen_seeds.py

Seeds are named seed-<what>; files that `cargo fuzz` adds have hash names,
so regenerating the seeds never touches them (except to remove exact copies
of a seed, which `cargo fuzz cmin` leaves under hash names). Only the
standard library.
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 9, 10

INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16

FLAGS_FIXED = 1
FLAGS_NO_ZEROES = 2


def flags(f=FLAGS_FIXED | FLAGS_NO_ZEROES):
    return struct.pack(">I", f)


def opt(o, data=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data


def s32(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">I", len(b)) + b


def info_data(name, reqs=()):
    return s32(name) + struct.pack(">H", len(reqs)) + b"".join(
        struct.pack(">H", r) for r in reqs
    )


def meta_data(export, queries):
    return s32(export) + struct.pack(">I", len(queries)) + b"".join(
        s32(q) for q in queries
    )


def req(kind, offset=0, length=0, fl=0, cookie=None, payload=None):
    global _cookie
    if cookie is None:
        _cookie += 1
        cookie = _cookie
    b = struct.pack(">IHHQQI", REQUEST_MAGIC, fl, kind, cookie, offset, length)
    if kind == WRITE:
        if payload is None:
            payload = bytes((i * 7 + 1) & 0xFF for i in range(length))
        b += payload
    return b


_cookie = 0

# What a modern client sends: structured replies, base:allocation, GO with
# block size constraints.
MODERN = (
    flags()
    + opt(OPT_STRUCTURED_REPLY)
    + opt(OPT_SET_META_CONTEXT, meta_data("vol", ["base:allocation"]))
    + opt(OPT_GO, info_data("vol", [INFO_BLOCK_SIZE]))
)
SIMPLE = flags() + opt(OPT_GO, info_data("vol", [INFO_BLOCK_SIZE, INFO_NAME]))


def workload():
    return (
        req(WRITE, 0, 4096)
        + req(READ, 0, 4096)
        + req(FLUSH)
        + req(TRIM, 4096, 8192, FUA)
        + req(WRITE_ZEROES, 16384, 4096, NO_HOLE)
        + req(WRITE_ZEROES, 20480, 4096, FAST_ZERO)
        + req(BLOCK_STATUS, 0, 65536)
        + req(BLOCK_STATUS, 512, 4096, REQ_ONE)
        + req(READ, 8192, 512, DF)
        + req(CACHE, 0, 4096)
    )


def handshake_seeds():
    s = {}
    s["modern-session"] = MODERN + workload() + req(DISC)
    s["simple-session"] = SIMPLE + req(WRITE, 512, 1024, FUA) + req(READ, 0, 2048) + req(FLUSH) + req(DISC)
    s["export-name"] = flags(FLAGS_FIXED) + opt(OPT_EXPORT_NAME, b"vol") + req(WRITE, 0, 512) + req(READ, 0, 512) + req(DISC)
    s["export-name-default-nozeroes"] = flags() + opt(OPT_STRUCTURED_REPLY) + opt(OPT_EXPORT_NAME) + req(READ, 0, 4096) + req(DISC)
    s["export-name-unknown"] = flags() + opt(OPT_EXPORT_NAME, b"nope")
    s["list-abort"] = flags() + opt(OPT_LIST) + opt(OPT_ABORT)
    s["list-hangup"] = flags() + opt(OPT_LIST)
    s["info-then-go"] = (
        flags()
        + opt(OPT_INFO, info_data("ro", [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]))
        + opt(OPT_INFO, info_data("missing"))
        + opt(OPT_GO, info_data("ro"))
        + req(READ, 0, 4096)
        + req(WRITE, 0, 512)
        + req(TRIM, 0, 512)
        + req(DISC)
    )
    s["starttls"] = flags() + opt(OPT_STARTTLS) + opt(OPT_STARTTLS, b"x") + opt(OPT_ABORT)
    s["list-meta"] = (
        flags()
        + opt(OPT_LIST_META_CONTEXT, meta_data("vol", []))
        + opt(OPT_STRUCTURED_REPLY)
        + opt(OPT_STRUCTURED_REPLY)
        + opt(OPT_LIST_META_CONTEXT, meta_data("vol", ["base:"]))
        + opt(OPT_LIST_META_CONTEXT, meta_data("", ["qemu:dirty-bitmap:x"]))
        + opt(OPT_SET_META_CONTEXT, meta_data("ro", ["base:allocation", "other:x"]))
        + opt(OPT_GO, info_data("ro", [INFO_BLOCK_SIZE]))
        + req(BLOCK_STATUS, 0, 65536)
        + req(DISC)
    )
    s["meta-other-export"] = (
        flags()
        + opt(OPT_STRUCTURED_REPLY)
        + opt(OPT_SET_META_CONTEXT, meta_data("ro", ["base:allocation"]))
        + opt(OPT_GO, info_data("vol"))
        + req(BLOCK_STATUS, 0, 4096)
        + req(DISC)
    )
    s["bad-options"] = (
        flags()
        + opt(99, b"abc")
        + opt(OPT_LIST, b"x")
        + opt(OPT_GO, b"\x00\x00\x00\x05ab")
        + opt(OPT_INFO, info_data("vol") + b"\x00")
        + opt(OPT_SET_META_CONTEXT, meta_data("vol", ["base:allocation"]))
        + opt(OPT_GO, info_data(""))
        + req(DISC)
    )
    s["too-big-option"] = flags() + struct.pack(">QII", IHAVEOPT, OPT_INFO, (1 << 20) + 1) + b"\0" * 64
    s["bad-client-flags"] = flags(0x80)
    s["bad-option-magic"] = flags() + struct.pack(">QII", 0x1234, OPT_LIST, 0)
    s["probe"] = b""
    return s


def requests_seeds():
    # Mode byte: bit0 structured, bit1 allocation, bit2 read-only,
    # bit3 unaligned size, bits 4-7 injected EIO.
    s = {}
    s["structured-alloc"] = bytes([0x03]) + workload() + req(DISC)
    s["simple"] = bytes([0x00]) + workload() + req(DISC)
    s["read-only"] = bytes([0x05]) + workload()
    s["unaligned-size"] = bytes([0x0B]) + req(READ, (1 << 20) - 1024, 1024) + req(BLOCK_STATUS, (1 << 20) - 1024, 724) + req(WRITE, (1 << 20) - 512, 512)
    s["faults"] = bytes([0x13]) + req(WRITE, 65536 - 1024, 1024) + req(READ, 65536 - 1024, 1024) + req(BLOCK_STATUS, 0, 1 << 20) + req(TRIM, 0, 1 << 16)
    s["errors-simple"] = bytes([0x00]) + req(READ, 1 << 20, 512) + req(READ, 0, 0xFFFFFFFF) + req(WRITE, 1 << 20, 512) + req(BLOCK_STATUS, 0, 512) + req(READ, 0, 512, DF) + req(READ, 0, 1024)
    s["dup-cookies-simple"] = bytes([0x00]) + req(FLUSH, cookie=9) + req(TRIM, 0, 512, cookie=9) + req(READ, 0, 512, cookie=10)
    s["errors"] = bytes([0x01]) + (
        req(READ, 1 << 20, 512)
        + req(READ, 0, 100)
        + req(READ, 0, 0xFFFFFFFF)
        + req(WRITE, 1 << 40, 0)
        + req(FLUSH, 512, 0)
        + req(BLOCK_STATUS, 0, 512)
        + req(WRITE_ZEROES, 0, 512, NO_HOLE | FAST_ZERO)
        + req(READ, 0, 512, 0x80)
        + req(77, 0, 0)
        + req(READ, 0xFFFFFFFFFFFFFE00, 1024)
    )
    s["many-in-flight"] = bytes([0x03]) + b"".join(req(READ, i * 4096, 4096) for i in range(20))
    s["dup-cookies"] = bytes([0x01]) + req(READ, 0, 512, cookie=1) + req(FLUSH, cookie=1) + req(WRITE, 0, 512, cookie=1)
    s["write-eof"] = bytes([0x00]) + req(WRITE, 0, 1 << 16, payload=b"abc")
    s["bad-magic"] = bytes([0x00]) + req(FLUSH) + b"\0" * 28
    s["half-header"] = bytes([0x01]) + req(FLUSH) + req(READ)[:13]
    return s


def wire_seeds():
    s = {}
    s["request"] = b"\x00" + req(WRITE, 4096, 512, FUA)[:28]
    s["info"] = b"\x01" + info_data("vol", [INFO_BLOCK_SIZE, INFO_NAME])
    s["meta"] = b"\x02" + meta_data("vol", ["base:allocation", "base:", "x"])
    s["export-name"] = b"\x03vol"
    s["message"] = b"\x04" + ("é" * 2100).encode()
    s["descriptors"] = b"\x05" + struct.pack(">IB", 65536, 0) + b"".join(
        struct.pack(">II", l, f) for l, f in [(4096, 0), (4096, 0), (8192, 3), (0, 0), (512, 0)]
    )
    return s


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(data)
    # `cargo fuzz cmin` keeps inputs under hash names: drop those that
    # repeat a seed, so the seeds keep their names and are stored once.
    contents = set(seeds.values())
    dropped = 0
    for f in os.listdir(d):
        path = os.path.join(d, f)
        if not f.startswith("seed-") and os.path.isfile(path):
            with open(path, "rb") as fh:
                if fh.read() in contents:
                    os.remove(path)
                    dropped += 1
    print(f"{target}: {len(seeds)} seeds in {os.path.relpath(d)}"
          + (f" ({dropped} copies under hash names removed)" if dropped else ""))


if __name__ == "__main__":
    write("handshake", handshake_seeds())
    write("requests", requests_seeds())
    write("wire", wire_seeds())
