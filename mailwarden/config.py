"""One TOML file, validated at start.

The schema below is the single source of truth: validation, the documented
defaults (`mailwarden config defaults`, docs/configuration.md) and the typed
`Config` object all come from it, so a default can never be undocumented.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailwarden.checks.attachments import BLOCKED_TYPES, EXECUTABLE_EXTENSIONS


class ConfigError(Exception):
    """A config value is wrong; the message names the key and the problem."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config error: {key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Option:
    key: str  # "section.name"
    kind: type | tuple[type, ...]
    default: Any
    doc: str
    minimum: int | float | None = None
    choices: tuple[str, ...] | None = None
    is_address: bool = False
    validator: Callable[[str, Any], None] | None = None  # raises ConfigError for a bad value


LIMIT_KEYS = (  # the limits `limits.overrides` may set (outbound/limits.py)
    "max_message_bytes",
    "max_header_bytes",
    "max_attachment_bytes",
    "max_attachments_total_bytes",
    "max_recipients",
    "max_messages_per_session",
)


def _check_limit_overrides(key: str, value: Any) -> None:
    for who, limits in value.items():
        if not isinstance(limits, dict):
            raise ConfigError(f"{key}.{who}: must be a table of limits, like {{ max_recipients = 500 }}")
        for name, number in limits.items():
            if name not in LIMIT_KEYS:
                raise ConfigError(f"{key}.{who}: unknown limit {name!r}; one of {', '.join(LIMIT_KEYS)}")
            if not isinstance(number, int) or isinstance(number, bool) or number < 0:
                raise ConfigError(f"{key}.{who}.{name}: must be a whole number >= 0")


_ACTION_WORDS = ("none", "junk", "quarantine", "reject", "tempfail")


def _check_actions(key: str, value: Any) -> None:
    for name, meaning in value.items():
        if "." not in name:
            raise ConfigError(f"{key}.{name}", 'expected "<check>.<result>", e.g. "spf.fail"')
        if isinstance(meaning, bool) or not isinstance(meaning, (str, int, float)):
            raise ConfigError(f"{key}.{name}", f"expected an action or a score, got {meaning!r}")
        if isinstance(meaning, str) and meaning not in _ACTION_WORDS:
            raise ConfigError(f"{key}.{name}", f"action must be one of {', '.join(_ACTION_WORDS)}, got {meaning!r}")


def _check_networks(key: str, value: Any) -> None:
    import ipaddress

    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except (TypeError, ValueError):
            raise ConfigError(key, f"not a network: {item!r} (expected CIDR like 192.0.2.0/24)") from None


