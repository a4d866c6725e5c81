"""``serve --web-config-file``: TLS and basic auth in the Prometheus exporter-toolkit format.

The same file works for this exporter and the Go ones::

    tls_server_config:
      cert_file: server.crt            # relative paths are relative to the file
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: ca.crt                         # optional
      min_version: TLS12                             # optional (TLS12 or TLS13)
    basic_auth_users:
      prometheus: $2y$10$...           # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')

Everything is checked at start-up; an error is a :class:`ConfigError` naming the setting. A
private key or web configuration file that other users may read or write is warned about.
:class:`LiveWebConfig` reads the files again when they change (a rotated certificate) or on
request (``SIGHUP``), without a restart.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import logging
import os
import ssl
import stat
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..config import ConfigError

log = logging.getLogger(__name__)

#: exporter-toolkit's ``client_auth_type`` values Python's ``ssl`` can honour.
CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
#: Types that ask for a certificate without verifying it, which Python's ``ssl`` cannot do.
UNVERIFIED_CLIENT_AUTH_TYPES = ("RequestClientCert", "RequireAnyClientCert")
TLS_VERSIONS = {
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
#: exporter-toolkit versions that are refused: OpenSSL's default security level refuses them
#: in the handshake whatever the setting, so accepting them would promise what is not done.
REFUSED_TLS_VERSIONS = ("TLS10", "TLS11")
TLS_KEYS = (
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "min_version",
    "max_version",
)
TOP_KEYS = ("tls_server_config", "basic_auth_users")
#: Successful verifications kept in memory (bcrypt costs tens of milliseconds by design).
AUTH_CACHE_SIZE = 1024


def _bcrypt_slots() -> int:
    """Half the CPUs this process may run on, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)


#: bcrypt checks at a time (half the CPUs, at least 1): a request that finds them all busy
#: gets 503 at once, so that a flood of wrong passwords never takes every worker thread, nor
#: more than half the CPUs, from the scrapers.
BCRYPT_SLOTS = _bcrypt_slots()


@dataclasses.dataclass(frozen=True)
class WebConfig:
    """A validated web configuration: the TLS context (None: plain HTTP) and the users; the
    files it was read from and how to read them again (for :class:`LiveWebConfig`)."""

    ssl_context: ssl.SSLContext | None = None
    users: Mapping[str, bytes] = dataclasses.field(default_factory=dict, repr=False)
    files: tuple[str, ...] = ()
    source: Callable[[], WebConfig] | None = dataclasses.field(default=None, repr=False)
    #: the option that names the files, for messages
    setting: str = "web_config_file"

    def shape(self) -> tuple[object, ...]:
        """What a reload cannot change: TLS on or off, the client certificate check and the
        TLS versions (fixed when a handshake starts), basic auth on or off."""
        context = self.ssl_context
        if context is None:
            return (None, bool(self.users))
        return (
            context.verify_mode,
            context.minimum_version,
            context.maximum_version,
            bool(self.users),
        )


def tls_files_config(certfile: str, keyfile: str | None = None) -> WebConfig:
    """``serve --certfile --keyfile``: HTTPS with that certificate, read again on change."""
    if keyfile:
        warn_if_permissive(keyfile, "keyfile")
    files = (certfile, keyfile) if keyfile else (certfile,)
    source = functools.partial(tls_files_config, certfile, keyfile)
    return WebConfig(tls_context(certfile, keyfile), files=files, source=source, setting="certfile")


