"""What the benchmarks share for their output: aligned tables on stdout, and figures in
``benchmarks/out/NAME``, next to this file."""

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


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """``rows`` of strings under ``header``, each column right-aligned to its widest cell."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
