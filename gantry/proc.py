"""The one way Gantry runs a subprocess.

argv list only (never a shell), an explicit environment, a timeout always, and the
command logged with secrets redacted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gantry.errors import CommandError, CommandTimeoutError, ToolNotFoundError

log = logging.getLogger(__name__)

REDACTED = "***"

# Values of these flags and environment variables are never printed.
_SECRET_FLAGS = ("--password", "--token", "--key-password", "--secret", "--registry-password")
_SECRET_ENV = re.compile(r"(TOKEN|PASSWORD|SECRET|PASSPHRASE|API_KEY|CREDENTIAL)", re.I)
# user:password@ and token@ in URLs, and bearer tokens in headers.
_URL_CREDS = re.compile(r"(?<=://)([^/@\s:]+):([^/@\s]+)@")
_URL_TOKEN = re.compile(r"(?<=://)[^/@\s:]+@")
#: Names (of variables, keys, fields) that hold secrets: what is never logged or stored.
SECRET_NAME = re.compile(r"token|password|passwd|passphrase|secret|credential|api_?key", re.I)
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove known secret values and credential-shaped substrings from ``text``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    text = _URL_CREDS.sub(rf"\1:{REDACTED}@", text)
    text = _URL_TOKEN.sub(f"{REDACTED}@", text)
    text = _BEARER.sub(rf"\1{REDACTED}", text)
    return _HF_TOKEN.sub(REDACTED, text)


def redact_argv(argv: Sequence[str], secrets: Iterable[str] = ()) -> list[str]:
    """``argv`` with the values of secret flags, and any known secret, replaced."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in _SECRET_FLAGS:
            if eq:
                out.append(f"{flag}={REDACTED}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(redact_text(arg, secrets))
    return out


def has_url_credentials(text: str) -> bool:
    """Whether ``text`` holds a URL with credentials in it (``user:pass@``, ``token@``)."""
    return bool(_URL_CREDS.search(text) or _URL_TOKEN.search(text))


def secret_env_values(env: Mapping[str, str]) -> list[str]:
    """The values of environment variables whose names say they are secrets."""
    return [v for k, v in env.items() if _SECRET_ENV.search(k) and v]


def which(tool: str, *, env_var: str | None, install_hint: str) -> Path:
    """Find ``tool``: ``$env_var`` first, then PATH; a clear error when it is nowhere."""
    if env_var and (override := os.environ.get(env_var)):
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ToolNotFoundError(
                tool,
                env_var=None,
                install_hint=f"{env_var}={override} "
                "is not an executable file; fix the variable or unset it",
            )
        return path
    found = shutil.which(tool)
    if found is None:
        raise ToolNotFoundError(tool, env_var=env_var, install_hint=install_hint)
    return Path(found)


@dataclass(frozen=True)
class Completed:
    """A finished command: its argv (redacted), exit code and captured output."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    inherit_env: bool = True,
    cwd: Path | None = None,
    check: bool = True,
    input_text: str | None = None,
    fix: str = "",
) -> Completed:
    """Run ``argv`` and capture its output.

    ``env`` is added to (or, with ``inherit_env=False``, replaces) the environment. On a
    non-zero exit with ``check`` a :class:`CommandError` carries the stderr tail; on
    timeout the process is killed and :class:`CommandTimeoutError` raised.

    >>> run(["true"], timeout_s=5).returncode
    0
    """
    args = [os.fspath(a) for a in argv]
    full_env = {**(os.environ if inherit_env else {}), **(env or {})}
    secrets = secret_env_values(full_env)
    shown = redact_argv(args, secrets)
    log.debug("run: %s", " ".join(shown))
    try:
        proc = subprocess.run(
            args,
            env=full_env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            input=input_text,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandTimeoutError(shown, timeout_s) from exc
    stdout = proc.stdout
    stderr = redact_text(proc.stderr, secrets)
    if check and proc.returncode != 0:
        raise CommandError(shown, proc.returncode, stderr[-4000:], fix=fix)
    return Completed(argv=shown, returncode=proc.returncode, stdout=stdout, stderr=stderr)


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc's ``starttime``): with
    the pid, it names one process, so a pid reused after a reboot or in a new container
    is not mistaken for the one recorded. None where /proc does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (someone else's counts; a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True