def warn_if_permissive(path: str, setting: str) -> bool:
    """Log a warning (and return True) when users other than the owner may write ``path``,
    or anyone but the owner and its group may read it."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return False
    if not mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_IROTH):
        return False
    log.warning(
        "%s: %s may be read or written by other users (mode %04o); chmod 600 (or 640 "
        "for a group that must read it)",
        setting,
        path,
        mode,
    )
    return True


def tls_context(
    certfile: str,
    keyfile: str | None = None,
    *,
    client_ca_file: str | None = None,
    verify_mode: ssl.VerifyMode = ssl.CERT_NONE,
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    max_version: ssl.TLSVersion | None = None,
    setting: str = "certfile",
) -> ssl.SSLContext:
    """A server TLS context (HTTP/1.1); ``setting`` names the option in errors."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = min_version
    if max_version is not None:
        context.maximum_version = max_version
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        reason = _pem_problem(certfile, keyfile) or str(exc)
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            reason = f"the private key does not belong to the certificate {certfile!r}"
        raise ConfigError(f"{setting}: cannot load the certificate and key: {reason}") from None
    if client_ca_file is not None:
        ca_setting = setting.replace("cert_file", "client_ca_file")
        try:
            context.load_verify_locations(client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{ca_setting}: cannot load the CA certificates: {exc}") from None
    context.verify_mode = verify_mode
    return context


def _pem_problem(certfile: str, keyfile: str | None) -> str | None:
    """What is wrong with a certificate and key pair that OpenSSL refused, in words (its
    own message is often ``[SSL] PEM lib``), or None when the files look right."""
    try:
        cert = Path(certfile).read_bytes()
        key = cert if keyfile is None else Path(keyfile).read_bytes()
    except OSError:
        return None  # OpenSSL's message names the file and the error
    key_name = "the certificate file" if keyfile is None else repr(keyfile)
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        return f"{certfile!r} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    if b"PRIVATE KEY-----" not in key:
        return f"{key_name} holds no PEM private key (-----BEGIN ... PRIVATE KEY-----)"
    if b"ENCRYPTED" in key:
        return f"{key_name} holds an encrypted private key; give it unencrypted (chmod 600)"
    return None


def load_web_config(path: str) -> WebConfig:
    """Read and validate the exporter-toolkit web configuration file ``path``."""
    import yaml

    where = "web_config_file"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read {path!r}: {exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: {path!r} is not valid YAML: {exc}") from None
    document = {} if document is None else document
    _mapping(document, where, TOP_KEYS)
    base = Path(path).resolve().parent
    tls = document.get("tls_server_config")
    files = [path]
    context = None
    if tls is not None:
        context, tls_files = _tls(tls, base, f"{where}: tls_server_config")
        files += tls_files
    users = _users(document.get("basic_auth_users"), f"{where}: basic_auth_users")
    warn_if_permissive(path, where)
    return WebConfig(context, users, tuple(files), functools.partial(load_web_config, path))


def _mapping(value: Any, setting: str, known: Iterable[str]) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{setting}: must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(
            f"{setting}: unknown or unsupported key(s): {', '.join(unknown)} "
            f"(supported: {', '.join(known)})"
        )
    return value


def _string(tls: dict[str, Any], key: str, setting: str) -> str | None:
    value = tls.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{setting}.{key}: must be a non-empty string")
    return value


def _tls(value: Any, base: Path, setting: str) -> tuple[ssl.SSLContext, list[str]]:
    tls = _mapping(value, setting, TLS_KEYS)
    files = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        name = _string(tls, key, setting)
        if name is None:
            if key != "client_ca_file":
                raise ConfigError(f"{setting}.{key}: required")
            continue
        file = base / name
        if not file.is_file():
            raise ConfigError(f"{setting}.{key}: no such file: {str(file)!r}")
        files[key] = str(file)
    auth = _string(tls, "client_auth_type", setting) or "NoClientCert"
    if auth in UNVERIFIED_CLIENT_AUTH_TYPES:
        raise ConfigError(
            f"{setting}.client_auth_type: {auth} asks for a certificate without "
            "verifying it, which is not supported; use VerifyClientCertIfGiven "
            "or RequireAndVerifyClientCert with client_ca_file"
        )
    if auth not in CLIENT_AUTH_TYPES:
        raise ConfigError(
            f"{setting}.client_auth_type: must be one of "
            f"{', '.join(CLIENT_AUTH_TYPES)}, got {auth!r:.60}"
        )
    if (auth == "NoClientCert") != ("client_ca_file" not in files):
        raise ConfigError(
            f"{setting}.client_ca_file: must be given with, and only with, a "
            f"client_auth_type that verifies certificates (got {auth})"
        )
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", None)):
        name = _string(tls, key, setting) or default
        if name in REFUSED_TLS_VERSIONS:
            raise ConfigError(
                f"{setting}.{key}: {name} is not supported (OpenSSL refuses TLS "
                "1.0 and 1.1 at its default security level); use TLS12 or "
                "TLS13"
            )
        if name is not None and name not in TLS_VERSIONS:
            raise ConfigError(
                f"{setting}.{key}: must be one of {', '.join(TLS_VERSIONS)}, got {name!r:.60}"
            )
        versions[key] = None if name is None else TLS_VERSIONS[name]
    minimum, maximum = versions["min_version"], versions["max_version"]
    assert minimum is not None
    if maximum is not None and maximum < minimum:
        raise ConfigError(f"{setting}.max_version: lower than min_version")
    warn_if_permissive(files["key_file"], f"{setting}.key_file")
    context = tls_context(
        files["cert_file"],
        files["key_file"],
        client_ca_file=files.get("client_ca_file"),
        verify_mode=CLIENT_AUTH_TYPES[auth],
        min_version=minimum,
        max_version=maximum,
        setting=f"{setting}.cert_file",
    )
    return context, list(files.values())


def _users(value: Any, setting: str) -> dict[str, bytes]:
    import bcrypt

    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{setting}: must be a mapping of user name to bcrypt hash")
    users = {}
    for user, hashed in value.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise ConfigError(f"{setting}: user names must be non-empty strings without ':'")
        if not isinstance(hashed, str):
            raise ConfigError(f"{setting}.{user}: must be a bcrypt hash string")
        try:
            bcrypt.checkpw(b"", hashed.encode())  # rejects anything that is not a bcrypt hash
        except ValueError:
            raise ConfigError(f"{setting}.{user}: not a valid bcrypt hash") from None
        users[user] = hashed.encode()
    return users


StartResponse = Callable[..., Any]


class BasicAuth:
    """WSGI middleware: answers 401 (``WWW-Authenticate: Basic``, no detail) unless the
    request carries the credentials of one of ``users`` (name to bcrypt hash).

    An unknown user costs the same bcrypt check as a wrong password. Successful checks are
    remembered by a SHA-256 of the credentials and the hash, as exporter-toolkit does, so
    that a scraper pays bcrypt once rather than at every scrape. At most
    :data:`BCRYPT_SLOTS` checks run at once; a request beyond them gets 503 and
    ``Retry-After: 1``. Paths in ``open_paths`` (as the app routes them: without a trailing
    ``/``) are served without credentials.
    """

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
        users: Mapping[str, bytes],
        open_paths: Iterable[str] = (),
    ) -> None:
        import bcrypt

        self.app = app
        self._checkpw = bcrypt.checkpw
        self._open_paths = frozenset(open_paths)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(BCRYPT_SLOTS)
        self.set_users(users)

    def set_users(self, users: Mapping[str, bytes]) -> None:
        """From now on, these users (remembered successes are forgotten)."""
        import bcrypt

        # an unknown user costs a check at the users' cost, like a wrong password
        costs = [int(h[4:6]) for h in users.values() if h[4:6].isdigit()]
        dummy = bcrypt.hashpw(b"not a password", bcrypt.gensalt(min(costs, default=10)))
        with self._lock:
            self._users, self._dummy = dict(users), dummy
            self._verified: set[bytes] = set()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if self._open_paths and (path if path == "/" else path.rstrip("/")) in self._open_paths:
            return self.app(environ, start_response)
        authorized = self.authorized(environ.get("HTTP_AUTHORIZATION", ""))
        if authorized:
            return self.app(environ, start_response)
        if authorized is None:
            status, body, extra = "503 Service Unavailable", b"Busy\n", ("Retry-After", "1")
        else:
            status, body = "401 Unauthorized", b"Unauthorized\n"
            extra = ("WWW-Authenticate", "Basic")
        start_response(
            status,
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                extra,
            ],
        )
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    def authorized(self, header: str) -> bool | None:
        """Whether the ``Authorization`` header value names a user with its password; None
        when every bcrypt slot is busy."""
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        users, dummy = self._users, self._dummy
        hashed = users.get(user.decode("utf-8", "replace")) if sep else None
        key = hashlib.sha256(b"\0".join((user, password, hashed or b""))).digest()
        if hashed is not None and key in self._verified:
            return True
        if not self._slots.acquire(blocking=False):
            return None
        try:
            ok = self._checkpw(password, hashed or dummy) and hashed is not None
        except ValueError:  # e.g. a password longer than bcrypt's 72 bytes
            ok = False
        finally:
            self._slots.release()
        if ok:
            with self._lock:
                if len(self._verified) >= AUTH_CACHE_SIZE:
                    self._verified.clear()
                self._verified.add(key)
        return ok


