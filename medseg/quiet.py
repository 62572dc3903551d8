"""Known harmless notes of PyTorch and of the libraries MONAI imports, kept from the user: the one
list of them.

Each is matched by its exact text, so that any other warning still shows.
"""

from __future__ import annotations

import logging
import warnings

# warnings.warn notes: (the message's start, as a regular expression, and its category).
KNOWN_WARNINGS = (
    # Inductor chose a split reduction for a softmax (a performance note about its own choice).
    (r"\s*Online softmax is disabled on the fly since Inductor decides to\s+split the reduction", UserWarning),
)
# Logged notes: (the logger, the message's start).
KNOWN_LOG_NOTES = (
    # Selective checkpointing under torch.compile: medseg's checkpointed blocks hold no in-place ops.
    ("torch._higher_order_ops.wrap", "Detected that context_fn is passed to torch.utils.checkpoint under torch.compile"),
    # matplotlib (imported with MONAI) falls back to a temporary cache folder when the home folder
    # is not writable; its two notes would come before every message of medseg's.
    ("matplotlib", "mkdir -p failed for path"),
    ("matplotlib", "Matplotlib created a temporary cache directory"),
)


def hide_known_warnings() -> None:
    """Filter out KNOWN_WARNINGS and KNOWN_LOG_NOTES (and nothing else) in this process."""
    for pattern, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, start in KNOWN_LOG_NOTES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _StartingWith) and f.start == start for f in logger.filters):
            logger.addFilter(_StartingWith(start))


class _StartingWith(logging.Filter):
    """Drops the records whose message starts with `start` (after leading white space)."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().lstrip().startswith(self.start)
