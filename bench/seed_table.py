"""A W4A16 tuning table whose entries for one GPU are another GPU's, copied whole: the start of a new GPU's table
from a tuned one of the same architecture (the H100 from the H200: both sm_90 with 132 SMs, so the same kernels and
block shapes apply; only the bandwidth differs), to A/B against its own and then tune entry by entry.

    python bench/seed_table.py --from "NVIDIA H200" --to "NVIDIA H100 80GB HBM3" --out /tmp/candidate.json

The source line of the copied device says where its entries came from; the other devices are unchanged.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmc.kernels import w4a16_tuning as T  # noqa: E402


def seeded(tables: dict, source_device: str, target_device: str, note: str) -> dict:
    """tables with target_device's entries replaced by a copy of source_device's."""
    if source_device not in tables["devices"]:
        raise KeyError(f"the table has no device {source_device!r}")
    devices = dict(tables["devices"])
    devices[target_device] = {"source": f"{source_device}'s entries copied ({note})",
                              "entries": copy.deepcopy(tables["devices"][source_device]["entries"])}
    return {**tables, "devices": devices}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="source", required=True, help="the device whose entries are copied")
    ap.add_argument("--to", dest="target", required=True, help="the device they are copied to")
    ap.add_argument("--table", default=str(T.TABLE_PATH))
    ap.add_argument("--note", default="bench/seed_table.py")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        tables = seeded(T.read_tables(Path(args.table)), args.source, args.target, args.note)
    except (KeyError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    T.write_tables(tables, Path(args.out))
    print(f"wrote {args.out}: {len(tables['devices'][args.target]['entries'])} entries for {args.target!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
