#!/usr/bin/env python3
"""bundle.py DIR OUT: packs a (minimized) corpus directory into one file,
each input as a 4-byte little-endian length and its bytes, in name order,
so the tree keeps one file per target instead of thousands.
gpu/tests/fuzz_corpus.rs replays fuzz/minimized/<target>.bundle."""
import os
import struct
import sys

src, out = sys.argv[1], sys.argv[2]
with open(out, "wb") as bundle:
    names = sorted(os.listdir(src))
    for name in names:
        data = open(os.path.join(src, name), "rb").read()
        bundle.write(struct.pack("<I", len(data)))
        bundle.write(data)
print("%s: %d inputs, %d bytes" % (out, len(names), os.path.getsize(out)))
