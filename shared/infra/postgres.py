"""A throwaway PostgreSQL cluster for tests and benchmarks, run from the distro's binaries.

Layout under ``root``::

    root/data          the cluster (initdb'd once, reused on later starts)
    root/run           unix socket directory
    root/postgres.log  server log (pg_ctl -l)

Running as root
---------------
PostgreSQL refuses to run as root, so when the effective uid is 0 every ``initdb``/``pg_ctl``
call runs as the ``postgres`` system user (created with ``useradd --system`` when missing) via
``runuser -u postgres --`` (util-linux; ``setpriv`` as a fallback). ``root`` is chowned to that
user. The directory is kept where the caller put it; instead, every ancestor directory that the
``postgres`` user cannot traverse gets the *search* bit for others added (``o+x``, never ``o+r``
or ``o+w``): pytest's ``/tmp/pytest-of-root`` (0700) becomes 0701, so nothing can be listed or
written by others, only a known path walked through.

Speed over durability
---------------------
``fsync=off`` and ``full_page_writes=off`` make an OS crash or power loss corrupt the cluster;
that is fine for a throwaway. ``synchronous_commit`` stays ``on`` by default: with ``fsync=off``
a commit then costs one ``write()`` into the page cache (measured: no difference for 2000
serial inserts), and every acknowledged commit survives an *immediate* stop or a killed server,
which chaos tests rely on. With ``synchronous_commit=off`` the last few hundred milliseconds of
commits are still in shared memory (``wal_writer_delay``) and an immediate stop loses them
(measured: 50-74 of 200 just-committed rows lost). Pass ``synchronous_commit=False`` only where
losing acknowledged commits on a crash is acceptable.

CLI::

    python -m shared.infra.postgres run --root var/pg [--port 5432]

starts the cluster, prints the admin URL, and stops it (fast) on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Literal
from urllib.parse import quote

__all__ = ["LocalPostgres", "find_pg_bin"]

StopMode = Literal["smart", "fast", "immediate"]

PG_SYSTEM_USER = "postgres"
SUPERUSER = "postgres"
HOST = "127.0.0.1"
_CONF_NAME = "local_postgres.conf"
_INCLUDE_LINE = f"include '{_CONF_NAME}'\n"
# sockaddr_un.sun_path is 108 bytes; PostgreSQL refuses longer socket paths.
_MAX_SOCKET_PATH = 107
_INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found: looked in "
    "/usr/lib/postgresql/*/bin and `pg_config --bindir`. Install them with "
    "`apt-get install -y postgresql` (Debian/Ubuntu)."
)


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin/initdb -> (15,) or (9, 6)
    version = path.parent.parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def find_pg_bin() -> Path:
    """The newest PostgreSQL server bin directory (one that contains ``initdb``).

    Debian puts server binaries in ``/usr/lib/postgresql/<major>/bin`` (not on PATH); other
    systems are found via ``pg_config --bindir`` or an ``initdb`` on PATH.
    """
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=_version_key)
    if candidates:
        return candidates[-1].parent
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(  # noqa: S603 - absolute path from shutil.which
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if out and (Path(out) / "initdb").is_file():
                return Path(out)
    initdb = shutil.which("initdb")
    if initdb is not None:
        return Path(initdb).resolve().parent
    raise RuntimeError(_INSTALL_HINT)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_zombie(pid: int) -> bool:
    # Linux: the state letter follows the parenthesised command name in /proc/<pid>/stat.
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rpartition(")")[2].split()[:1] == ["Z"]


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _clean_env() -> dict[str, str]:
    # PG* variables (PGHOST, PGDATABASE, PGSERVICE, ...) would silently redirect psql,
    # pg_isready and pg_ctl; every connection parameter is passed explicitly instead.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class LocalPostgres:
    """A PostgreSQL cluster under ``root``, listening on 127.0.0.1 and ``root/run`` only."""

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        *,
        synchronous_commit: bool = True,
        max_connections: int = 200,
    ) -> None:
        self.root = Path(root).absolute()
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "run"
        self.log_file = self.root / "postgres.log"
        self.port = port if port is not None else _free_port()
        self.synchronous_commit = synchronous_commit
        self.max_connections = max_connections
        self.bin_dir = find_pg_bin()
        self._as_root = os.geteuid() == 0
        self._last_timeout = 30.0
        self._atexit_registered = False
        socket_path = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(os.fsencode(socket_path)) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"unix socket path {socket_path} is longer than {_MAX_SOCKET_PATH} bytes; "
                "use a shorter root directory"
            )

    # ------------------------------------------------------------------ URLs

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy asyncpg URL of ``database`` on this cluster."""
        return f"postgresql+asyncpg://{SUPERUSER}@{HOST}:{self.port}/{quote(database, safe='')}"

    # ------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 30.0) -> str:
        """initdb (first time only), start, wait until ready; return the admin URL.

        If a server is already running on this data directory (e.g. left by a previous
        process), it is reused and ``self.port`` is taken from its ``postmaster.pid``.
        """
        self._last_timeout = timeout
        deadline = time.monotonic() + timeout
        self._prepare_root()
        if not (self.data_dir / "PG_VERSION").is_file():
            self._initdb()
        if self.is_running():
            running_port = self._running_port()
            if running_port is not None:
                self.port = running_port
        else:
            self._write_conf()
            self._pg_ctl_start(deadline)
        self._wait_ready(deadline)
        if not self._atexit_registered:
            # A crashed or interrupted test run must not leave a postmaster behind.
            atexit.register(self._stop_at_exit)
            self._atexit_registered = True
        return self.url()

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (no-op when it is not running)."""
        if not self.is_running():
            return
        self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "-t",
                "60",
            ],
            as_pg=True,
            what=f"pg_ctl stop -m {mode}",
            timeout=70,
        )

    def restart(self) -> None:
        """Start again on the same port and data (stopping first, fast, if still running)."""
        self.stop("fast")
        self.start(self._last_timeout)

    def is_running(self) -> bool:
        if not (self.data_dir / "PG_VERSION").is_file():
            return False
        result = self._run(
            [str(self.bin_dir / "pg_ctl"), "status", "-D", str(self.data_dir)],
            as_pg=True,
            check=False,
            what="pg_ctl status",
        )
        # 0 = running, 3 = not running, 4 = no accessible data directory. pg_ctl only checks
        # that the pid exists, so a killed postmaster that its new parent has not yet reaped
        # (a zombie) would still count as running.
        if result.returncode != 0:
            return False
        pid = self._postmaster_pid()
        return pid is None or not _is_zombie(pid)

    # -------------------------------------------------------------- databases

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` unless it exists; return its asyncpg URL."""
        # The name travels as a psql variable (:'name' / quote_ident), never spliced into SQL.
        script = (
            "SELECT format('CREATE DATABASE %I', :'name') "
            "WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'name') \\gexec\n"
        )
        result = self._psql(script, variables={"name": name}, check=False)
        if result.returncode != 0 and not self._database_exists(name):
            # (A concurrent creator losing the race fails with "already exists": fine.)
            raise RuntimeError(f"CREATE DATABASE {name!r} failed:\n{result.stderr.strip()}")
        return self.url(name)

    def _database_exists(self, name: str) -> bool:
        result = self._psql(
            "SELECT count(*) FROM pg_database WHERE datname = :'name'\n",
            variables={"name": name},
            check=False,
        )
        return result.returncode == 0 and result.stdout.strip() == "1"

    def _psql(
        self, script: str, *, variables: dict[str, str], check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [
            str(self.bin_dir / "psql"),
            "-X",  # ignore ~/.psqlrc
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            HOST,
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-d",
            "postgres",
        ]
        for key, value in variables.items():
            argv += ["-v", f"{key}={value}"]
        return self._run(argv, input_text=script, check=check, what="psql", timeout=60)

    # --------------------------------------------------------------- internals

    def _pg_user(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            pass
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        self._run(
            [
                useradd,
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                PG_SYSTEM_USER,
            ],
            what="useradd postgres",
        )
        return pwd.getpwnam(PG_SYSTEM_USER)

    def _prepare_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        self.log_file.touch(exist_ok=True)
        if not self._as_root:
            return
        user = self._pg_user()
        for path in (self.root, self.socket_dir, self.log_file):
            os.chown(path, user.pw_uid, user.pw_gid)
        self._make_traversable(self.root, user.pw_uid)

    @staticmethod
    def _make_traversable(path: Path, uid: int) -> None:
        # Add o+x (search only) to every ancestor the postgres user could not walk through.
        for parent in reversed(path.parents):
            st = parent.stat()
            if st.st_uid == uid or st.st_mode & stat.S_IXOTH:
                continue
            parent.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)

    def _initdb(self) -> None:
        self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",  # throwaway: no need to fsync the fresh cluster
                "--no-instructions",
            ],
            as_pg=True,
            what="initdb",
            timeout=120,
        )
        # Only the unix socket and 127.0.0.1 are trusted; nothing else may connect.
        self._write_pg_file(
            "pg_hba.conf",
            "# written by shared.infra.postgres\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "local replication all trust\n"
            "host replication all 127.0.0.1/32 trust\n",
        )
        conf = self.data_dir / "postgresql.conf"
        self._write_pg_file("postgresql.conf", conf.read_text() + "\n" + _INCLUDE_LINE)

    def _write_conf(self) -> None:
        # Rewritten on every start so that the port and paths follow this object.
        settings = {
            "port": str(self.port),
            "listen_addresses": _conf_quote(HOST),
            "unix_socket_directories": _conf_quote(str(self.socket_dir)),
            "max_connections": str(self.max_connections),
            "fsync": "off",
            "synchronous_commit": "on" if self.synchronous_commit else "off",
            "full_page_writes": "off",
            "logging_collector": "off",
        }
        self._write_pg_file(
            _CONF_NAME,
            "# written by shared.infra.postgres on every start\n"
            + "".join(f"{key} = {value}\n" for key, value in settings.items()),
        )

    def _write_pg_file(self, name: str, text: str) -> None:
        path = self.data_dir / name
        path.write_text(text)
        path.chmod(0o600)
        if self._as_root:
            user = self._pg_user()
            os.chown(path, user.pw_uid, user.pw_gid)

    def _pg_ctl_start(self, deadline: float) -> None:
        argv = [str(self.bin_dir / "pg_ctl"), "start", "-D", str(self.data_dir)]
        argv += ["-l", str(self.log_file), "-w", "-t"]
        while True:
            # After a SIGKILL the old postmaster may linger as a zombie, or its orphaned
            # backends may still hold the shared memory for a moment; the new postmaster then
            # refuses to start ("lock file ... already exists", "... still in use"). Wait it out.
            old_pid = self._postmaster_pid()
            while old_pid is not None and _pid_exists(old_pid) and time.monotonic() < deadline:
                if not _is_zombie(old_pid):
                    break
                time.sleep(0.05)
            remaining = deadline - time.monotonic()
            result = self._run(
                [*argv, str(max(1, int(remaining)))],
                as_pg=True,
                check=False,
                what="pg_ctl start",
                timeout=max(1.0, remaining) + 5,
            )
            if result.returncode == 0:
                return
            log = self._log_tail(5)
            transient = "already exists" in log or "still in use" in log
            if not transient or time.monotonic() + 0.2 > deadline:
                detail = (result.stderr or result.stdout).strip()
                raise RuntimeError(
                    f"pg_ctl start failed (exit {result.returncode}): {detail}\n"
                    f"server log tail:\n{self._log_tail()}"
                )
            time.sleep(0.2)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def _running_port(self) -> int | None:
        # postmaster.pid line 4 is the port (see PostgreSQL's pidfile.h).
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            return int(lines[3])
        except (OSError, IndexError, ValueError):
            return None

    def _wait_ready(self, deadline: float) -> None:
        argv = [str(self.bin_dir / "pg_isready"), "-q", "-h", HOST, "-p", str(self.port)]
        argv += ["-U", SUPERUSER, "-d", "postgres", "-t", "2"]
        while True:
            if self._run(argv, check=False, what="pg_isready", timeout=10).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"PostgreSQL on {HOST}:{self.port} not ready; log tail:\n{self._log_tail()}"
                )
            time.sleep(0.05)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _user_prefix(self) -> list[str]:
        runuser = shutil.which("runuser") or (
            "/usr/sbin/runuser" if Path("/usr/sbin/runuser").exists() else None
        )
        if runuser is not None:
            return [runuser, "-u", PG_SYSTEM_USER, "--"]
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            return [
                setpriv,
                f"--reuid={PG_SYSTEM_USER}",
                f"--regid={PG_SYSTEM_USER}",
                "--init-groups",
            ]
        raise RuntimeError("running as root needs `runuser` or `setpriv` (util-linux)")

    def _run(
        self,
        argv: Sequence[str],
        *,
        as_pg: bool = False,
        check: bool = True,
        what: str,
        input_text: str | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        full = [*self._user_prefix(), *argv] if as_pg and self._as_root else list(argv)
        env = _clean_env()
        if as_pg and self._as_root:
            env["HOME"] = "/nonexistent"
        # cwd = root: the postgres user may not be able to enter the caller's cwd (/root).
        result = subprocess.run(  # noqa: S603 - argument list, absolute binaries, no shell
            full,
            input=input_text,
            capture_output=True,
            text=True,
            env=env,
            cwd=self.root if self.root.is_dir() else None,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            log = f"\nserver log tail:\n{self._log_tail()}" if what.startswith("pg_ctl") else ""
            raise RuntimeError(f"{what} failed (exit {result.returncode}): {detail}{log}")
        return result

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")


# ------------------------------------------------------------------------ CLI


def _run_foreground(root: Path, port: int | None, synchronous_commit: bool) -> int:
    pg = LocalPostgres(root, port, synchronous_commit=synchronous_commit)
    stop_requested = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop_requested.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    url = pg.start()
    sys.stdout.write(f"{url}\n")
    sys.stdout.flush()
    # pg_ctl detaches the postmaster (setsid), so watch it: a supervisor must see it die.
    while not stop_requested.wait(2.0):
        if not pg.is_running():
            sys.stderr.write(f"PostgreSQL exited unexpectedly; log tail:\n{pg._log_tail()}\n")
            return 1
    pg.stop("fast")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.infra.postgres")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a local cluster in the foreground")
    run.add_argument("--root", type=Path, default=Path("var/pg"))
    run.add_argument("--port", type=int, default=None, help="default: a free port")
    run.add_argument(
        "--async-commit",
        action="store_true",
        help="synchronous_commit=off: faster commits, but an immediate stop loses the last ones",
    )
    args = parser.parse_args(argv)
    return _run_foreground(args.root, args.port, not args.async_commit)


if __name__ == "__main__":
    sys.exit(main())
