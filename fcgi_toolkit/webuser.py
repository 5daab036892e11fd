"""Who nginx's worker processes run as, and whether that user can reach its files.

nginx started by root runs its worker processes, which parse untrusted
HTTP, as the user of its ``user`` directive.  We never let that be root:

* when the worker socket has a non-root owner (``workers.socket_owner``, or
  ``workers.user``, which supervisord uses as the socket's owner by
  default), nginx runs as that owner, who can open the socket;
* otherwise nginx runs as a dedicated unprivileged user (``www-data`` where
  it exists, else ``nobody``) and the socket gets that user's primary group,
  so mode 0660 lets nginx in and nobody else.

:func:`nginx_identity` is the pure decision; :func:`probe_web_user` and
:func:`unreachable` are the thin I/O around it.
"""
from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Optional

if TYPE_CHECKING:
    from fcgi_toolkit.settings import Deployment

#: Tried in order for the dedicated user: Debian's web server user, then the
#: user every Unix has.
WEB_USERS = ("www-data", "nobody")

ROOT_NAMES = frozenset({"root", "0"})


@dataclass(frozen=True)
class NginxIdentity:
    """The ``user USER GROUP;`` of a root-started nginx, and the socket owner that lets it in."""
    user: str
    group: str
    socket_owner: str      # "user:group" for supervisord's socket_owner; "" to keep the configured one


def nginx_identity(socket_is_unix: bool, socket_owner: str, workers_user: str,
                   supervisord_user: str, web_user: str, web_group: str,
                   primary_group: Callable[[str], str]) -> NginxIdentity:
    """nginx's worker identity when nginx is started by root (never root).

    ``primary_group(user)`` names a user's primary group (KeyError: no such
    user).  ``web_user``/``web_group`` is the dedicated unprivileged user.
    """
    owner_user, _, owner_group = socket_owner.partition(":")
    owner = owner_user or workers_user
    if socket_is_unix and owner and owner not in ROOT_NAMES:
        # The socket's owner opens it (owner bits of socket_mode).
        return NginxIdentity(owner, owner_group or primary_group(owner), "")
    if not socket_is_unix:
        return NginxIdentity(web_user, web_group, "")
    if owner_group:
        # A root-owned socket with the operator's group: nginx joins that group.
        return NginxIdentity(web_user, owner_group, "")
    return NginxIdentity(web_user, web_group, "%s:%s" % (owner_user or supervisord_user, web_group))


def primary_group(user: str) -> str:
    """The name of ``user``'s primary group; KeyError if there is no such user."""
    entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    try:
        return grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:   # a gid without a group entry: nginx accepts the number
        return str(entry.pw_gid)


def probe_web_user(candidates: Iterable[str] = WEB_USERS) -> tuple[str, str]:
    """(user, primary group) of the first existing dedicated web user."""
    for candidate in candidates:
        try:
            return candidate, primary_group(candidate)
        except KeyError:
            continue
    return "nobody", "nogroup"


def unreachable(path: str, user: str, group: str) -> Optional[str]:
    """Why ``user`` (with ``group``) cannot reach ``path``, or None if it can.

    Checks search permission on every existing directory from / down to
    ``path`` (a directory that does not exist yet is created 0755 by us).
    """
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        return None   # cannot tell; nginx itself will refuse an unknown user
    gids = {gid, entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem}
    current = "/"
    for part in os.path.abspath(path).split("/")[1:]:
        if not part:
            continue
        current = os.path.join(current, part)
        try:
            st = os.stat(current)
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
        if st.st_uid == entry.pw_uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid in gids:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return "%s cannot enter %s (mode %04o)" % (user, current, stat.S_IMODE(st.st_mode))
    return None


def check_reach(dep: "Deployment", user: str, group: str, who: str, runtime_dir: bool) -> None:
    """Raise ConfigError (one line) if nginx's workers, running as ``user``
    (``who`` describes them), cannot enter the socket's directory, a static
    directory or (``runtime_dir``: nginx's temp files are there) runtime.dir."""
    from fcgi_toolkit.settings import ConfigError
    places = [("runtime.dir", dep.runtime_dir, dep.runtime_dir)] if runtime_dir else []
    if dep.socket_is_unix:
        places.append(("workers.socket", dep.socket_url, os.path.dirname(dep.socket_path)))
    places += [("nginx.static", prefix, directory) for prefix, directory in sorted(dep.nginx.static.items())]
    for key, value, directory in places:
        why = unreachable(directory, user, group)
        if why:
            raise ConfigError("%s: %s = %r: %s run as %s, and %s; make it searchable (chmod o+x) "
                              "or move it" % (dep.path, key, value, who, user, why))
