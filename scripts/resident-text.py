#!/usr/bin/env python3
"""Which code of a running process's binary is resident, and where: reads /proc/PID/pagemap (root)
for the binary's executable mapping and names, with `nm`, the functions around each 64 KiB window
that has resident pages outside the region `ORDER_FILE` (a symbol order: sidecar/symbol-order.txt)
lays out. The kernel maps a fault's neighbours in the page cache up to 64 KiB around it, so one
function touched far from the others costs a window.

Usage: sudo scripts/resident-text.py PID [ORDER_FILE]
   e.g. scripts/resident-text.py "$(pidof meshid-sidecar)" sidecar/symbol-order.txt
"""
import bisect
import os
import struct
import subprocess
import sys


def main():
    pid = int(sys.argv[1])
    order_file = sys.argv[2] if len(sys.argv) > 2 else None
    binary = os.readlink(f"/proc/{pid}/exe")
    text = None
    for line in open(f"/proc/{pid}/maps"):
        fields = line.split()
        if len(fields) > 5 and fields[5] == binary and fields[1] == "r-xp":
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            text = (lo, hi, int(fields[2], 16))
            break
    if text is None:
        sys.exit(f"no executable mapping of {binary} in process {pid}")
    lo, hi, offset = text
    # The executable LOAD segment: file offset and virtual address, to turn runtime addresses
    # into the addresses nm prints.
    segments = subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True).stdout
    load = next(
        l.split() for l in segments.splitlines() if l.strip().startswith("LOAD") and " R E " in l
    )
    seg_offset, seg_vaddr = int(load[1], 16), int(load[2], 16)
    base = lo - (offset - seg_offset) - seg_vaddr
    symbols = []
    for l in subprocess.run(
        ["nm", "-S", "--defined-only", binary], capture_output=True, text=True
    ).stdout.splitlines():
        p = l.split()
        if len(p) == 4 and p[2] in "tTwW":
            symbols.append((int(p[0], 16), int(p[1], 16), p[3]))
    symbols.sort()
    starts = [s[0] for s in symbols]
    pages = (hi - lo) // 4096
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(lo // 4096 * 8)
        data = f.read(pages * 8)
    present = [i for i in range(pages) if struct.unpack_from("<Q", data, i * 8)[0] >> 63]
    print(f"{binary}: {len(present) * 4} KiB of {(hi - lo) // 1024} KiB of code resident")
    region = None
    if order_file:
        ordered = set(open(order_file).read().split())
        inside = [s for s in symbols if s[2] in ordered]
        if inside:
            region = (min(s[0] for s in inside), max(s[0] + s[1] for s in inside))
            within = sum(1 for i in present if region[0] <= lo + i * 4096 - base < region[1])
            print(
                f"ordered region: {(region[1] - region[0]) // 1024} KiB, {len(inside)} functions; "
                f"resident in it {within * 4} KiB, outside {(len(present) - within) * 4} KiB"
            )
    windows = {}
    for i in present:
        addr = lo + i * 4096 - base
        if region and region[0] <= addr < region[1]:
            continue
        windows[addr // 65536] = windows.get(addr // 65536, 0) + 1
    print(f"{len(windows)} windows of 64 KiB resident outside it:")
    for w, n in sorted(windows.items()):
        j = bisect.bisect_right(starts, w * 65536 + 32768) - 1
        print(f"  {w * 65536:x}: {n:2} pages, near {symbols[j][2][:100] if j >= 0 else '?'}")


if __name__ == "__main__":
    main()
