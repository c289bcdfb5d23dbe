"""The I/O floor: read files once (`read FILE...`) or write N bytes once (`write N OUT`)."""

import os
import sys

BLOCK = 16 << 20


def read(files: list[str]) -> int:
    buffer = bytearray(BLOCK)
    total = 0
    for name in files:
        with open(name, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total


def write(n: int, out: str) -> None:
    block = os.urandom(min(BLOCK, n))
    with open(out, "wb") as f:
        for start in range(0, n, BLOCK):
            f.write(block[: min(BLOCK, n - start)])
        f.flush()


if __name__ == "__main__":
    if sys.argv[1] == "read":
        read(sys.argv[2:])
    else:
        write(int(sys.argv[2]), sys.argv[3])
