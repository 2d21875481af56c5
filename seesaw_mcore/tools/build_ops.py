"""Builds the C++ ops once per environment (``make install``)."""

from __future__ import annotations

from seesaw_mcore.jit_ops import extensions_root


def main() -> None:
    """Builds every op up front (``make install``): ``python -m seesaw_mcore.tools.build_ops``.
    Prints a warning line for an op that cannot be built here and exits 0 (runs then fall
    back or give their own error)."""
    from seesaw_mcore.errors import SeesawError
    from seesaw_mcore.kv.disk_tier import load_aio
    from seesaw_mcore.model import cpu_attention

    try:
        load_aio()
    except SeesawError as e:
        print(f"warning: {e}")
    cpu_attention.available()  # warns itself
    print(f"C++ ops built under {extensions_root()}")


if __name__ == "__main__":
    main()
