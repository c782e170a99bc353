"""A real SMTP server for the mail tests (aiosmtpd), driven by tests/support/smtp.rs.

    smtp_sink.py PORT DIR     listen on 127.0.0.1:PORT; write each message received to
                              DIR/<n>.json (n = 0, 1, ...); print READY once listening;
                              exit on SIGTERM or SIGINT.
    smtp_sink.py --parse EML  print the JSON of one RFC 5322 file (no envelope: from and
                              to come from its headers).

The JSON has: from, to (list), subject, text (the text/plain part), html (the text/html
part), raw (the message as received). Files appear atomically (written then renamed), so
a reader never sees half of one.
"""

import email
import email.policy
import json
import os
import signal
import sys
import tempfile
import threading

from aiosmtpd.controller import Controller


def parts(raw: bytes) -> dict:
    """Subject and decoded text and HTML parts (line ends as LF) of a message."""
    message = email.message_from_bytes(raw, policy=email.policy.default)

    def content(preference: str):
        part = message.get_body(preferencelist=(preference,))
        return part.get_content().replace("\r\n", "\n") if part is not None else ""

    return {
        "subject": str(message.get("subject", "")),
        "text": content("plain"),
        "html": content("html"),
        "content_type": message.get_content_type(),
        "raw": raw.decode("utf-8", errors="replace"),
    }


def write_atomically(directory: str, name: str, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        json.dump(data, file)
    os.replace(tmp, os.path.join(directory, name))


class Sink:
    def __init__(self, directory: str):
        self.directory = directory
        self.lock = threading.Lock()
        # Continue numbering after files already there, never overwriting one.
        self.count = sum(1 for name in os.listdir(directory) if name.endswith(".json"))

    async def handle_DATA(self, server, session, envelope):
        data = {"from": envelope.mail_from, "to": list(envelope.rcpt_tos)}
        data.update(parts(envelope.original_content or envelope.content))
        with self.lock:
            name = f"{self.count}.json"
            self.count += 1
        write_atomically(self.directory, name, data)
        return "250 Message accepted for delivery"


def serve(port: int, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    controller = Controller(Sink(directory), hostname="127.0.0.1", port=port)
    controller.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print("READY", flush=True)
    done.wait()
    controller.stop()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--parse":
        with open(sys.argv[2], "rb") as file:
            raw = file.read()
        message = email.message_from_bytes(raw, policy=email.policy.default)
        data = {"from": str(message.get("from", "")), "to": [str(message.get("to", ""))]}
        data.update(parts(raw))
        json.dump(data, sys.stdout)
    elif len(sys.argv) == 3:
        serve(int(sys.argv[1]), sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
