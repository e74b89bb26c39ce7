"""Secrets out of logs, errors and output: the one redaction function, and what it knows.

:func:`redact` hides passwords in two ways:

- **known secrets**: the password of every secret setting (``database_url``,
  ``broker_url``) is registered when the settings are resolved, and every
  occurrence of it, or of its percent-encoded, quoted or escaped forms, is
  replaced by ``***``. Only this finds the end of a password with an
  unencoded ``@``, ``/``, ``?``, ``#`` or a space in it.
- **patterns**, for secrets nobody registered: the password of any
  ``scheme://user:password@host`` URL (up to the last ``@`` of the URL), and
  the value of ``password=`` (libpq keyword strings, also quoted; URL query
  parameters; ``sslpassword``, ``token``, ``secret``...).

Secrets shorter than :data:`MIN_SECRET_LENGTH` are not registered: one to
three characters occur by chance in nearly every line (ports, timestamps,
words), so replacing them would garble every log record, and the places where
``***`` appeared would point at the password anyway. Such a password is
guessed in seconds; the patterns still hide it inside URLs and ``password=``.

The registry is process-wide, since every log record and error of the process
must be redacted by it; tests empty it with :func:`clear_secrets`.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Self
from urllib.parse import quote, quote_plus, unquote, unquote_plus

MIN_SECRET_LENGTH = 4
MASK = "***"

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
_URL_START = re.compile(_SCHEME)
# Text to redact may be hostile (an ordering key of 200 kB in a log record),
# so every pattern runs in linear time: a scheme starts only where a run of
# scheme characters starts (otherwise each letter of a long word would be tried
# as a start, and the run rescanned from it), and a password in a URL is at
# most _MAX_URL_PASSWORD characters (a longer one needs the registry).
_MAX_URL_PASSWORD = 1024
_SCHEME_START = r"(?<![A-Za-z0-9+.\-])"
# The user name ends at the first ":"; the password at the last "@" before
# whitespace or the next URL (a password containing "://" needs the registry).
_SECRET_IN_URL = re.compile(
    rf"(?P<head>{_SCHEME_START}{_SCHEME}[^:/?#\s]{{0,{_MAX_URL_PASSWORD}}}:)"
    rf"(?P<secret>(?:(?!://)\S){{0,{_MAX_URL_PASSWORD}}})(?=@)"
)
_KEYWORDS = r"(?:password|sslpassword|passwd|pwd|passphrase|token|secret)"
_SECRET_KEYWORD = re.compile(
    rf"(?P<head>(?<![\w\-.]){_KEYWORDS}\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'?|[^\s&'\"]*)",
    re.I,
)
# Where a list of broker URLs is split (kombu's failover syntax: "url1;url2").
_LIST_SEPARATOR = re.compile(rf";\s*(?={_SCHEME})")
# A libpq keyword/value connection string: "host=db password=... dbname=app".
_KEYWORD_DSN = re.compile(r"\s*[A-Za-z_]+\s*=")
_KEYWORD_PAIR = re.compile(
    r"\s*(?P<key>[A-Za-z_]+)\s*=\s*(?:'(?P<quoted>(?:[^'\\]|\\.)*)'|(?P<plain>(?!')(?:[^\s\\]|\\.)*))"
)
_LIBPQ_KEYWORDS = frozenset(
    [
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "passfile",
        "sslmode",
        "sslcert",
        "sslkey",
        "sslpassword",
        "sslrootcert",
        "connect_timeout",
        "application_name",
        "options",
        "service",
        "target_session_attrs",
        "gssencmode",
        "channel_binding",
        "require_auth",
        "sslnegotiation",
        "krbsrvname",
    ]
)
_QUERY_PASSWORD = re.compile(r"[?&](?:password|sslpassword)=", re.I)
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")
# Parsers split a URL at these, so their errors may quote a piece of a password.
_URL_DELIMITERS = re.compile(r"[@/?#]")
_MAX_RUNS = 8  # pieces of a password between delimiters; beyond, only prefixes and suffixes

_lock = threading.Lock()
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None


def redact(text: str) -> str:
    """``text`` without any known secret and without any password in a URL or ``password=``."""
    pattern = _pattern
    if pattern is not None:
        text = pattern.sub(lambda m: _mask_unless_user_name(m, text), text)
    text = _SECRET_IN_URL.sub(lambda m: m.group("head") + MASK, text)
    return _SECRET_KEYWORD.sub(lambda m: m.group("head") + MASK, text)


def _mask_unless_user_name(match: re.Match[str], text: str) -> str:
    # A user name is no secret, even when the password is the same (guest:guest):
    # "amqp://guest:***@" tells the reader which user, and nothing about the password.
    start, end = match.span()
    if text[max(0, start - 3) : start] == "://" and text[end : end + 1] == ":":
        return match.group(0)
    return MASK


def register_secret(secret: str) -> None:
    """Replace ``secret`` (and its encoded forms) wherever :func:`redact` finds it."""
    register_secrets({secret})


def register_secrets(secrets: set[str] | frozenset[str]) -> None:
    global _pattern
    forms = {form for secret in secrets for form in _forms(secret)}
    forms = {form for form in forms if len(form) >= MIN_SECRET_LENGTH and form != MASK}
    with _lock:
        if forms <= _secrets:
            return
        _secrets.update(forms)
        ordered = sorted(_secrets, key=lambda s: (-len(s), s))  # longest first
        _pattern = re.compile("|".join(map(re.escape, ordered)))


def register_secrets_in(value: str) -> None:
    """Register the passwords in the value of a secret setting (see :func:`secrets_in`)."""
    register_secrets(secrets_in(value))


def clear_secrets() -> None:
    """Forget every registered secret (for tests)."""
    global _pattern
    with _lock:
        _secrets.clear()
        _pattern = None


def registered_secrets() -> frozenset[str]:
    with _lock:
        return frozenset(_secrets)


def secrets_in(value: str) -> set[str]:
    """The passwords in a secret setting's value.

    ``value`` is a URL of any scheme, a ``;``-separated list of URLs, or a libpq
    keyword/value string. A value that is none of these (a password pasted by
    mistake, an unparseable string) is a secret as a whole.
    """
    found: set[str] = set()
    for part in _LIST_SEPARATOR.split(value.strip()):
        if _URL_START.match(part):
            found |= _url_secrets(part)
        elif _KEYWORD_DSN.match(part):
            found |= _keyword_secrets(part)
        elif part.strip():
            found.add(part.strip())
    return found


def _url_secrets(url: str) -> set[str]:
    found: set[str] = set()
    region = _password_region(url)
    if region is not None:
        start, end = region
        password = url[start:end]
        found.add(password)
        # Candidates ending at each "@": which one is the host's is ambiguous.
        found.update(url[start:at] for at in _positions(url, "@", start, end))
        found |= _pieces(password)
    for match in _QUERY_PASSWORD.finditer(url):
        rest = url[match.end() :]
        found.add(rest)
        found.update(rest[:amp] for amp in _positions(rest, "&", 0, len(rest)))
        found.update(rest[:cut] for cut in _positions(rest, "#", 0, len(rest)))
    return found


def _password_region(url: str) -> tuple[int, int] | None:
    """Where the password of ``scheme://user:password@host...`` is, when there is one."""
    match = _URL_START.match(url)
    if match is None:
        return None
    colon = url.find(":", match.end())
    if colon < 0 or re.search(r"[/?#\s]", url[match.end() : colon]):
        return None  # no "user:" before the first delimiter: no password
    last_at = url.rfind("@", colon)
    if last_at < 0:
        return None  # "host:port", not "user:password@"
    return colon + 1, last_at


