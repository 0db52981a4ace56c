#!/usr/bin/env python3
"""Writes the seeds of the `workload_api_frames` fuzz target: what a local client sends on one
connection to the Workload API's unix socket. No network, no third-party module.

    python3 gen_workload_api_frames.py OUT_DIR      # e.g. fuzz/seeds/workload_api_frames

Keep this script out of OUT_DIR: scripts/fuzz.sh copies every file there into the corpus.

Seeds:
- grpc-c-core-fetch-x509svid: as gRPC C-core (py-spiffe) opens a connection: the preface,
  SETTINGS, WINDOW_UPDATE, then `FetchX509SVID` on stream 1 with the socket path, percent-encoded,
  as `:authority` and `workload.spiffe.io: true`, all added to the client's HPACK dynamic table;
  then `FetchX509Bundles` on stream 3 that refers to those entries (indices 62..66), so the
  rewriter's HPACK state across blocks is exercised. Each call's DATA is an empty request message.
- continuation-padded-priority: one header block split over HEADERS (PADDED | PRIORITY |
  END_STREAM) and a CONTINUATION, starting with a dynamic table size update, with a field never
  indexed, a Huffman-coded value and an `:authority` the server takes (kept as it is); PING and
  RST_STREAM around it pass unchanged.
- http1: not HTTP/2 with prior knowledge: passed on byte for byte.
"""
import os
import struct
import sys

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 8, 9
END_STREAM, END_HEADERS, PADDED, PRIORITY = 0x1, 0x4, 0x8, 0x20


