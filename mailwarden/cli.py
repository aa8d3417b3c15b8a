"""The `mailwarden` command.

Every command takes `--dir DIR`, the instance folder (default
$MAILWARDEN_DIR, else /var/lib/mailwarden). Errors are one line on stderr
with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import ipaddress
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

from mailwarden import __version__
from mailwarden import config as config_mod
from mailwarden.config import ConfigError
from mailwarden.logs import log_event
from mailwarden.outbound.dkim_keys import (
    Rotation,
    ensure_signing_keys,
    published,
    record_name,
    removable,
    retire_due,
    rotate,
    zone_lines,
)
from mailwarden.security import app_passwords
from mailwarden.security.passwords import PasswordPolicyError, check_policy
from mailwarden.security.tls import TlsConfigError, write_self_signed
from mailwarden.server import InstancePaths, make_hashing, open_store, queue_wake_file, serve_forever
from mailwarden.storage.interfaces import SigningKey, StorageError
from mailwarden.storage.quota import QuotaState, SizeError, format_size, human_size, parse_size
from mailwarden.storage.sql import SqlStore


class CliError(Exception):
    """A user mistake; printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _default_dir() -> str:
    return os.environ.get("MAILWARDEN_DIR", "/var/lib/mailwarden")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--dir", default=argparse.SUPPRESS, help="instance folder (default $MAILWARDEN_DIR or /var/lib/mailwarden)"
    )
    p = _Parser(prog="mailwarden", description="Mailwarden mail server", parents=[common])
    p.add_argument("--version", action="version", version=f"mailwarden {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def cmd(parent: Any, name: str, func: Callable[..., Any], help_text: str) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help_text, parents=[common])
        sp.set_defaults(func=func)
        return sp

    sp = cmd(sub, "init", cmd_init, "create a new instance and print the DNS records to publish")
    sp.add_argument("--domain", required=True)
    sp.add_argument("--hostname")
    sp.add_argument("--dev", action="store_true", help="bind loopback on unprivileged ports")
    sp.add_argument("--cert", help="use this PEM certificate instead of a self-signed one")
    sp.add_argument("--key", help="the private key for --cert")

    cmd(sub, "serve", cmd_serve, "run the server in the foreground")

    cfg = sub.add_parser("config", help="configuration").add_subparsers(dest="sub", required=True, parser_class=_Parser)
    sp = cmd(cfg, "check", cmd_config_check, "validate a config file")
    sp.add_argument("file", nargs="?")
    cmd(cfg, "defaults", cmd_config_defaults, "print every key with its default and meaning")

    dom = sub.add_parser("domain", help="hosted domains").add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    cmd(dom, "add", cmd_domain_add, "host a domain").add_argument("domain")
    cmd(dom, "list", cmd_domain_list, "list hosted domains")
    sp = cmd(dom, "quota", cmd_domain_quota, "show or set the storage quota of a domain's accounts")
    sp.add_argument("domain")
    sp.add_argument("size", nargs="?", help='e.g. 500M, 2G; 0 = unlimited; "default" = accounts.default_quota')

    dk = sub.add_parser("dkim", help="domain signing keys").add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    cmd(dk, "show", cmd_dkim_show, "print a domain's DKIM TXT records").add_argument("domain")
    cmd(dk, "rotate", cmd_dkim_rotate, "new DKIM keys for a domain; the old ones retire after an overlap").add_argument(
        "domain"
    )

    ali = sub.add_parser("alias", help="aliases and catch-alls").add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    sp = cmd(ali, "add", cmd_alias_add, "add SOURCE -> TARGET (SOURCE @domain is a catch-all)")
    sp.add_argument("source")
    sp.add_argument("target")
    cmd(ali, "list", cmd_alias_list, "list aliases")
    sp = cmd(ali, "del", cmd_alias_del, "delete an alias (all its targets unless TARGET is given)")
    sp.add_argument("source")
    sp.add_argument("target", nargs="?")

    usr = sub.add_parser("user", help="mail accounts").add_subparsers(dest="sub", required=True, parser_class=_Parser)
    sp = cmd(usr, "add", cmd_user_add, "create an account")
    sp.add_argument("address")
    sp.add_argument("--password-stdin", action="store_true")
    cmd(usr, "del", cmd_user_del, "delete an account and its mail").add_argument("address")
    cmd(usr, "list", cmd_user_list, "list accounts").add_argument(
        "--quota", action="store_true", help="with storage used, quota and where the quota comes from"
    )
    cmd(usr, "show", cmd_user_show, "an account's storage use and quota, and whether it is on hold").add_argument(
        "address"
    )
    sp = cmd(usr, "quota", cmd_user_quota, "show or set an account's storage quota")
    sp.add_argument("address")
    sp.add_argument("size", nargs="?", help='e.g. 500M, 2G; 0 = unlimited; "default" = the domain\'s or global one')
    cmd(usr, "quota-recount", cmd_user_quota_recount, "recount storage use from the stored messages").add_argument(
        "address", nargs="?"
    )
    sp = cmd(usr, "passwd", cmd_user_passwd, "set a new password")
    sp.add_argument("address")
    sp.add_argument("--password-stdin", action="store_true")
    cmd(usr, "unhold", cmd_user_unhold, "lift a compromised-account hold and release its held mail").add_argument(
        "address"
    )
    app = usr.add_parser("app-password", help="app passwords for mail clients").add_subparsers(
        dest="app_sub", required=True, parser_class=_Parser
    )
    sp = cmd(app, "add", cmd_app_password_add, "create a named app password and print it once")
    sp.add_argument("address")
    sp.add_argument("name")
    cmd(app, "list", cmd_app_password_list, "list a user's app passwords: name, created, last used").add_argument(
        "address"
    )
    sp = cmd(app, "revoke", cmd_app_password_revoke, "revoke an app password by name")
    sp.add_argument("address")
    sp.add_argument("name")

    mbx = sub.add_parser("mailbox", help="read mailboxes").add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    sp = cmd(mbx, "ls", cmd_mailbox_ls, "list messages: uid, date, from, subject")
    sp.add_argument("address")
    sp.add_argument("--folder", default="INBOX")
    sp = cmd(mbx, "cat", cmd_mailbox_cat, "print one raw message")
    sp.add_argument("address")
    sp.add_argument("uid", type=int)
    sp.add_argument("--folder", default="INBOX")

    sp = cmd(sub, "inspect", cmd_inspect, "run the inbound checks offline on a message file and explain the verdict")
    sp.add_argument("file", help="the message (RFC 5322; LF line endings are converted)")
    sp.add_argument("--ip", required=True, help="the connecting client's address")
    sp.add_argument("--helo", default="", help="the name the client gave in EHLO/HELO")
    sp.add_argument("--mail-from", default="", help="the envelope sender (empty for <>)")
    sp.add_argument("--rcpt", action="append", default=[], help="an envelope recipient (repeatable)")
    sp.add_argument("--dns", help="resolve through this SERVER:PORT instead of the configured servers")
    sp.add_argument("--json", action="store_true", help="print the verdict as JSON")
    sp.add_argument("--no-milters", action="store_true", help="skip the configured inbound milters")

    spm = sub.add_parser("spam", help="the spam classifier").add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    sp = cmd(spm, "train", cmd_spam_train, "teach the classifier that every message file under DIR is spam or ham")
    sp.add_argument("folder", metavar="DIR")
    sp.add_argument("--label", required=True, choices=("spam", "ham"))
    sp.add_argument("--user", help="train this account's personal model (default: the site-wide model)")
    sp = cmd(spm, "eval", cmd_spam_eval, "classify labelled message files and print accuracy, F1, ham FP rate, msgs/s")
    sp.add_argument("folder", metavar="DIR")
    sp.add_argument("--labels", required=True, metavar="CSV", help="path,label[,group] rows (label spam or ham)")
    sp.add_argument("--user", help="add this account's personal model")
    sp.add_argument(
        "--held-out", action="store_true", help="only the held-out fifth of the files (the part the model never saw)"
    )

    que = sub.add_parser("queue", help="outbound queue").add_subparsers(dest="sub", required=True, parser_class=_Parser)
    cmd(que, "list", cmd_queue_list, "list queued recipients")
    cmd(que, "show", cmd_queue_show, "show a queued message").add_argument("queue_id")
    cmd(que, "delete", cmd_queue_delete, "delete a queued message").add_argument("queue_id")
    cmd(que, "flush", cmd_queue_flush, "make every queued recipient due now and wake the running server")
    cmd(que, "hold", cmd_queue_hold, "hold a message: never sent until released").add_argument("queue_id")
    cmd(que, "release", cmd_queue_release, "release a held message for delivery now").add_argument("queue_id")

    qua = sub.add_parser("quarantine", help="messages held by the content verdict").add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    sp = cmd(qua, "list", cmd_quarantine_list, "list held messages")
    sp.add_argument("--user", help="only those held for this account")
    sp.add_argument("--all", action="store_true", help="released and deleted ones too")
    cmd(qua, "show", cmd_quarantine_show, "show a held message and why it was held").add_argument("id", type=int)
    cmd(qua, "release", cmd_quarantine_release, "deliver a held message to its recipients' INBOX").add_argument(
        "id", type=int
    )
    cmd(qua, "delete", cmd_quarantine_delete, "delete a held message").add_argument("id", type=int)
    cmd(
        qua, "digest", cmd_quarantine_digest, "mail each user a summary of messages held for them since the last digest"
    )

    ban = sub.add_parser("ban", help="automatic and manual bans (connection guard)").add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    cmd(ban, "list", cmd_ban_list, "list bans in force: network, until (UTC), reason, events")
    sp = cmd(ban, "add", cmd_ban_add, "ban an IP or CIDR (IPv6 addresses are banned per guard.ipv6_prefix)")
    sp.add_argument("ip")
    sp.add_argument(
        "--for", dest="duration", help="how long: 600, 10m, 1h, 2d (default: the longest guard.ban_durations)"
    )
    cmd(
        ban, "remove", cmd_ban_remove, "lift a ban at once (the running server sees it at the next connection)"
    ).add_argument("ip")
    for kind, what in (("allow", "never refused or banned"), ("deny", "refused at connect")):
        grp = sub.add_parser(kind, help=f"networks {what} (with guard.{kind})").add_subparsers(
            dest="sub", required=True, parser_class=_Parser
        )
        cmd(grp, "list", cmd_guard_list, f"list {kind} entries (config and CLI)").set_defaults(kind=kind)
        cmd(grp, "add", cmd_guard_add, 'add "CIDR" or "LISTENER:CIDR"').set_defaults(kind=kind)
        grp.choices["add"].add_argument("entry")
        cmd(grp, "remove", cmd_guard_remove, "remove an entry added with the CLI").set_defaults(kind=kind)
        grp.choices["remove"].add_argument("entry")
    return p


# ---- helpers ---------------------------------------------------------------


def _paths(args: argparse.Namespace) -> InstancePaths:
    return InstancePaths(Path(getattr(args, "dir", None) or _default_dir()))


def _load_config(paths: InstancePaths) -> config_mod.Config:
    if not paths.config.exists():
        raise CliError(f"no instance at {paths.root} (run `mailwarden init` or pass --dir)")
    return config_mod.load(paths.config)


def _with_store(args: argparse.Namespace, work: Callable[[SqlStore], Awaitable[Any]]) -> Any:
    paths = _paths(args)
    _load_config(paths)

    async def run() -> Any:
        store = await open_store(paths)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("New password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise CliError("passwords do not match")
    return password


def _hash_new_password(args: argparse.Namespace, address: str) -> str:
    cfg = _load_config(_paths(args))
    password = _read_password(args)
    check_policy(password, address, cfg.get("accounts.password_min_length"))
    return make_hashing(cfg).hash_sync(password)


def _write_bytes(data: bytes) -> None:
    """Raw message bytes to stdout, unchanged when stdout is a real stream."""
    sys.stdout.flush()
    if hasattr(sys.stdout, "buffer"):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        sys.stdout.write(data.decode("utf-8", "surrogateescape"))


def _fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# ---- commands --------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> None:
    paths = _paths(args)
    if paths.config.exists():
        raise CliError(f"{paths.config} already exists; refusing to overwrite an instance")
    domain = args.domain.strip().lower()
    hostname = (args.hostname or ("localhost" if args.dev else f"mail.{domain}")).lower()
    if bool(args.cert) != bool(args.key):
        raise CliError("--cert and --key go together")
    for sub in ("tls", "data", "spool", "run"):
        (paths.root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(paths.root / "tls", 0o700)
    overrides: dict[str, Any] = {"server.hostname": hostname, "server.primary_domain": domain}
    if args.dev:
        overrides.update(config_mod.DEV_LISTENERS)
    if args.cert:
        overrides["tls.cert"] = str(Path(args.cert).resolve())
        overrides["tls.key"] = str(Path(args.key).resolve())
    else:
        write_self_signed(paths.root / "tls" / "cert.pem", paths.root / "tls" / "key.pem", hostname)
    paths.config.write_text(config_mod.render(overrides))
    cfg = config_mod.load(paths.config)  # the file we wrote must validate

    async def setup() -> list[SigningKey]:
        store = await open_store(paths)
        try:
            await store.add_domain(domain)
            return (await ensure_signing_keys(store, [domain]))[domain]
        finally:
            await store.close()

    keys = asyncio.run(setup())
    print(f"Created instance in {paths.root} for {domain} (hostname {hostname}).")
    print(f"Config: {paths.config}")
    print()
    print(dns_records(domain, hostname, keys))
    if args.dev:
        listeners = ", ".join(f"{k.split('.')[1]} {v}" for k, v in config_mod.DEV_LISTENERS.items())
        print(f"Development listeners: {listeners}")
        print("(web is reserved in the config; this version serves SMTP, IMAP and metrics.)")
    _ = cfg


def dns_records(domain: str, hostname: str, keys: list[SigningKey]) -> str:
    return "\n".join(
        [
            "Publish these DNS records:",
            f"  {hostname}.  IN A     <this server's IPv4 address>",
            f"  {hostname}.  IN AAAA  <this server's IPv6 address, if any>",
            f"  {domain}.  IN MX   10 {hostname}.",
            f'  {domain}.  IN TXT  "v=spf1 mx -all"',
            f'  _dmarc.{domain}.  IN TXT  "v=DMARC1; p=quarantine; adkim=s; aspf=s; rua=mailto:postmaster@{domain}"',
            *(f"  {line}" for line in zone_lines(keys)),
            f"Set the PTR record of the server's address to {hostname}.",
        ]
    )


def cmd_serve(args: argparse.Namespace) -> None:
    from mailwarden.logs import setup_logging
    from mailwarden.supervisor import Supervisor, worker_count

    paths = _paths(args)
    cfg = _load_config(paths)
    setup_logging(cfg.get("log.level"))
    workers = worker_count(cfg)
    if workers > 1:
        code = Supervisor(cfg, paths, workers).run()
        if code:
            raise CliError("workers kept failing; see the log")
        return
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve_forever(cfg, paths))


def cmd_config_check(args: argparse.Namespace) -> None:
    path = Path(args.file) if args.file else _paths(args).config
    config_mod.load(path)
    print(f"{path}: ok")


def cmd_config_defaults(args: argparse.Namespace) -> None:
    print(config_mod.render(), end="")


def cmd_domain_add(args: argparse.Namespace) -> None:
    domain = args.domain.strip().lower()

    async def add(store: SqlStore) -> list[SigningKey]:
        await store.add_domain(domain)
        return (await ensure_signing_keys(store, [domain]))[domain]

    keys = _with_store(args, add)
    print(f"added domain {domain}; publish its DKIM keys (they also seal mail it forwards):")
    for line in zone_lines(keys):
        print(f"  {line}")


def cmd_dkim_show(args: argparse.Namespace) -> None:
    domain = args.domain.strip().lower()

    async def show(store: SqlStore) -> list[SigningKey]:
        if not await store.is_local_domain(domain):
            raise CliError(f"{domain} is not a hosted domain")
        await retire_due(store)
        return await store.signing_keys(domain)

    every = _with_store(args, show)
    keys = published(every)
    if not keys:
        raise CliError(f"{domain} has no DKIM keys yet; `mailwarden serve` makes them at start")
    print(f"; DKIM keys of {domain} (publish every record)")
    for key, line in zip(keys, zone_lines(keys), strict=True):
        state = key.state if key.retire_at is None else f"{key.state} until {_utc(key.retire_at)}, then remove"
        print(f"; {key.algorithm}, {state}, made {_fmt_time(key.created)}")
        print(line)
    for key in removable(every):
        print(f"; retired: remove {record_name(key)}. IN TXT")


def cmd_dkim_rotate(args: argparse.Namespace) -> None:
    domain = args.domain.strip().lower()
    overlap = _load_config(_paths(args)).get("dkim.rotation_overlap_days")

    async def work(store: SqlStore) -> Rotation:
        if not await store.is_local_domain(domain):
            raise CliError(f"{domain} is not a hosted domain")
        return await rotate(store, domain, overlap)

    done = _with_store(args, work)
    print(f"; DKIM keys of {domain} rotated: the new keys sign from now on.")
    print("; Publish these records now:")
    for line in zone_lines(done.new):
        print(line)
    if done.retiring:
        print(f"; Keep the old records published until {_utc(done.retire_at)} (mail signed with them is still")
        print("; in transit), then remove them:")
        for key in done.retiring:
            print(f"; remove after {_utc(done.retire_at)}: {record_name(key)}. IN TXT")


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def cmd_domain_list(args: argparse.Namespace) -> None:
    for name in _with_store(args, lambda s: s.list_domains()):
        print(name)


def cmd_alias_add(args: argparse.Namespace) -> None:
    _with_store(args, lambda s: s.add_alias(args.source, args.target))
    print(f"added alias {args.source.lower()} -> {args.target.lower()}")


def cmd_alias_list(args: argparse.Namespace) -> None:
    for source, target in _with_store(args, lambda s: s.list_aliases()):
        print(f"{source}\t{target}")


def cmd_alias_del(args: argparse.Namespace) -> None:
    n = _with_store(args, lambda s: s.delete_alias(args.source, args.target))
    if n == 0:
        raise CliError(f"no alias {args.source}")
    print(f"deleted {n} alias entr{'y' if n == 1 else 'ies'}")


def cmd_user_add(args: argparse.Namespace) -> None:
    address = args.address.strip().lower()
    password_hash = _hash_new_password(args, address)
    _with_store(args, lambda s: s.add_account(address, password_hash))
    print(f"added user {address}")


def cmd_user_del(args: argparse.Namespace) -> None:
    _with_store(args, lambda s: s.delete_account(args.address))
    print(f"deleted user {args.address.lower()}")


def cmd_user_unhold(args: argparse.Namespace) -> None:
    address = args.address.strip().lower()

    async def unhold(store: SqlStore) -> tuple[bool, int]:
        if await store.get_account(address) is None:
            raise CliError(f"no such user {address}")
        was_held = await store.unhold_account(address)
        released = await store.release_held_from(sorted(await store.sender_addresses(address)))
        return was_held, released

    was_held, released = _with_store(args, unhold)
    if not was_held and not released:
        raise CliError(f"{address} is not on hold")
    print(f"{address}: hold lifted; {released} held recipient(s) released for delivery")


def cmd_user_list(args: argparse.Namespace) -> None:
    if not args.quota:
        for address in _with_store(args, lambda s: s.list_accounts()):
            print(address)
        return
    default = _default_quota(args)
    print("ADDRESS\tUSED\tQUOTA\tFROM")
    for state in _with_store(args, lambda s: s.quota_report()):
        print(f"{state.address}\t{state.used}\t{_quota_text(state.limit(default))}\t{state.source()}")


# ---- storage quotas (storage/quota.py) ----------------------------------


def _default_quota(args: argparse.Namespace) -> int:
    return parse_size(_load_config(_paths(args)).get("accounts.default_quota"))


def _quota_text(limit: int) -> str:
    return format_size(limit) if limit else "unlimited"


def _size_arg(text: str) -> int | None:
    """A quota typed on the command line; None for "default" (remove the override)."""
    if text.strip().lower() == "default":
        return None
    try:
        return parse_size(text)
    except SizeError as exc:
        raise CliError(str(exc)) from None


def _quota_state(args: argparse.Namespace, address: str) -> QuotaState:
    state = _with_store(args, lambda s: s.quota_states([address])).get(address)
    if state is None:
        raise CliError(f"no such user {address}")
    return state


def cmd_user_show(args: argparse.Namespace) -> None:
    address = args.address.strip().lower()
    state = _quota_state(args, address)
    limit = state.limit(_default_quota(args))
    held = _with_store(args, lambda s: s.account_hold(address))
    print(f"address: {address}")
    share = f" ({100 * state.used / limit:.1f}%)" if limit else ""
    print(f"storage used: {state.used} bytes, {human_size(state.used)}{share}")
    print(f"storage quota: {_quota_text(limit)} (from {state.source()})")
    print(f"on hold: {held}" if held else "on hold: no")


def cmd_user_quota(args: argparse.Namespace) -> None:
    address = args.address.strip().lower()
    if args.size is not None:
        _with_store(args, lambda s: s.set_user_quota(address, _size_arg(args.size)))
    state = _quota_state(args, address)
    limit = state.limit(_default_quota(args))
    print(f"{address}: quota {_quota_text(limit)} (from {state.source()}), used {state.used} bytes")


def cmd_user_quota_recount(args: argparse.Namespace) -> None:
    address = args.address.strip().lower() if args.address else None
    for who, was, now in _with_store(args, lambda s: s.recount_usage(address)):
        print(f"{who}\t{now}" + (f"\t(was {was})" if was != now else ""))


def cmd_domain_quota(args: argparse.Namespace) -> None:
    domain = args.domain.strip().lower().rstrip(".")
    if args.size is not None:
        _with_store(args, lambda s: s.set_domain_quota(domain, _size_arg(args.size)))
    quotas = _with_store(args, lambda s: s.domain_quotas())
    if domain not in quotas:
        raise CliError(f"{domain} is not a hosted domain")
    limit = quotas[domain]
    if limit is None:
        print(f"{domain}: accounts.default_quota ({_quota_text(_default_quota(args))}) for accounts without their own")
    else:
        print(f"{domain}: {_quota_text(limit)} for accounts without their own")


def cmd_user_passwd(args: argparse.Namespace) -> None:
    address = args.address.strip().lower()
    if _with_store(args, lambda s: s.get_account(address)) is None:
        raise CliError(f"no such user {address}")
    password_hash = _hash_new_password(args, address)
    _with_store(args, lambda s: s.set_password(address, password_hash))
    print(f"password changed for {address}")


def cmd_app_password_add(args: argparse.Namespace) -> None:
    address = args.address.strip().lower()
    cfg = _load_config(_paths(args))
    password = app_passwords.generate()
    password_hash = make_hashing(cfg).hash_sync(app_passwords.normalize(password) or "")
    _with_store(args, lambda s: s.add_app_password(address, args.name, password_hash, app_passwords.APP_PASSWORD_MAX))
    print(f"app password {args.name.strip()!r} for {address} (shown only this once):")
    print(password)


def cmd_app_password_list(args: argparse.Namespace) -> None:
    address = args.address.strip().lower()
    print("NAME\tCREATED\tLAST-USED")
    for info in _with_store(args, lambda s: s.list_app_passwords(address)):
        last = _fmt_time(info.last_used) if info.last_used is not None else "never"
        print(f"{info.name}\t{_fmt_time(info.created)}\t{last}")


def cmd_app_password_revoke(args: argparse.Namespace) -> None:
    address = args.address.strip().lower()
    if not _with_store(args, lambda s: s.revoke_app_password(address, args.name)):
        raise CliError(f"{address} has no app password named {args.name.strip()!r}")
    print(f"revoked app password {args.name.strip()!r} of {address}")


def cmd_mailbox_ls(args: argparse.Namespace) -> None:
    messages = _with_store(args, lambda s: s.list_messages(args.address, args.folder))
    print("UID\tDATE\tFROM\tSUBJECT")
    for m in messages:
        print(f"{m.uid}\t{_fmt_time(m.internal_date)}\t{m.from_}\t{m.subject}")


def cmd_mailbox_cat(args: argparse.Namespace) -> None:
    _write_bytes(_with_store(args, lambda s: s.read_message(args.address, args.folder, args.uid)))


def cmd_queue_list(args: argparse.Namespace) -> None:
    entries = _with_store(args, lambda s: s.list_queue())
    print("QUEUE-ID\tCREATED\tSTATUS\tATTEMPTS\tSENDER\tRECIPIENT")
    for e in entries:
        print(f"{e.queue_id}\t{_fmt_time(e.created)}\t{e.status}\t{e.attempts}\t{e.sender or '<>'}\t{e.recipient}")


def cmd_queue_show(args: argparse.Namespace) -> None:
    qid = args.queue_id.upper()

    async def fetch(store: SqlStore) -> tuple[list[Any], bytes]:
        entries = [e for e in await store.list_queue() if e.queue_id == qid]
        return entries, await store.read_blob(entries[0].blob) if entries else b""

    entries, data = _with_store(args, fetch)
    if not entries:
        raise CliError(f"no queued message {args.queue_id}")
    first = entries[0]
    print(f"Queue-ID: {first.queue_id}")
    print(f"Sender: <{first.sender}>")
    print(f"Size: {first.size}")
    print(f"Created: {_fmt_time(first.created)}")
    for e in entries:
        due = _fmt_time(e.next_attempt) if e.status == "queued" else "-"
        print(
            f"Recipient: <{e.recipient}> status={e.status} attempts={e.attempts} next_attempt={due!r}"
            f" last_error={e.last_error!r}"
        )
    print()
    _write_bytes(data)


def cmd_queue_delete(args: argparse.Namespace) -> None:
    n = _with_store(args, lambda s: s.delete_queued(args.queue_id.upper()))
    if n == 0:
        raise CliError(f"no queued message {args.queue_id}")
    print(f"deleted {args.queue_id.upper()} ({n} recipient{'s' if n != 1 else ''})")


def _wake_queue_runner(args: argparse.Namespace) -> None:
    """Touch the wake file a running server's queue runners look at every second."""
    wake = queue_wake_file(_paths(args))
    wake.parent.mkdir(parents=True, exist_ok=True)
    wake.touch()  # updates the mtime of an existing file too


def cmd_queue_flush(args: argparse.Namespace) -> None:
    n = _with_store(args, lambda s: s.flush_queue(time.time()))
    _wake_queue_runner(args)
    print(f"{n} queued recipient{'s' if n != 1 else ''} due now")


def cmd_queue_hold(args: argparse.Namespace) -> None:
    qid = args.queue_id.upper()
    n = _with_store(args, lambda s: s.hold_queued(qid))
    if n == 0:
        raise CliError(f"no queued message {args.queue_id}")
    print(f"held {qid} ({n} recipient{'s' if n != 1 else ''})")


def cmd_queue_release(args: argparse.Namespace) -> None:
    qid = args.queue_id.upper()
    n = _with_store(args, lambda s: s.release_queued(qid, time.time()))
    if n == 0:
        raise CliError(f"no held message {args.queue_id}")
    _wake_queue_runner(args)
    print(f"released {qid} ({n} recipient{'s' if n != 1 else ''})")


async def _local_domains(paths: InstancePaths) -> tuple[list[str], list[str]]:
    """The hosted domains and the account addresses (for the lookalike and display-name rules)."""
    store = await open_store(paths)
    try:
        return await store.list_domains(), await store.list_accounts()
    finally:
        await store.close()


def cmd_inspect(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    from mailwarden.dns.resolver import Resolver
    from mailwarden.pipeline.inbound import InboundEnvelope, InboundPolicy, evaluate_message, evaluate_reputation
    from mailwarden.server import inbound_checks

    paths = _paths(args)
    cfg = config_mod.load(paths.config) if paths.config.exists() else config_mod.validate({}, paths.root)
    try:
        raw = Path(args.file).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror}") from None
    if raw.startswith(b"From ") and b"\n" in raw:
        raw = raw.split(b"\n", 1)[1]  # an mbox separator line is not part of the message
    message = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if args.dns:
        servers = [config_mod.parse_address("--dns", args.dns)]
    else:
        servers = [config_mod.parse_address("dns.servers", s) for s in cfg.get("dns.servers")] or None
    resolver = Resolver(servers, timeout=cfg.get("dns.timeout"))
    # A recipient that is an account gets its personal spam model (an unknown one simply has none).
    envelope = InboundEnvelope(args.ip, args.helo, args.mail_from, tuple(args.rcpt), tuple(args.rcpt))
    checks = inbound_checks(cfg)
    policy = checks.policy if checks else InboundPolicy(authserv_id=cfg.get("server.hostname"))
    if paths.database.exists():
        from mailwarden.pipeline.inbound import local_user_names

        domains, accounts = asyncio.run(_local_domains(paths))
        names = local_user_names(accounts, cfg.get("content.protected_names"))
        policy = dataclasses.replace(policy, local_domains=frozenset(domains), local_names=names)

    async def run() -> Any:
        from mailwarden.checks.spam.check import spam_check_from_config
        from mailwarden.pipeline.inbound import inbound_content_stage

        store = await open_store(paths) if paths.database.exists() else None
        try:
            content = inbound_content_stage(policy, resolver)
            if "spam" not in policy.disabled:
                content.add(spam_check_from_config(cfg, store))
            earlier = await evaluate_reputation(args.ip, args.helo, args.mail_from, policy, resolver)
            checked = message
            if not args.no_milters:
                checked, milter_results = await _inspect_milters(cfg, args, message)
                earlier += milter_results
            return await evaluate_message(checked, envelope, resolver, policy, earlier, content)
        finally:
            if store is not None:
                await store.close()

    verdict, _ = asyncio.run(run())
    if args.json:
        print(json.dumps(verdict.as_dict(), indent=2))
        return
    reply = verdict.smtp_reply()
    print(f"Verdict: {verdict.action.value} (score {verdict.score:g})" + (f" -> {reply.line()}" if reply else ""))
    for reason in verdict.reasons:
        print(f"  because {reason}")
    print("Checks:")
    for r in verdict.results:
        print(f"  {r.check:<6} {r.result:<10} {r.elapsed * 1000:7.1f} ms  {r.reason}")
        if r.check == "spam" and r.details.get("top_features"):
            top = ", ".join(f"{name} {weight:+g}" for name, weight in r.details["top_features"])
            print(f"         ({r.details['model']} model; strongest features: {top})")
    for name in verdict.stripped:
        print(f"Stripped attachment: {name}")
    if verdict.removed_forgeries:
        print(f"Removed {verdict.removed_forgeries} forged Authentication-Results claiming {policy.authserv_id}")
    print(verdict.header.decode("utf-8", "replace"), end="")


# ---- the quarantine (pipeline/quarantine.py) ---------------------------------


def cmd_quarantine_list(args: argparse.Namespace) -> None:
    entries = _with_store(args, lambda s: s.list_quarantine(None if args.all else "held", args.user))
    print("ID\tCREATED\tSTATE\tUSERS\tFROM\tSUBJECT\tREASON")
    for e in entries:
        print(
            f"{e.id}\t{_fmt_time(e.created)}\t{e.state}\t{','.join(e.users) or '-'}\t{_one_line(e.from_addr)}"
            f"\t{_one_line(e.subject)}\t{_one_line(e.reason)[:160]}"
        )


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() and c != "\t" else " " for c in text)


def cmd_quarantine_show(args: argparse.Namespace) -> None:
    import json

    async def fetch(store: SqlStore) -> tuple[Any, bytes]:
        entry = await store.get_quarantine(args.id)
        if entry is None:
            return None, b""
        return entry, await store.read_blob(entry.blob) if entry.state == "held" else b""

    entry, data = _with_store(args, fetch)
    if entry is None:
        raise CliError(f"no quarantined message {args.id}")
    print(f"ID: {entry.id}")
    print(f"Queue-ID: {entry.queue_id}")
    print(f"State: {entry.state}")
    print(f"Created: {_fmt_time(entry.created)}")
    print(f"Sender: <{entry.sender}>")
    for rcpt, account in entry.local:
        print(f"Recipient: <{rcpt}> account={account}")
    for rcpt in entry.remote:
        print(f"Recipient: <{rcpt}> (forward)")
    print(f"Reason: {_one_line(entry.reason)}")
    try:
        verdict = json.loads(entry.verdict) if entry.verdict else {}
    except ValueError:
        verdict = {}
    for check in verdict.get("checks", []):
        if check.get("action") != "none" or check.get("score"):
            print(f"Check: {check.get('check')}.{check.get('result')}: {_one_line(str(check.get('reason', '')))}")
    print()
    _write_bytes(data)


def cmd_quarantine_release(args: argparse.Namespace) -> None:
    from mailwarden.pipeline.quarantine import QuarantineError, release

    async def work(store: SqlStore) -> Any:
        try:
            return await release(store, args.id)
        except QuarantineError as exc:
            raise CliError(str(exc)) from None

    entry = _with_store(args, work)
    if entry.remote:
        _wake_queue_runner(args)
    print(f"released {args.id} to {', '.join(entry.users) or '-'}")


def cmd_quarantine_delete(args: argparse.Namespace) -> None:
    from mailwarden.pipeline.quarantine import QuarantineError, delete

    async def work(store: SqlStore) -> None:
        try:
            await delete(store, args.id)
        except QuarantineError as exc:
            raise CliError(str(exc)) from None

    _with_store(args, work)
    print(f"deleted {args.id}")


def cmd_quarantine_digest(args: argparse.Namespace) -> None:
    from mailwarden.pipeline.local_mail import deliver_local
    from mailwarden.pipeline.quarantine import offline_mail, send_digests

    paths = _paths(args)
    cfg = _load_config(paths)

    async def run() -> dict[str, int]:
        store = await open_store(paths)
        try:
            async with offline_mail(cfg, paths.spool, store) as services:

                async def deliver(user: str, message: bytes) -> bool:
                    return await deliver_local(services, user, message, "quarantine_digest")

                hostname = cfg.get("server.hostname")
                sender = f"postmaster@{cfg.get('server.primary_domain') or hostname}"
                return await send_digests(store, deliver, hostname, sender)
        finally:
            await store.close()

    sent = asyncio.run(run())
    for user, count in sorted(sent.items()):
        print(f"{user}\t{count}")
    print(f"digest sent to {len(sent)} user{'s' if len(sent) != 1 else ''}")


async def _inspect_milters(cfg: config_mod.Config, args: argparse.Namespace, message: bytes) -> tuple[bytes, list[Any]]:
    """The configured inbound milters, as the MX would run them (they are local services; --no-milters skips)."""
    from mailwarden.checks.milter import parse_specs
    from mailwarden.pipeline.milters import MilterContext, run_offline
    from mailwarden.storage.spool import new_queue_id

    specs = [s for s in parse_specs(cfg.get("milter.milters")) if s.applies("inbound")]
    if not specs:
        return message, []
    ctx = MilterContext(cfg.get("server.hostname"), "mx", args.ip, 0, args.helo, new_queue_id())
    return await run_offline(specs, ctx, args.mail_from, args.rcpt, message, cfg.get("smtp.max_message_size"))


# ---- the spam classifier (checks/spam) ----------------------------------------


def _spam_config(args: argparse.Namespace) -> tuple[InstancePaths, config_mod.Config]:
    """The instance's config, or the defaults when there is no instance (eval of the shipped model)."""
    paths = _paths(args)
    if paths.config.exists():
        return paths, config_mod.load(paths.config)
    return paths, config_mod.validate({}, paths.root)


def cmd_spam_train(args: argparse.Namespace) -> None:
    from mailwarden.checks.spam.check import SITE, spam_check_from_config
    from mailwarden.checks.spam.corpus import message_files, read_message
    from mailwarden.checks.spam.learner import learn_buckets
    from mailwarden.checks.spam.model import learn_one

    paths, cfg = _spam_config(args)
    _load_config(paths)  # training writes to an instance
    folder = Path(args.folder)
    if not folder.is_dir():
        raise CliError(f"{folder} is not a folder")
    files = list(message_files(folder))
    if not files:
        raise CliError(f"no message files under {folder}")
    user = args.user or SITE
    label = 1 if args.label == "spam" else 0

    async def work(store: SqlStore) -> tuple[int, int]:
        if user and await store.get_account(user) is None:
            raise CliError(f"no such account {user}")
        check = spam_check_from_config(cfg, store)
        delta = await store.spam_user_weights(user)
        touched: set[int] = set()
        moved = 0
        for path in files:
            buckets = learn_buckets(check.model, read_message(path), "", cfg.get("spam.max_scan_bytes"))
            if learn_one(check.model, buckets, label, delta):
                moved += 1
                touched.update(buckets)
        await store.spam_set_weights(user, {b: delta.get(b, 0.0) for b in touched})
        return moved, len(touched)

    moved, buckets = _with_store(args, work)
    who = f"{args.user}'s model" if args.user else "the site-wide model"
    print(f"trained {who} on {len(files)} messages as {args.label}: {moved} changed it ({buckets} weights)")


def cmd_spam_eval(args: argparse.Namespace) -> None:
    from mailwarden.checks.spam.check import spam_check_from_config
    from mailwarden.checks.spam.corpus import held_out, message_files, read_labels
    from mailwarden.checks.spam.evaluate import evaluate

    paths, cfg = _spam_config(args)
    folder = Path(args.folder)
    try:
        labelled = read_labels(Path(args.labels))
    except (OSError, ValueError, KeyError) as exc:
        raise CliError(f"cannot read labels {args.labels}: {exc}") from None
    by_path = {item.path.resolve(): item for item in labelled}
    by_name = {item.path.name: item for item in labelled}
    items, unlabelled = [], 0
    for path in message_files(folder):
        item = by_path.get(path.resolve()) or by_name.get(path.name)
        if item is None:
            unlabelled += 1
            continue
        if args.held_out and not held_out(path.name):
            continue
        items.append(type(item)(path, item.spam))
    if not items:
        raise CliError(f"no labelled message files under {folder}")

    async def run(store: SqlStore | None) -> Any:
        check = spam_check_from_config(cfg, store)
        return await evaluate(check, items, users=(args.user,) if args.user else ())

    if paths.database.exists():
        scores = _with_store(args, run)
    else:
        if args.user:
            raise CliError(f"no instance at {paths.root}: --user needs one")
        scores = asyncio.run(run(None))
    for line in scores.lines():
        print(line)
    if unlabelled:
        print(f"skipped       {unlabelled} files without a label")
    for error in scores.errors:
        print(f"error         {error}")


# ---- the connection guard (security/guard.py, security/bans.py) -------------


def _guard_network(args: argparse.Namespace, text: str) -> str:
    """The stored key of a ban: the address (or IPv6 network per guard.ipv6_prefix), or the CIDR given."""
    from mailwarden.security.bans import network_of

    cfg = _load_config(_paths(args))
    try:
        if "/" in text:
            return str(ipaddress.ip_network(text.strip(), strict=False))
        return str(network_of(text.strip(), cfg.get("guard.ipv6_prefix")))
    except ValueError:
        raise CliError(f"not an IP address or CIDR: {text!r}") from None


def cmd_ban_list(args: argparse.Namespace) -> None:
    from mailwarden.security.bans import show_network, utc_stamp

    now = time.time()
    rows = _with_store(args, lambda store: store.guard_active_bans(now))
    print("network\tuntil\treason\tevents")
    for row in sorted(rows, key=lambda r: r.until):
        print(f"{show_network(ipaddress.ip_network(row.network))}\t{utc_stamp(row.until)}\t{row.reason}\t{row.events}")


def cmd_ban_add(args: argparse.Namespace) -> None:
    from mailwarden.security.bans import parse_duration, show_network, utc_stamp

    network = _guard_network(args, args.ip)
    cfg = _load_config(_paths(args))
    try:
        seconds = parse_duration(args.duration) if args.duration else int(max(cfg.get("guard.ban_durations")))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    now = time.time()
    _with_store(args, lambda store: store.guard_ban_set(network, now + seconds, "cli", now))
    shown = show_network(ipaddress.ip_network(network))
    log_event("ban", ip=shown, scope="ip", reason="cli", events=0, duration=seconds, until=utc_stamp(now + seconds))
    print(f"banned {shown} until {utc_stamp(now + seconds)}")


def cmd_ban_remove(args: argparse.Namespace) -> None:
    from mailwarden.security.bans import show_network

    network = _guard_network(args, args.ip)
    if not _with_store(args, lambda store: store.guard_ban_remove(network)):
        raise CliError(f"no ban in force for {args.ip}")
    shown = show_network(ipaddress.ip_network(network))
    log_event("unban", ip=shown, reason="cli")
    print(f"unbanned {shown}")


def _guard_entry(text: str) -> str:
    from mailwarden.security.guard import normalize_entry

    try:
        return normalize_entry(text)
    except ValueError:
        raise CliError(f'not "CIDR" or "LISTENER:CIDR": {text!r}') from None


def cmd_guard_list(args: argparse.Namespace) -> None:
    cfg = _load_config(_paths(args))
    entries = _with_store(args, lambda store: store.guard_list_entries())
    for entry in cfg.get(f"guard.{args.kind}"):
        print(f"{entry}\tconfig")
    for kind, entry in entries:
        if kind == args.kind:
            print(f"{entry}\tcli")


def cmd_guard_add(args: argparse.Namespace) -> None:
    entry = _guard_entry(args.entry)
    if not _with_store(args, lambda store: store.guard_list_add(args.kind, entry, time.time())):
        raise CliError(f"{entry} is already on the {args.kind} list")
    print(f"{args.kind} {entry}")


def cmd_guard_remove(args: argparse.Namespace) -> None:
    entry = _guard_entry(args.entry)
    if not _with_store(args, lambda store: store.guard_list_remove(args.kind, entry)):
        raise CliError(f"{entry} is not on the {args.kind} list (entries in the config file are changed there)")
    print(f"removed {entry} from the {args.kind} list")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CliError, ConfigError, StorageError, PasswordPolicyError, TlsConfigError) as exc:
        print(f"mailwarden: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
