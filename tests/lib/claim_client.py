"""A client of the agent's socket run as a process of its own (`ip netns exec <pod> python3
claim_client.py ...`), so that the agent reads the caller's network namespace from this
process: a thread of pytest that entered a namespace with setns(2) is reported by the kernel
with pytest's pid, whose namespace is the host's.

Prints one JSON object on stdout: {"answers": [...], "closed": bool, "sent": bytes accepted}.

    claim_client.py SOCKET claim JSON_LINE      send one line, read until a final answer
    claim_client.py SOCKET flood BYTES          send BYTES of 'x' without a newline, then read
    claim_client.py SOCKET repeat JSON_LINE     send the line again and again until TIMEOUT
                                                (answers are read and dropped as they come)
"""

from __future__ import annotations

import json
import socket
import sys
import time


def final(answer: dict) -> bool:
    """A status whose addresses are all past `pending`, or any answer that is not a status."""
    if answer.get("type") != "status":
        return True
    return all(a.get("state") != "pending" for a in answer.get("addresses", []))


def read_answers(s: socket.socket, deadline: float) -> tuple[list[dict], bool]:
    answers: list[dict] = []
    buf = b""
    while time.monotonic() < deadline:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        except OSError:
            return answers, True
        if not chunk:
            return answers, True
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            answer = json.loads(line)
            answers.append(answer)
            if answer.get("type") == "error":
                # An error may come with the end of the connection: wait a little for it.
                deadline = min(deadline, time.monotonic() + 3)
            elif final(answer):
                return answers, False
    return answers, False


def main() -> None:
    path, mode, arg = sys.argv[1], sys.argv[2], sys.argv[3]
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 30.0
    out: dict = {"answers": [], "closed": False, "sent": 0}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        deadline = time.monotonic() + timeout
        if mode == "claim":
            try:
                s.sendall(arg.encode() + b"\n")
                out["sent"] = len(arg) + 1
            except OSError:
                pass  # refused at connect: what the agent wrote before closing is still readable
            out["answers"], out["closed"] = read_answers(s, deadline)
        elif mode == "flood":
            total, chunk = int(arg), b"x" * 65536
            s.settimeout(timeout)
            try:
                while out["sent"] < total:
                    out["sent"] += s.send(chunk[: total - out["sent"]])
            except OSError:
                out["closed"] = True  # EPIPE / ECONNRESET: the agent cut the connection off
            if not out["closed"]:
                out["answers"], out["closed"] = read_answers(s, time.monotonic() + 5)
        elif mode == "repeat":
            line = arg.encode() + b"\n"
            s.settimeout(0.05)
            while time.monotonic() < deadline:
                try:
                    out["sent"] += s.send(line)
                except socket.timeout:
                    pass  # the agent reads the next claim once it took this one
                except OSError:
                    out["closed"] = True
                    break
                try:
                    if not s.recv(65536):
                        out["closed"] = True
                        break
                except socket.timeout:
                    pass
                except OSError:
                    out["closed"] = True
                    break
        else:
            raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
