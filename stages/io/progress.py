"""Progress bars: shown for stages and long commands on a terminal, never inside a conversation.

Every loop that deserves a bar calls `progress(...)` (tqdm's arguments). `talk` and `serve` call `turn_off()` once:
a turn of a conversation runs the same linking and sample code as the stages, and a bar per turn is noise there.
"""

from tqdm import tqdm

_shown = True


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm over iterable: on a terminal unless turned off (disable=None: tqdm hides it when not on a terminal)."""
    return tqdm(iterable, disable=None if _shown else True, **kwargs)


def turn_off() -> None:
    """No progress bar from here on in this process (a conversation: talk, serve)."""
    global _shown
    _shown = False