def _positions(text: str, char: str, start: int, end: int) -> list[int]:
    return [i for i in range(start, end) if text[i] == char]


def _pieces(password: str) -> set[str]:
    """Runs of a password's pieces between URL delimiters: what a URL parser may quote."""
    pieces = _URL_DELIMITERS.split(password)
    bounds: list[tuple[int, int]] = []
    offset = 0
    for piece in pieces:
        bounds.append((offset, offset + len(piece)))
        offset += len(piece) + 1
    n = len(bounds)
    if n == 1:
        return set()
    runs = (
        [(i, j) for i in range(n) for j in range(i, n)]
        if n <= _MAX_RUNS
        else [(0, j) for j in range(n)] + [(i, n - 1) for i in range(n)]
    )
    return {password[bounds[i][0] : bounds[j][1]] for i, j in runs}


def _keyword_secrets(dsn: str) -> set[str]:
    """Passwords of a libpq keyword/value string, unescaped and as written.

    libpq's rules: a value is a run of non-blank characters, or single-quoted;
    a backslash escapes the next character (``password='a b\\' c'`` is ``a b' c``).
    """
    found: set[str] = set()
    keys: set[str] = set()
    position = 0
    while dsn[position:].strip():
        match = _KEYWORD_PAIR.match(dsn, position)
        if match is None:
            # Not libpq syntax from here on (an unterminated quote): hide the rest.
            keyword = _SECRET_KEYWORD.search(dsn, position)
            if keyword is not None:
                found.add(dsn[keyword.end("head") :].strip())
            break
        keys.add(match.group("key").lower())
        if match.group("key").lower() in ("password", "sslpassword"):
            raw = match.group("quoted")
            raw = match.group("plain") if raw is None else raw
            found.add(raw)
            found.add(re.sub(r"\\(.)", r"\1", raw))
        position = match.end()
    if not keys & _LIBPQ_KEYWORDS:
        found.add(dsn.strip())  # "a=b" is no connection string: perhaps a password
    return found


