"""Byte counts as people read them."""


def human_size(count: int) -> str:
    """In the unit that fits: 512 B, 3.4 KiB, 120.5 MiB, 55.0 GiB (1 KiB = 1024 B)."""
    if count < 1024:
        return f"{count} B"
    size = count / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
