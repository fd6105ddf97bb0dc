"""SOURCE_DATE_EPOCH of a bootstrapped image: the `Date:` of its release's InRelease file.

Every timestamp a build would take from the clock takes this one instead (mmdebstrap and the hooks through
their environment, the file systems in the pack stage), so that two builds of the same spec from the same
mirror state give the same bytes. A release's InRelease is republished when the release changes (a point
release), and its package indices change with it: a new epoch comes with a new base anyway.
"""

from __future__ import annotations

from datetime import UTC
from email.utils import parsedate_to_datetime

from kiln.sources.mirror import MirrorUnavailable, release_file


def release_date(release: bytes) -> int:
    """The `Date:` field of a Release or (clearsigned) InRelease file, in seconds since the epoch."""
    for line in release.decode("utf-8", "replace").splitlines():
        name, sep, value = line.partition(":")
        if sep and name == "Date":
            try:
                when = parsedate_to_datetime(value.strip())
            except (TypeError, ValueError):
                raise MirrorUnavailable(f"the release file's Date {value.strip()!r} is not an RFC 2822 date "
                                        "(SOURCE_DATE_EPOCH is taken from it)") from None
            if when.tzinfo is None:  # archives write "UTC" or "+0000"; a date without a zone is read as UTC
                when = when.replace(tzinfo=UTC)
            return int(when.timestamp())
    raise MirrorUnavailable("the release file has no Date field (SOURCE_DATE_EPOCH is taken from it)")


def release_epoch(mirror: str, suite: str) -> int:
    """SOURCE_DATE_EPOCH for a build from `suite` on `mirror`: the Date of the suite's InRelease."""
    return release_date(release_file(mirror, suite))
