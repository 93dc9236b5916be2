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
import threading
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
            # Answers are drained by a thread of their own: a claim naming 800 interfaces is
            # answered with more bytes than it has, and a caller that reads less than it is sent
            # is (rightly) closed by the agent (--max-queued-answers). The socket blocks (a
            # timeout inside sendall would leave half a line, read as another claim); the deadline
            # shuts it down, which ends both the send and the recv.
            ended_by_us = threading.Event()
            ended_by_agent = threading.Event()

            def end() -> None:
                ended_by_us.set()
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def drain() -> None:
                try:
                    while s.recv(1 << 20):
                        pass
                except OSError:
                    pass
                if not ended_by_us.is_set():
                    ended_by_agent.set()

            s.settimeout(None)
            timer = threading.Timer(max(0.0, deadline - time.monotonic()), end)
            reader = threading.Thread(target=drain, daemon=True)
            timer.start()
            reader.start()
            line = arg.encode() + b"\n"
            while not ended_by_us.is_set() and not ended_by_agent.is_set():
                try:
                    s.sendall(line)
                    out["sent"] += len(line)
                except OSError:
                    if not ended_by_us.is_set():
                        ended_by_agent.set()
            timer.cancel()
            end()
            reader.join()
            out["closed"] = ended_by_agent.is_set()
        else:
            raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
