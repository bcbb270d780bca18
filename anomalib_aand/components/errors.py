"""The error AAND raises for input it cannot use, and how its messages list files."""

MAX_LISTED = 5


class AandInputError(ValueError):
    """A dataset, file or setting that AAND cannot use as given."""


def listing(items: list[str]) -> str:
    """The first ``MAX_LISTED`` items, one per indented line, and how many more there are."""
    shown = "\n  ".join(items[:MAX_LISTED])
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n  {shown}{more}"
