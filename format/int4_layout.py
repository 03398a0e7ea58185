"""The `lmc-int4-k8` layout's facts that need no torch: its name, the group sizes, the codes per int32 word
and the shapes of a quantized linear's tensors. lmc.format.int4 (the codec: the bits themselves) re-exports
them; `lmc verify` reads them from here so that it runs without importing torch."""
from __future__ import annotations

from lmc.errors import LmcError

LAYOUT = "lmc-int4-k8"
GROUP_SIZES = (32, 64, 128)
PACK = 8  # codes per int32 word


def check_group_size(group_size, where: str = "--w-group-size") -> int:
    """The one check of an int4 group size; returns it."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise LmcError(f"{where} {group_size!r}: choose one of {', '.join(map(str, GROUP_SIZES))}")
    return group_size


def int4_shapes(n: int, k: int, group_size: int) -> dict[str, tuple[int, int]]:
    """Shapes of a linear's three workspace tensors, by leaf."""
    return {".qweight": (-(-k // PACK), n), ".scales": (-(-k // group_size), n), ".zeros": (-(-k // group_size), n)}
