"""How a hook outside the chroot runs: as root on the host, so confined. In a private mount namespace
(`unshare --mount`), this module's prelude hides kiln's state (the Prefect API's credentials, the signing key,
the HMAC key) under an empty read-only tmpfs, gives /dev only null, zero, full, random, urandom and tty (no
host disk), and makes /proc/sys read-only; then the helper kiln-confine (kiln/helpers/outside) makes every
file system read-only but the build's own directories and gives /tmp a private tmpfs. Nothing of it is
visible outside the namespace, and it all goes with the hook's process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kiln.host.chroot import DEV_NODES

# "$0" is kiln-confine; leading "!DIR" arguments are directories to hide, the rest go to kiln-confine. /dev gets
# the chroot's device nodes (kiln.host.chroot.DEV_NODES), made with their modes
PRELUDE = r"""set -eu
while [ $# -gt 0 ]; do
    case "$1" in
        !*) d=${1#!}; [ -d "$d" ] && /usr/bin/mount -t tmpfs -o ro,mode=0700,size=4k kiln-hidden "$d"; shift ;;
        *) break ;;
    esac
done
dev=$(/usr/bin/mktemp -d)
/usr/bin/mount -t tmpfs -o mode=0755,nosuid,noexec,size=1m kiln-dev "$dev"
for node in @NODES@; do
    IFS=: read -r name major minor mode <<< "$node"
    /usr/bin/mknod -m "$mode" "$dev/$name" c "$major" "$minor"
done
for link in fd:/proc/self/fd stdin:/proc/self/fd/0 stdout:/proc/self/fd/1 stderr:/proc/self/fd/2; do
    /usr/bin/ln -s "${link#*:}" "$dev/${link%%:*}"
done
/usr/bin/mkdir "$dev/pts" "$dev/shm"
/usr/bin/mount --make-rprivate /
/usr/bin/mount --move "$dev" /dev
/usr/bin/mount --bind /proc/sys /proc/sys
/usr/bin/mount -o remount,bind,ro /proc/sys
exec /bin/bash "$0" "$@"
""".replace("@NODES@", " ".join(f"{name}:{major}:{minor}:{mode:o}" for name, major, minor, mode in DEV_NODES))


def confined_argv(confine: Path, argv: Sequence[str], *, writable: Sequence[Path], hidden: Sequence[Path]) -> list[str]:
    """The command that runs `argv` confined: `confine` is kiln-confine, `writable` the directories it may
    write, `hidden` those it must not see (skipped when a writable one lies inside them)."""
    hide = [h for h in hidden if not any(Path(w).is_relative_to(h) for w in writable)]
    return ["/usr/bin/unshare", "--mount", "--propagation", "private", "--", "/bin/bash", "-c", PRELUDE,
            str(confine), *(f"!{h}" for h in hide), *map(str, writable), "--", *argv]