def frame(kind, flags, stream, payload):
    assert len(payload) <= 16384
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def integer(value, prefix_bits, first):
    """An HPACK integer (RFC 7541 5.1) with `first`'s bits above the prefix."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes([first | value])
    out = [first | top]
    value -= top
    while value >= 128:
        out.append(value % 128 | 0x80)
        value //= 128
    out.append(value)
    return bytes(out)


def string(s):
    return integer(len(s), 7, 0x00) + s


# RFC 7541 Appendix B codes for the four symbols of "true" (as loona-hpack's HUFFMAN_CODE_TABLE).
HUFFMAN = {ord("t"): (0x9, 5), ord("r"): (0x2C, 6), ord("u"): (0x2D, 6), ord("e"): (0x5, 5)}


def huffman(s):
    bits, n = 0, 0
    for c in s:
        code, length = HUFFMAN[c]
        bits, n = bits << length | code, n + length
    pad = -n % 8
    bits, n = bits << pad | (1 << pad) - 1, n + pad  # EOS prefix: all ones
    return integer(n // 8, 7, 0x80) + bits.to_bytes(n // 8, "big")


def indexed(i):
    return integer(i, 7, 0x80)


def incremental(name_index, value, name=None):
    """Literal with incremental indexing (6.2.1): by static name index, or a new name."""
    if name is None:
        return integer(name_index, 6, 0x40) + string(value)
    return b"\x40" + string(name) + string(value)


def grpc_message(body=b""):
    return b"\x00" + struct.pack(">I", len(body)) + body


# Static table entries the seeds use (RFC 7541 Appendix A).
STATIC = {1: (b":authority", b""), 3: (b":method", b"POST"), 4: (b":path", b"/"),
          6: (b":scheme", b"http"), 31: (b"content-type", b""), 58: (b"user-agent", b"")}


def check(blocks):
    """Decodes the blocks in order with a dynamic table (enough of HPACK for the seeds' own
    encodings, Huffman for "true" only) and returns the header lists: a check of the indices."""
    table, lists = [], []
    decode = {code_len: sym for sym, code_len in HUFFMAN.items()}

    def get(i):
        return STATIC[i] if i <= 61 else table[i - 62]

    def read_int(b, at, bits):
        top = (1 << bits) - 1
        v, at = b[at] & top, at + 1
        if v < top:
            return v, at
        shift = 0
        while True:
            v += (b[at] & 0x7F) << shift
            shift, at = shift + 7, at + 1
            if not b[at - 1] & 0x80:
                return v, at

    def read_str(b, at):
        huff = b[at] & 0x80
        n, at = read_int(b, at, 7)
        raw = b[at:at + n]
        if not huff:
            return raw, at + n
        bits = "".join(f"{x:08b}" for x in raw)
        out, i = bytearray(), 0
        while i < len(bits):
            for length in (5, 6):
                key = (int(bits[i:i + length], 2), length)
                if i + length <= len(bits) and key in decode:
                    out.append(decode[key])
                    i += length
                    break
            else:
                assert set(bits[i:]) == {"1"} and len(bits) - i < 8, "bad Huffman padding"
                break
        return bytes(out), at + n

    for b in blocks:
        fields, at = [], 0
        while at < len(b):
            x = b[at]
            if x & 0x80:
                i, at = read_int(b, at, 7)
                fields.append(get(i))
            elif x & 0xE0 == 0x20:
                _, at = read_int(b, at, 5)
            else:
                bits, add = (6, True) if x & 0x40 else (4, False)
                i, at = read_int(b, at, bits)
                if i:
                    name = get(i)[0]
                else:
                    name, at = read_str(b, at)
                value, at = read_str(b, at)
                fields.append((name, value))
                if add:
                    table.insert(0, (name, value))
        lists.append(fields)
    return lists


def grpc_c_core():
    settings = b"".join(struct.pack(">HI", k, v) for k, v in
                        [(0x2, 0), (0x3, 0), (0x4, 4194304), (0x6, 16384)])
    first = (indexed(6) + indexed(3)
             + incremental(4, b"/SpiffeWorkloadAPI/FetchX509SVID")
             + incremental(1, b"run%2Fspiffe%2Fapi.sock")
             + incremental(0, b"trailers", name=b"te")
             + incremental(31, b"application/grpc")
             + incremental(58, b"grpc-python/1.66.1 grpc-c/43.0.0 (linux; chttp2)")
             + incremental(0, b"true", name=b"workload.spiffe.io"))
    # Newest first: workload.spiffe.io 62, user-agent 63, content-type 64, te 65, :authority 66,
    # :path 67. The references come before the new :path, which would shift them by one.
    second = (indexed(6) + indexed(3) + indexed(66) + indexed(65) + indexed(64) + indexed(63)
              + indexed(62) + incremental(4, b"/SpiffeWorkloadAPI/FetchX509Bundles"))
    lists = check([first, second])
    want = {b":authority": b"run%2Fspiffe%2Fapi.sock", b"workload.spiffe.io": b"true",
            b"te": b"trailers", b"content-type": b"application/grpc"}
    for fields, path in zip(lists, [b"/SpiffeWorkloadAPI/FetchX509SVID",
                                    b"/SpiffeWorkloadAPI/FetchX509Bundles"]):
        d = dict(fields)
        assert d[b":path"] == path and all(d[k] == v for k, v in want.items()), fields
    return (PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 4128769))
            + frame(HEADERS, END_HEADERS, 1, first)
            + frame(DATA, END_STREAM, 1, grpc_message())
            + frame(HEADERS, END_HEADERS, 3, second)
            + frame(DATA, END_STREAM, 3, grpc_message()))


def continuation_padded_priority():
    block = (integer(4096, 5, 0x20)  # dynamic table size update, at the block's start
             + indexed(6) + indexed(3)
             + incremental(4, b"/SpiffeWorkloadAPI/FetchJWTSVID")
             + b"\x01" + string(b"localhost:1234")  # :authority, without indexing: kept
             + b"\x00" + string(b"workload.spiffe.io") + huffman(b"true")
             + b"\x10" + string(b"authorization") + string(b"secret")  # never indexed
             + indexed(62))  # the :path just added
    fields = check([block])[0]
    assert (b"workload.spiffe.io", b"true") in fields and fields[-1] == fields[2], fields
    head, tail = block[:20], block[20:]
    pad = 3
    priority = struct.pack(">IB", 0, 15)  # depends on stream 0, weight 16
    return (PREFACE
            + frame(SETTINGS, 0, 0, b"")
            + frame(PING, 0, 0, b"12345678")
            + frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5,
                    bytes([pad]) + priority + head + b"\x00" * pad)
            + frame(CONTINUATION, END_HEADERS, 5, tail)
            + frame(RST_STREAM, 0, 5, struct.pack(">I", 8)))


def http1():
    return b"GET /SpiffeWorkloadAPI/FetchX509SVID HTTP/1.1\r\nHost: localhost\r\n\r\n"


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "workload_api_frames"
    os.makedirs(out, exist_ok=True)
    for name, data in [("grpc-c-core-fetch-x509svid", grpc_c_core()),
                       ("continuation-padded-priority", continuation_padded_priority()),
                       ("http1", http1())]:
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
