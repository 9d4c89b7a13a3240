#!/usr/bin/env python3
"""Compares two safetensors checkpoints tensor by tensor (bytes, dtype, shape) and their
metadata, with no dependency beyond the standard library. Used to show that a refactor
leaves training bit for bit unchanged:

    vit-before train --max-steps 200 --seed 3 --out /tmp/a -q
    vit-after  train --max-steps 200 --seed 3 --out /tmp/b -q
    python3 scripts/compare_checkpoints.py /tmp/a/checkpoint-last.safetensors /tmp/b/checkpoint-last.safetensors
"""
import json
import struct
import sys


def read(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    data = b[8 + n :]
    tensors = {
        k: (v["dtype"], v["shape"], data[v["data_offsets"][0] : v["data_offsets"][1]])
        for k, v in header.items()
    }
    return tensors, meta


def main(a_path, b_path):
    a, ma = read(a_path)
    b, mb = read(b_path)
    only = sorted(set(a) ^ set(b))
    differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    size = sum(len(v[2]) for v in a.values())
    print(f"{len(a)} tensors, {size} bytes; identical: {len(a) - len(differ) - len(only)}")
    for k in only:
        print(f"  only in one file: {k}")
    for k in differ:
        line = f"  differs: {k}"
        if a[k][0] == "F64" and a[k][0] == b[k][0]:
            n = len(a[k][2]) // 8
            line += f" {struct.unpack(f'<{n}d', a[k][2])} vs {struct.unpack(f'<{n}d', b[k][2])}"
        print(line)
    for k in sorted(set(ma) | set(mb)):
        if ma.get(k) != mb.get(k):
            print(f"  metadata {k} differs")
    return 1 if differ or only else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