def _check_choices(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    for item in value:
        if item not in allowed:
            raise ConfigError(key, f"unknown check {item!r}; expected some of {', '.join(allowed)}")


def _check_retry_schedule(key: str, value: Any) -> None:
    if not value:
        raise ConfigError(key, "needs at least one delay in seconds")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or item < 1:
            raise ConfigError(key, f"delays are seconds >= 1, got {item!r}")


def _check_hour(key: str, value: Any) -> None:
    if value > 23:
        raise ConfigError(key, f"an hour of the day is 0-23, got {value}")


def _check_str_list(key: str, value: Any) -> None:
    for item in value:
        if not isinstance(item, str) or not item:
            raise ConfigError(key, f"expected non-empty strings, got {item!r}")


def _check_zones(key: str, value: Any) -> None:
    from mailwarden.checks.dnsbl import DnsblConfigError, parse_zones

    if not all(isinstance(item, dict) for item in value):
        raise ConfigError(key, 'expected a list of tables, e.g. [{ preset = "spamhaus-zen" }]')
    try:
        parse_zones(value)
    except DnsblConfigError as exc:
        raise ConfigError(key, str(exc)) from None


def _check_size(key: str, value: Any) -> None:
    from mailwarden.storage.quota import SizeError, parse_size

    try:
        parse_size(value)
    except SizeError as exc:
        raise ConfigError(key, str(exc)) from None


def _check_milters(key: str, value: Any) -> None:
    from mailwarden.checks.milter import parse_specs

    try:
        parse_specs(value)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


GUARD_EVENTS = ("auth_fail", "unknown_user", "relay", "protocol", "early_talker", "scanner")
GUARD_LISTENERS = ("mx", "submission", "submissions", "imap", "imaps", "web")


def _check_guard_entries(key: str, value: Any) -> None:
    import ipaddress

    for item in value:
        if not isinstance(item, str):
            raise ConfigError(key, f'expected "CIDR" or "LISTENER:CIDR" strings, got {item!r}')
        listener, sep, cidr = item.partition(":")
        if not sep or listener not in GUARD_LISTENERS:
            cidr = item
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(key, f"not a network: {item!r} (expected CIDR or LISTENER:CIDR)") from None


def _check_guard_thresholds(key: str, value: Any) -> None:
    for name, number in value.items():
        if name not in GUARD_EVENTS:
            raise ConfigError(f"{key}.{name}", f"unknown event; one of {', '.join(GUARD_EVENTS)}")
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ConfigError(f"{key}.{name}", f"expected a whole number >= 1, got {number!r}")


def _check_probability(key: str, value: Any) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(key, f"a probability is between 0 and 1, got {value}")


# Production defaults. `init --dev` overrides the listen.* keys only.
OPTIONS: tuple[Option, ...] = (
    Option(
        "server.hostname",
        str,
        "localhost",
        "Name this server gives in its banner, EHLO reply and Received headers; set it to the MX host name.",
    ),
    Option("server.primary_domain", str, "", "The domain created by `init`; used in DNS record output."),
    Option(
        "server.workers",
        int,
        0,
        "Worker processes sharing the listeners; 0 means one per CPU core, 1 runs everything in one process.",
        minimum=0,
    ),
    Option(
        "listen.mx",
        str,
        "0.0.0.0:25",
        "MX listener (SMTP, STARTTLS offered, no AUTH before TLS). Empty string disables it.",
        is_address=True,
    ),
    Option(
        "listen.submission",
        str,
        "0.0.0.0:587",
        "Submission listener (STARTTLS, AUTH required before MAIL).",
        is_address=True,
    ),
    Option("listen.submissions", str, "0.0.0.0:465", "Submission over implicit TLS (RFC 8314).", is_address=True),
    Option(
        "listen.imap",
        str,
        "0.0.0.0:143",
        "IMAP listener (STARTTLS; LOGIN and AUTHENTICATE only after it). Empty string disables it.",
        is_address=True,
    ),
    Option(
        "listen.imaps",
        str,
        "0.0.0.0:993",
        "IMAP over implicit TLS (RFC 8314). Empty string disables it.",
        is_address=True,
    ),
    Option(
        "listen.web",
        str,
        "0.0.0.0:443",
        "HTTPS admin console and webmail; reserved until the web layer lands.",
        is_address=True,
    ),
    Option(
        "listen.metrics",
        str,
        "127.0.0.1:9025",
        "Prometheus /metrics over plain HTTP. Keep it on loopback or a management network.",
        is_address=True,
    ),
    Option(
        "dns.servers",
        list,
        [],
        "DNS servers every check resolves through, as HOST:PORT strings. Empty: the nameservers in /etc/resolv.conf. Use a validating resolver if you want DANE.",
        is_address=True,
    ),
    Option(
        "dns.timeout",
        float,
        5.0,
        "Seconds to wait for one DNS server before trying the next; all failing is a temporary error.",
        minimum=0.1,
    ),
    Option("dns.cache_size", int, 10_000, "Answers kept in the DNS cache (each for its TTL).", minimum=0),
    Option(
        "tls.cert", str, "tls/cert.pem", "PEM certificate chain, relative to the instance folder. Reloaded on SIGHUP."
    ),
    Option("tls.key", str, "tls/key.pem", "PEM private key, relative to the instance folder. Reloaded on SIGHUP."),
    Option(
        "smtp.max_message_size",
        int,
        26_214_400,
        "Largest message accepted, in bytes (advertised as SIZE; larger gets 552 5.3.4).",
        minimum=1024,
    ),
    Option("smtp.max_recipients", int, 100, "Recipients per message; past it RCPT gets 452 4.5.3.", minimum=1),
    Option(
        "smtp.max_messages_per_session",
        int,
        100,
        "Messages per connection; past it the session gets 421 4.7.0 and is closed.",
        minimum=1,
    ),
    Option(
        "smtp.max_command_line",
        int,
        2048,
        "Longest command line in bytes, CRLF included (RFC 5321 asks for at least 512).",
        minimum=512,
    ),
    Option(
        "smtp.max_data_line",
        int,
        65_536,
        "Longest line inside DATA. RFC 5321 says 1000, but real mail breaks that, so the bound protects memory instead.",
        minimum=1000,
    ),
    Option(
        "smtp.max_errors", int, 20, "Error replies (5xx) in one session before it is closed with 421 4.7.0.", minimum=1
    ),
    Option(
        "smtp.command_timeout",
        float,
        300.0,
        "Seconds to wait for the next command (RFC 5321 §4.5.3.2.7 says at least 5 minutes).",
        minimum=1,
    ),
    Option("smtp.data_timeout", float, 600.0, "Seconds a whole DATA transfer may take.", minimum=1),
    Option(
        "smtp.recipient_delimiter",
        str,
        "+",
        "user+tag@domain is delivered to user@domain. Empty string turns this off.",
    ),
    Option("accounts.password_min_length", int, 12, "Shortest password accepted by the password policy.", minimum=8),
    Option(
        "accounts.hash_concurrency",
        int,
        2,
        "Argon2 hashes that may run at once (each costs ~64 MiB and ~250 ms).",
        minimum=1,
    ),
    Option("accounts.argon2_time_cost", int, 3, "Argon2id iterations.", minimum=1),
    Option("accounts.argon2_memory_kib", int, 65_536, "Argon2id memory per hash in KiB.", minimum=8192),
    Option("queue.segment_max_bytes", int, 16_777_216, "Spool journal segment size before it rotates.", minimum=65_536),
    Option(
        "queue.group_commit_max", int, 512, "Most messages made durable by one fsync of the spool journal.", minimum=1
    ),
    Option(
        "inbound.checks",
        bool,
        True,
        "Run the inbound checks (SPF, DKIM, ARC, DMARC) on mail arriving on the MX listener from unauthenticated, untrusted clients.",
    ),
    Option(
        "inbound.disabled_checks",
        list,
        [],
        'Checks not to run, from "spf", "dkim", "arc", "dmarc", "dnsbl", "uribl", "rules", "spam". Every check runs by default.',
        validator=lambda key, value: _check_choices(
            key, value, ("spf", "dkim", "arc", "dmarc", "dnsbl", "uribl", "rules", "spam")
        ),
    ),
    Option(
        "inbound.actions",
        dict,
        {},
        'What a check result means, overriding the built-in table: "<check>.<result>" = an action (none, junk, quarantine, reject, tempfail) or a score to add. See docs/inbound.md.',
        validator=_check_actions,
    ),
    Option("inbound.junk_score", float, 5.0, "A total score at or above this delivers to Junk.", minimum=0),
    Option("inbound.reject_score", float, 10.0, "A total score at or above this rejects with 550 5.7.1.", minimum=0),
    Option(
        "inbound.trusted_networks",
        list,
        [],
        "Client networks (CIDR) whose mail skips the sender checks, such as your own other servers. Not a relay permission.",
        validator=_check_networks,
    ),
    Option(
        "inbound.trusted_arc_sealers",
        list,
        [],
        "ARC sealer domains (e.g. a mailing list host) whose passing chain overrides a DMARC failure.",
        validator=_check_str_list,
    ),
    Option(
        "dnsbl.zones",
        list,
        [],
        'Block lists: IP zones are asked about the client at RCPT, domain zones about the HELO and MAIL FROM domains and the links in the body. E.g. [{ preset = "spamhaus-zen" }, { preset = "spamhaus-dbl" }]; see docs/inbound.md. Spamhaus refuses queries through public resolvers, so point dns.servers at your own.',
        validator=_check_zones,
    ),
    Option(
        "dnsbl.max_body_lookups",
        int,
        20,
        "Block list queries for links in one message body (domains x zones).",
        minimum=0,
    ),
    # ---- limits and quotas (outbound/limits.py, outbound/quotas.py) ----
    Option(
        "limits.max_header_bytes",
        int,
        262_144,
        "Largest header section of a message, in bytes; larger gets 552 5.3.4 at the end of DATA.",
        minimum=1024,
    ),
    Option(
        "limits.max_attachment_bytes",
        int,
        20_971_520,
        "Largest single attachment (decoded size, estimated), in bytes; larger gets 552 5.3.4. 0 = only the message size limits it.",
        minimum=0,
    ),
    Option(
        "limits.max_attachments_total_bytes",
        int,
        26_214_400,
        "Largest total of a message's attachments (decoded, estimated), in bytes. 0 = only the message size limits it.",
        minimum=0,
    ),
    Option(
        "limits.overrides",
        dict,
        {},
        'Limits for a domain or a user, over the global ones (the user\'s entry wins over its domain\'s): e.g. { "example.org" = { max_recipients = 500 }, "news@example.org" = { max_recipients = 5000, max_message_bytes = 52428800 } }. Keys: max_message_bytes, max_header_bytes, max_attachment_bytes, max_attachments_total_bytes, max_recipients, max_messages_per_session.',
        validator=lambda key, value: _check_limit_overrides(key, value),
    ),
    Option(
        "quotas.user_messages_per_hour",
        int,
        200,
        "Messages one user may send per clock hour (0 = no limit); past it 451 4.7.1.",
        minimum=0,
    ),
    Option(
        "quotas.user_messages_per_day", int, 1000, "Messages one user may send per UTC day (0 = no limit).", minimum=0
    ),
    Option(
        "quotas.user_recipients_per_hour",
        int,
        500,
        "Recipients one user may send to per clock hour (0 = no limit).",
        minimum=0,
    ),
    Option(
        "quotas.user_recipients_per_day",
        int,
        2000,
        "Recipients one user may send to per UTC day (0 = no limit).",
        minimum=0,
    ),
    Option(
        "quotas.domain_messages_per_hour",
        int,
        2000,
        "Messages all users of one domain may send per clock hour (0 = no limit).",
        minimum=0,
    ),
    Option(
        "quotas.domain_messages_per_day",
        int,
        10_000,
        "Messages all users of one domain may send per UTC day (0 = no limit).",
        minimum=0,
    ),
    Option(
        "quotas.domain_recipients_per_hour",
        int,
        5000,
        "Recipients for all users of one domain per clock hour (0 = no limit).",
        minimum=0,
    ),
    Option(
        "quotas.domain_recipients_per_day",
        int,
        20_000,
        "Recipients for all users of one domain per UTC day (0 = no limit).",
        minimum=0,
    ),
    Option(
        "quotas.exempt",
        list,
        [],
        'Users or domains the quotas do not apply to, e.g. ["news@example.org"] for a newsletter account.',
        validator=_check_str_list,
    ),
    Option(
        "hold.unique_recipients_per_hour",
        int,
        200,
        "Hold an account's outbound mail when it writes to more unique outside recipients than this in an hour (0 = off).",
        minimum=0,
    ),
    Option(
        "hold.bounce_rate",
        float,
        0.3,
        "Hold an account when more than this share of its deliveries in the last hour failed permanently.",
        minimum=0,
    ),
    Option(
        "hold.min_bounce_sample",
        int,
        20,
        "Deliveries in the last hour needed before the bounce rate counts (0 = bounce signal off).",
        minimum=0,
    ),
    Option(
        "hold.new_ip_recipients",
        int,
        30,
        "Hold an account that, within an hour of a login from a new address, writes to more unique outside recipients than this (0 = off).",
        minimum=0,
    ),
    Option(
        "hold.known_ip_days",
        int,
        30,
        "A login address unused by the account for this many days counts as new.",
        minimum=1,
    ),
    # ---- guard (connections, bans, allow/deny) ----
    Option(
        "guard.allow",
        list,
        [],
        'Networks never refused or banned: "CIDR" for every listener or "LISTENER:CIDR" (e.g. "mx:192.0.2.0/24").',
        validator=_check_guard_entries,
    ),
    Option(
        "guard.deny",
        list,
        [],
        'Networks refused at connect: "CIDR" for every listener or "LISTENER:CIDR"; the allow list still wins.',
        validator=_check_guard_entries,
    ),
    Option("guard.ipv6_prefix", int, 64, "IPv6 clients are counted and banned per network of this length.", minimum=1),
    Option(
        "guard.max_connections",
        int,
        20,
        "Connections one IP (or IPv6 network) may hold open at once on one listener, per worker; past it 421 4.7.0.",
        minimum=1,
    ),
    Option(
        "guard.max_connections_per_minute",
        int,
        120,
        "New connections one IP (or IPv6 network) may open per minute on one listener, per worker; past it 421 4.7.0.",
        minimum=1,
    ),
    Option(
        "guard.max_commands_per_minute",
        int,
        1200,
        "Commands one session may send per minute; past it 421 4.7.0, the session closes and it counts as a violation.",
        minimum=1,
    ),
    Option(
        "guard.greet_delay",
        float,
        3.0,
        "Seconds the MX listener waits before its greeting; a client that talks first gets 554 5.7.1 (0 turns it off).",
        minimum=0,
    ),
    Option(
        "guard.idle_timeout",
        float,
        60.0,
        "Seconds a new session may stay silent after the greeting before its first command.",
        minimum=1,
    ),
    Option(
        "guard.ip_window", int, 600, "Seconds over which ban events are counted per IP (or IPv6 network).", minimum=1
    ),
    Option(
        "guard.ip_thresholds",
        dict,
        {"auth_fail": 10, "unknown_user": 20, "relay": 10, "protocol": 20, "early_talker": 3, "scanner": 30},
        "Events of one kind within guard.ip_window that ban the IP; kinds: " + ", ".join(GUARD_EVENTS) + ".",
        validator=_check_guard_thresholds,
    ),
    Option(
        "guard.ban_durations",
        list,
        [600, 3600, 86400],
        "Seconds of the first, second, third... ban of the same IP; the last one repeats.",
        validator=_check_retry_schedule,
    ),
    Option(
        "guard.ban_memory",
        int,
        604800,
        "Seconds after a ban ends during which a new ban of that IP gets the next, longer duration.",
        minimum=0,
    ),
    Option("guard.account_window", int, 3600, "Seconds over which failed logins are counted per account.", minimum=1),
    Option(
        "guard.account_threshold",
        int,
        5,
        "Failed logins of one account within guard.account_window after which its failures are answered slowly.",
        minimum=1,
    ),
    Option(
        "guard.throttle_delay",
        float,
        1.0,
        "Seconds of delay for an account's first failure past its threshold; doubles with each further one.",
        minimum=0,
    ),
    Option(
        "guard.throttle_max", float, 30.0, "The longest delay before answering a throttled account's login.", minimum=0
    ),
    Option(
        "guard.sync_interval",
        float,
        2.0,
        "Seconds between reloads of bans and CLI allow/deny entries from storage (bans made by other workers).",
        minimum=0.05,
    ),
    # ---- firewall (nftables) ----
    Option(
        "firewall.nftables",
        bool,
        False,
        "Mirror every ban into the nftables sets banned4/banned6 (timed elements) so the kernel drops banned clients; needs nft and CAP_NET_ADMIN.",
    ),
    Option(
        "firewall.nft_table",
        str,
        "inet mailwarden",
        'The nftables table ("<family> <name>") holding the banned4 and banned6 sets (contrib/nftables/mailwarden.nft).',
    ),
    Option(
        "firewall.nft_setup",
        bool,
        True,
        "At start, load the shipped table definition when the table is missing; false: only check the table the admin loaded.",
    ),
    # ---- app passwords ----
    Option(
        "accounts.require_app_passwords",
        list,
        [],
        "Users and/or domains whose mail clients must use app passwords: their account password is refused on IMAP "
        'and SMTP AUTH, e.g. ["alice@example.org", "example.net"].',
        validator=_check_str_list,
    ),
    # ---- storage quotas (storage/quota.py) ----
    Option(
        "accounts.default_quota",
        str,
        "1G",
        "Storage quota of an account with neither its own (`user quota`) nor its domain's (`domain quota`): bytes "
        'or a size with a binary unit, e.g. "500M", "2G"; "0" = unlimited. Mail past it gets 452 4.2.2 (SMTP) or '
        "NO [OVERQUOTA] (IMAP APPEND/COPY).",
        validator=_check_size,
    ),
    # ---- dkim (outbound signing) ----
    Option(
        "dkim.rotation_overlap_days",
        int,
        7,
        "Days a rotated-out DKIM key stays published and verifiable (longer than the queue lifetime) before it is retired.",
        minimum=1,
    ),
    # ---- delivery (outbound transport) ----
    Option("delivery.port", int, 25, "TCP port of remote MX hosts; change it only for tests.", minimum=1),
    Option(
        "delivery.max_connections_per_host",
        int,
        4,
        "Connections open at once to one MX host (idle ones included); each is reused for several messages.",
        minimum=1,
    ),
    Option("delivery.connect_timeout", float, 30.0, "Seconds to connect to an MX and get its greeting.", minimum=1),
    Option(
        "delivery.command_timeout",
        float,
        300.0,
        "Seconds to wait for the reply to one SMTP command (RFC 5321 §4.5.3.2: 5 minutes).",
        minimum=1,
    ),
    Option(
        "delivery.data_timeout",
        float,
        600.0,
        "Seconds to send the message and get the reply to its final dot (RFC 5321 §4.5.3.2: 10 minutes).",
        minimum=1,
    ),
    Option(
        "delivery.idle_timeout", float, 5.0, "Seconds an idle connection is kept open for the next message.", minimum=0
    ),
    Option(
        "delivery.ca_file",
        str,
        "",
        "Extra PEM CA bundle trusted (with the system CAs) for MTA-STS policies and MX certificates.",
    ),
    Option(
        "delivery.mta_sts_port", int, 443, "HTTPS port of MTA-STS policy hosts; change it only for tests.", minimum=1
    ),
    Option("delivery.mta_sts_timeout", float, 20.0, "Seconds to fetch one MTA-STS policy over HTTPS.", minimum=1),
    # ---- queue (outbound retries and bounces) ----
    # The two delivery.relay_* options belong to the relay transport (outbound/relay.py),
    # written with the queue runner, so they live under this anchor.
    Option(
        "delivery.relay_host",
        str,
        "",
        "Send all outbound mail through this smart host (HOST:PORT) instead of delivering by MX. Empty: deliver by MX.",
        is_address=True,
    ),
    Option(
        "delivery.relay_tls",
        bool,
        True,
        "Require STARTTLS with a certificate valid for the relay host (system CAs plus delivery.ca_file); otherwise defer. false: STARTTLS when offered, unverified.",
    ),
    Option(
        "queue.retry_schedule",
        list,
        [60, 300, 900, 1800, 3600, 7200, 14400],
        "Seconds to wait before each retry of a deferred recipient (a little jitter is added); the last value repeats.",
        validator=_check_retry_schedule,
    ),
    Option(
        "queue.max_lifetime",
        int,
        432_000,
        "Seconds a recipient may stay deferred before it bounces (default 5 days).",
        minimum=60,
    ),
    Option(
        "queue.delay_warning",
        int,
        14_400,
        "Seconds deferred before the sender gets one delay warning DSN per recipient; 0 = never.",
        minimum=0,
    ),
    Option(
        "queue.paused",
        bool,
        False,
        "Keep outbound mail queued without trying to deliver it (maintenance, a standby node); incoming mail is still accepted.",
    ),
    Option(
        "queue.max_concurrent_deliveries",
        int,
        20,
        "Delivery attempts (SMTP transactions) in progress at once, shared by all workers.",
        minimum=1,
    ),
    Option("log.level", str, "info", "Log level.", choices=("debug", "info", "warning", "error")),
    # ---- content rules, attachment policy, quarantine (checks/rules.py, pipeline/quarantine.py) ----
    Option(
        "content.brand_domains",
        list,
        [],
        "Domains besides the hosted ones that lookalike domains must not imitate (e.g. your bank, your other brands).",
        validator=_check_str_list,
    ),
    Option(
        "content.protected_names",
        list,
        [],
        'Display names outside mail must not use (e.g. "Jane Doe" for your CEO); local users\' names are protected anyway.',
        validator=_check_str_list,
    ),
    Option(
        "content.blocked_extensions",
        list,
        list(EXECUTABLE_EXTENSIONS),
        "Attachment (and archive member) extensions treated as executable: rules.executable_attachment.",
        validator=_check_str_list,
    ),
    Option(
        "content.blocked_types",
        list,
        list(BLOCKED_TYPES),
        "Declared attachment MIME types that are blocked: rules.blocked_attachment.",
        validator=_check_str_list,
    ),
    Option(
        "content.max_archive_depth",
        int,
        3,
        "Archives nested deeper than this (an archive in an archive ...) fire rules.archive_depth.",
        minimum=1,
    ),
    Option(
        "content.max_archive_size",
        int,
        104_857_600,
        "Uncompressed bytes the archives of one message may declare or inflate to before rules.archive_size fires (zip bombs).",
        minimum=1_048_576,
    ),
    Option(
        "content.attachment_action",
        str,
        "reject",
        "What the attachment rules do: reject (550), quarantine (held for an administrator), or strip (remove the parts, add a notice, deliver the rest).",
        choices=("reject", "quarantine", "strip"),
    ),
    Option(
        "quarantine.digest",
        str,
        "off",
        "Mail each user a daily summary of the messages quarantined for them.",
        choices=("off", "daily"),
    ),
    Option(
        "quarantine.digest_hour",
        int,
        8,
        "Hour of the day (UTC, 0-23) the daily digest is sent.",
        minimum=0,
        validator=lambda key, value: _check_hour(key, value),
    ),
    Option(
        "milter.milters",
        list,
        [],
        'Content filters spoken to over the milter protocol, in this order, e.g. [{ name = "rspamd", address = "inet:127.0.0.1:11332" }]. Keys: name, address (inet:HOST:PORT or unix:/PATH), direction (inbound, outbound, both; default inbound), failure_mode (tempfail or accept; default tempfail), connect_timeout (10), timeout (10, each reply), eom_timeout (60, end of message). See docs/content.md.',
        validator=_check_milters,
    ),
    # ---- spam classifier (checks/spam, docs/content.md) ----
    Option(
        "spam.model",
        str,
        "",
        "The global spam model file; empty = the one shipped with Mailwarden (trained on the SpamAssassin public corpus).",
    ),
    Option(
        "spam.spam_probability",
        float,
        0.8,
        "Inbound mail the classifier gives at least this spam probability is spam (Junk, unless inbound.actions says otherwise). The default was chosen with the shipped model by cross-validation (checks/spam/tune.py).",
        validator=_check_probability,
    ),
    Option(
        "spam.unsure_probability",
        float,
        0.5,
        "From this probability up to spam.spam_probability mail is unsure: it adds a score up to spam.unsure_max_score.",
        validator=_check_probability,
    ),
    Option(
        "spam.unsure_max_score",
        float,
        4.5,
        "The most an unsure result adds to the verdict score (keep it under inbound.junk_score so it needs another signal).",
        minimum=0,
    ),
    Option(
        "spam.outbound_probability",
        float,
        0.99,
        "Mail from an authenticated user is held as spam at or above this probability (global model only).",
        validator=_check_probability,
    ),
    Option(
        "spam.max_scan_bytes",
        int,
        262_144,
        "The classifier reads at most this much of a message (and of each decoded part); training events keep as much.",
        minimum=4096,
    ),
    Option(
        "spam.learn_interval",
        float,
        5.0,
        "Seconds between looks for new training events (Junk moves, quarantine releases) to learn from.",
        minimum=0.05,
    ),
    Option("spam.learn_batch", int, 200, "Training events learned per round.", minimum=1),
    Option(
        "spam.user_model_cache_seconds",
        float,
        30.0,
        "How long a worker keeps a user's personal model before reading it again (the learning worker drops it at once).",
        minimum=0,
    ),
)

_BY_KEY = {o.key: o for o in OPTIONS}


@dataclass(frozen=True)
class Config:
    """Validated settings. Read with `cfg.get("smtp.max_recipients")` or attributes."""

    values: dict[str, Any]
    instance_dir: Path

    def get(self, key: str) -> Any:
        return self.values[key]

    def path(self, key: str) -> Path:
        """A path-valued key, resolved against the instance folder."""
        p = Path(self.values[key])
        return p if p.is_absolute() else self.instance_dir / p

    def listen(self, name: str) -> tuple[str, int] | None:
        value = self.values[f"listen.{name}"]
        return parse_address(f"listen.{name}", value) if value else None


def parse_address(key: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    try:
        port_n = int(port)
    except ValueError:
        raise ConfigError(key, f"port {port!r} is not a number") from None
    if not 0 <= port_n <= 65535:
        raise ConfigError(key, f"port {port_n} is out of range 0-65535")
    return host, port_n


def validate(raw: dict[str, Any], instance_dir: Path) -> Config:
    values = {o.key: o.default for o in OPTIONS}
    for section, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(section, "expected a [table]")
        for name, value in table.items():
            key = f"{section}.{name}"
            opt = _BY_KEY.get(key)
            if opt is None:
                raise ConfigError(key, "unknown key")
            values[key] = _check(opt, value)
    return Config(values=values, instance_dir=instance_dir)


def _check(opt: Option, value: Any) -> Any:
    if opt.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and opt.kind is not bool:
        raise ConfigError(opt.key, f"expected {opt.kind.__name__}, got a boolean")
    if not isinstance(value, opt.kind):
        raise ConfigError(opt.key, f"expected {opt.kind.__name__}, got {type(value).__name__} {value!r}")
    if opt.minimum is not None and value < opt.minimum:
        raise ConfigError(opt.key, f"must be at least {opt.minimum}, got {value}")
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(opt.key, f"must be one of {', '.join(opt.choices)}, got {value!r}")
    if opt.validator is not None:
        opt.validator(opt.key, value)
    if opt.is_address and value:
        if isinstance(value, list):
            for item in value:
                if not isinstance(item, str):
                    raise ConfigError(opt.key, f"expected HOST:PORT strings, got {item!r}")
                parse_address(opt.key, item)
        else:
            parse_address(opt.key, value)
    return value


def load(path: Path) -> Config:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(str(path), "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    return validate(raw, path.parent)


def render(overrides: dict[str, Any] | None = None, with_docs: bool = True) -> str:
    """A complete config file: every key, its value and what it does."""
    overrides = overrides or {}
    out: list[str] = ["# Mailwarden configuration. Every key is shown with its default and meaning.", ""]
    section = ""
    # A section's options may sit under several anchors in OPTIONS (queue.*); TOML allows one [table] each.
    first: dict[str, int] = {}
    for i, opt in enumerate(OPTIONS):
        first.setdefault(opt.key.split(".", 1)[0], i)
    for opt in sorted(OPTIONS, key=lambda o: first[o.key.split(".", 1)[0]]):
        sec, name = opt.key.split(".", 1)
        if sec != section:
            if section:
                out.append("")
            out.append(f"[{sec}]")
            section = sec
        if with_docs:
            out.append(f"# {opt.doc}")
        out.append(f"{name} = {_toml_value(overrides.get(opt.key, opt.default))}")
    return "\n".join(out) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def markdown_table() -> str:
    """The table in docs/configuration.md; a test keeps the two equal."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for opt in OPTIONS:
        rows.append(f"| `{opt.key}` | `{_toml_value(opt.default)}` | {opt.doc} |")
    return "\n".join(rows) + "\n"


DEV_LISTENERS = {
    "listen.mx": "127.0.0.1:2525",
    "listen.submission": "127.0.0.1:2587",
    "listen.submissions": "127.0.0.1:2465",
    "listen.imap": "127.0.0.1:2143",
    "listen.imaps": "127.0.0.1:2993",
    "listen.web": "127.0.0.1:8443",
    "listen.metrics": "127.0.0.1:9025",
}