def _forms(secret: str) -> set[str]:
    """A secret as written, decoded, percent-encoded, and as repr() and JSON show it."""
    forms = {secret, unquote(secret), unquote_plus(secret)}
    for form in list(forms):
        forms.add(quote(form, safe=""))
        forms.add(quote(form))
        forms.add(quote_plus(form, safe=""))
        forms.add(re.sub(r"[:@/]", lambda m: f"%{ord(m.group(0)):X}", form))  # SQLAlchemy's
    for form in list(forms):
        forms.add(repr(form)[1:-1])
        forms.add(json.dumps(form)[1:-1])
        forms.add(json.dumps(form, ensure_ascii=False)[1:-1])
    return forms


def describe_url(url: str) -> str:
    """A URL as an error message may quote it after parsing it failed.

    Nothing after ``scheme://user:`` is shown when the URL has a password:
    where that password ends is exactly what the parser could not tell.
    """
    text = str(url).strip()
    match = _URL_START.match(text)
    if match is not None and _password_region(text) is not None:
        user = text[match.end() : text.find(":", match.end())]
        return redact(f"{match.group(0)}{user}:") + f"{MASK}@…"
    return redact(text)


def redact_error(message: str, url: str) -> str:
    """The message of an error raised while parsing ``url``, without any piece of its password.

    Parsers quote the piece they choke on (``Port could not be cast to integer
    value as 's3cr'``): any quoted piece of the password region is hidden, at any
    length.
    """
    region = _password_region(str(url).strip())
    if region is not None:
        password = str(url).strip()[region[0] : region[1]]

        def hide(match: re.Match[str]) -> str:
            quoted = match.group(1) if match.group(1) is not None else match.group(2)
            if quoted and quoted in password:
                return match.group(0).replace(quoted, MASK)
            return match.group(0)

        message = _QUOTED.sub(hide, message)
    return redact(message)


def is_keyword_dsn(text: str) -> bool:
    """Whether ``text`` is a libpq keyword/value string rather than a URL."""
    return _URL_START.match(text.strip()) is None and _KEYWORD_DSN.match(text) is not None


class SecretUrl(str):
    """The value of a secret setting (a URL with a password, a list of them, a libpq string).

    It is the string itself wherever a string goes (an engine, a broker
    connection, an f-string), but its ``repr()`` is redacted, so that an object
    holding one, such as the CLI's settings, can be printed or logged whole.
    Its passwords are registered when it is made, as those of every resolved
    secret setting are.
    """

    __slots__ = ()

    def __new__(cls, value: str) -> Self:
        register_secrets_in(value)
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return repr(redact(str(self)))
