"""Code footprint of one request, from a callgrind profile dumped with --dump-instr=yes.

    python3 bench/instruments/footprint.py PROFILE REQUESTS

Prints the number of distinct 64-byte code lines, over every object the process runs
(its binary, libc, the vDSO), in which some instruction ran at least once a request
(0.95 × REQUESTS times: a little code, such as the timer wheel's turn, skips a request
now and then). At a fixed rate a proxy idles between requests and each request starts
with cold caches: every such line is fetched again, however few instructions run in it.
"""

import collections
import re
import sys

# An object's name is given once, with its number, by an `ob=` or `cob=` line.
OBJECT = re.compile(r"(c?)ob=\((\d+)\)(?: (.*))?")


def runs_per_address(path):
    """(object, instruction address) -> times it ran (the profile's self cost, Ir).
    Addresses are per object: libc's and the binary's may coincide."""
    runs = collections.Counter()
    names = {}
    current = None
    address = 0
    after_calls = False
    for line in open(path):
        named = OBJECT.match(line)
        if named:
            called, number, name = named.groups()
            if name:
                names[number] = name
            if not called:
                current = names.get(number, number)
            continue
        if line.startswith("calls="):
            # The next cost line is the call's inclusive cost, not this instruction's.
            after_calls = True
            continue
        first = line[:1]
        if not (line.startswith("0x") or first in ("+", "-", "*")):
            continue
        fields = line.split()
        position = fields[0]
        if position.startswith("0x"):
            address = int(position, 16)
        elif position[0] == "+":
            address += int(position[1:])
        elif position[0] == "-":
            address -= int(position[1:])
        if after_calls:
            after_calls = False
            continue
        # positions: instr line; then the events (Ir first).
        if len(fields) > 2:
            runs[current, address] += int(fields[2])
    return runs


def main():
    path, requests = sys.argv[1], int(sys.argv[2])
    busiest = collections.defaultdict(int)
    for (obj, address), runs in runs_per_address(path).items():
        line = (obj, address >> 6)
        busiest[line] = max(busiest[line], runs)
    print(sum(1 for runs in busiest.values() if runs >= 0.95 * requests))


if __name__ == "__main__":
    main()
