"""Where the benchmarks put their figures: ``benchmarks/out/NAME``, next to this file."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, name: str) -> Path:
    """Write ``fig`` as ``benchmarks/out/<name>``, say where, and return the path."""
    out = Path(__file__).parent / "out" / name
    out.parent.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"\nwrote {out}")
    return out
