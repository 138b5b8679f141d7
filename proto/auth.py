"""The wire contract's authentication, as both ends use it: where a secret comes from, how it
travels, and the TLS credentials of a client and of a server.

Every RPC carries `authorization: Bearer <token>` (METADATA_KEY). Secrets are read, in this
order, from an explicit value, an explicit file, the environment variable, the file the
`..._FILE` environment variable names; so nothing ever has to be on a command line, where
every local user can read it in /proc/PID/cmdline.

    STEPWATCH_TOKEN / STEPWATCH_TOKEN_FILE                    a rank's (and `clip`'s) token
    STEPWATCH_OPERATOR_TOKEN / STEPWATCH_OPERATOR_TOKEN_FILE  the collector's operator token
    STEPWATCH_TLS_CA                                          PEM roots a client trusts
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import grpc

METADATA_KEY = "authorization"
TOKEN_ENV = "STEPWATCH_TOKEN"
OPERATOR_TOKEN_ENV = "STEPWATCH_OPERATOR_TOKEN"
TLS_CA_ENV = "STEPWATCH_TLS_CA"
FILE_SUFFIX = "_FILE"  # STEPWATCH_TOKEN_FILE names a file holding the token


def read_secret(
    value: str | None = None,
    file: str | os.PathLike | None = None,
    *,
    env: str = TOKEN_ENV,
    environ: Mapping[str, str] | None = None,
    what: str = "token",
) -> str | None:
    """The secret from `value`, else `file`, else $env, else the file $env_FILE names; None
    when none is set. A file's trailing newline is not part of it. Raises ValueError for an
    unreadable file or a value that cannot travel as gRPC metadata."""
    environ = os.environ if environ is None else environ
    source = "given"
    if value is None and file is not None:
        value, source = _read_file(file, what), str(file)
    if value is None and environ.get(env):
        value, source = environ[env], f"${env}"
    if value is None and environ.get(env + FILE_SUFFIX):
        value, source = _read_file(environ[env + FILE_SUFFIX], what), f"${env}{FILE_SUFFIX}"
    if value is None:
        return None
    check_token(value, f"{what} ({source})")
    return value


def _read_file(path: str | os.PathLike, what: str) -> str:
    try:
        return Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {str(path)!r}: {exc.strerror}") from None


def check_token(token: object, what: str = "token") -> None:
    """A token must be a non-empty single line of printable ASCII (an HTTP/2 header value)."""
    if (
        not (isinstance(token, str) and token and token.isascii() and token.isprintable())
        or token != token.strip()
    ):
        raise ValueError(
            f"{what} must be a non-empty line of printable ASCII without surrounding spaces"
        )


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying `token` (none without one)."""
    return ((METADATA_KEY, f"Bearer {token}"),) if token else ()


def client_credentials(
    tls: bool = False,
    tls_ca: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials for a client, or None for a plaintext channel. `tls_ca` (else
    $STEPWATCH_TLS_CA) is a PEM file of the roots to trust and implies TLS; `tls` alone trusts
    the system's roots."""
    environ = os.environ if environ is None else environ
    ca = tls_ca if tls_ca is not None else environ.get(TLS_CA_ENV) or None
    if ca is None and not tls:
        return None
    roots = None
    if ca is not None:
        try:
            roots = Path(ca).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read the TLS CA file {str(ca)!r}: {exc.strerror}") from None
    return grpc.ssl_channel_credentials(root_certificates=roots)


def server_tls(
    cert: str | os.PathLike | None, key: str | os.PathLike | None, what: str = "TLS"
) -> tuple[bytes, bytes] | None:
    """(certificate chain, private key) PEM bytes of a listener's --tls-cert / --tls-key, or
    None when neither is given; ValueError when only one is, OSError when one cannot be read.
    The collector, the coordinator and the node agent's listener read them this way."""
    if not (cert or key):
        return None
    if not (cert and key):
        raise ValueError(f"{what} needs both --tls-cert and --tls-key")
    return Path(cert).read_bytes(), Path(key).read_bytes()
