"""Strip-and-notify: remove offending attachments, say so in their place, deliver the rest.

With `content.attachment_action = "strip"`, each MIME part the attachment
rules named (checks/rules.py puts the part indexes of the one bounded walk,
checks/mime_walk.py, in its results) is replaced by a short text/plain part
naming the file and the reason. The rest of the message is kept as it was
parsed; the message is then re-serialised with CRLF line ends. Any DKIM
signature over the body no longer verifies, which is expected: we changed
the body, and our own Authentication-Results above it records what was seen.
"""

from __future__ import annotations

import email.generator
import email.policy
import io
from collections.abc import Mapping

from mailwarden.checks.mime_walk import PARSE_ERRORS, walk

NOTICE_HEADER = "X-Mailwarden-Stripped"


def strip_parts(message: bytes, reasons: Mapping[int, str]) -> tuple[bytes, list[str]]:
    """The message with the parts at `reasons`' indexes replaced by notices, and the names removed.

    When the message cannot be rebuilt (the parser raises), it is returned
    unchanged with no names: the caller must then treat the parts as not
    removed (pipeline/inbound.py quarantines instead).
    """
    mime = walk(message)
    if mime.root is None or mime.unreadable:
        return message, []
    removed: list[str] = []
    try:
        for part in mime.parts:
            why = reasons.get(part.index)
            if why is None or part.message is None:
                continue
            name = part.filename or part.content_type
            msg = part.message
            for header in ("Content-Type", "Content-Disposition", "Content-Transfer-Encoding", "Content-ID"):
                del msg[header]
            msg["Content-Type"] = 'text/plain; charset="us-ascii"'
            msg["Content-Transfer-Encoding"] = "7bit"
            msg["Content-Disposition"] = "inline"
            text = (
                f"The attachment {_safe(name)} was removed by the mail server before delivery.\r\n"
                f"Reason: {_safe(why)}\r\n"
                "Ask the sender to share the file another way if you expected it.\r\n"
            )
            msg.set_payload(text)
            removed.append(name)
        if not removed:
            return message, []
        root = mime.root
        root[NOTICE_HEADER] = ", ".join(_safe(n) for n in removed)[:900]
        out = io.BytesIO()
        gen = email.generator.BytesGenerator(
            out, mangle_from_=False, maxheaderlen=0, policy=email.policy.compat32.clone(linesep="\r\n")
        )
        gen.flatten(root)
    except PARSE_ERRORS:
        return message, []
    return out.getvalue(), removed


def _safe(text: str) -> str:
    """ASCII only: the notice is 7bit text whatever the file name was."""
    return "".join(c if c.isprintable() and c.isascii() else "?" for c in str(text))[:200]
