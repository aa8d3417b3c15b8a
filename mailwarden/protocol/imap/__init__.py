"""Sans-I/O IMAP4rev1: the command parser (parser.py), its events and values (commands.py), the response
formatter (formatter.py) and modified UTF-7 mailbox names (mailbox.py). docs/imap.md describes them."""

from mailwarden.protocol.imap.commands import (
    Bad,
    Command,
    ContinuationLine,
    Event,
    FetchAtt,
    IdleDone,
    NeedContinuation,
    SearchKey,
    Section,
    SequenceSet,
    StoreAction,
    TooBig,
)
from mailwarden.protocol.imap.mailbox import MailboxNameError, decode_mailbox_name, encode_mailbox_name
from mailwarden.protocol.imap.parser import CommandParser

__all__ = [
    "Bad",
    "Command",
    "CommandParser",
    "ContinuationLine",
    "Event",
    "FetchAtt",
    "IdleDone",
    "MailboxNameError",
    "NeedContinuation",
    "SearchKey",
    "Section",
    "SequenceSet",
    "StoreAction",
    "TooBig",
    "decode_mailbox_name",
    "encode_mailbox_name",
]