class LiveWebConfig:
    """The web configuration of a running ``serve``: its TLS context switches each new
    handshake to the latest certificate, key and client CAs, and :meth:`auth` to the latest
    users, after :meth:`reload` (when a file changed, or always with ``force``). A reload
    that fails, or would change what only a restart can (:meth:`WebConfig.shape`), is
    logged and the running configuration kept."""

    def __init__(self, config: WebConfig, auth: BasicAuth | None = None) -> None:
        self.config = config
        self.auth = auth
        self.reloads = 0
        self._stamps = _stamps(config.files)
        if config.ssl_context is not None:
            config.ssl_context.sni_callback = self._latest_context

    def _latest_context(self, sock: ssl.SSLObject, name: str | None, first: ssl.SSLContext) -> None:
        latest = self.config.ssl_context
        if latest is not None and latest is not first:
            sock.context = latest
        return None

    def reload(self, *, force: bool = False) -> bool:
        """Read the files again if one changed (or ``force``); True when the new
        configuration is in use."""
        stamps = _stamps(self.config.files)
        if self.config.source is None or (not force and stamps == self._stamps):
            return False
        self._stamps = stamps
        setting = self.config.setting
        try:
            new = self.config.source()
        except ConfigError as exc:
            log.error("%s: not reloaded, the running configuration is kept: %s", setting, exc)
            return False
        if new.shape() != self.config.shape():
            log.error(
                "%s: not reloaded: turning TLS or basic auth on or off, the client "
                "certificate check or the TLS versions change only with a restart",
                setting,
            )
            return False
        if self.auth is not None:
            self.auth.set_users(new.users)
        self.config = new
        self.reloads += 1
        log.warning("%s: reloaded (%s)", setting, ", ".join(new.files))
        return True


def _stamps(files: Iterable[str]) -> tuple[object, ...]:
    """What changes when a file is rewritten or replaced (as Kubernetes swaps a symlink)."""
    stamps: list[object] = []
    for name in files:
        try:
            info = os.stat(name)
            stamps.append((info.st_ino, info.st_mtime_ns, info.st_size))
        except OSError as exc:
            stamps.append(exc.errno)
    return tuple(stamps)
