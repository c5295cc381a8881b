"""The worker's output relay (kernel/outputs.py): each message after the text written before it.

Each case runs in a child process, since the relay takes over descriptors 1 and 2; the
child's "channel" is a pipe of JSON lines back to the test.
"""

from __future__ import annotations

import json
import subprocess
import sys

PRELUDE = """
import json, os, subprocess, sys
from gpulane.kernel.outputs import OutputRelay
channel = os.dup(1)
def send(name, text):
    os.write(channel, (json.dumps([name, text]) + "\\n").encode())
relay = OutputRelay(send)
relay.start()
def message(what):
    with relay.ordered():
        send("message", what)
"""


def run(body: str) -> list[tuple[str, str]]:
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + body], capture_output=True, text=True, timeout=60
    )
    assert done.returncode in (0, 3), done.stderr
    return [tuple(json.loads(line)) for line in done.stdout.splitlines()]  # type: ignore[misc]


def between_messages(log: list[tuple[str, str]]) -> list[dict[str, str] | str]:
    """The text of each stream written between two messages, and the messages themselves."""
    result: list[dict[str, str] | str] = [{}]
    for name, text in log:
        if name == "message":
            result += [text, {}]
        else:
            segment = result[-1]
            assert isinstance(segment, dict)
            segment[name] = segment.get(name, "") + text
    return result


def test_each_message_follows_the_text_python_descriptors_and_subprocesses_wrote_before_it():
    log = run(
        "print('a', 'b', 'c')\n"
        "message('display')\n"
        "subprocess.run(['echo', 'sub'])\n"
        "os.write(2, b'fd two\\n')\n"
        "print('python')\n"
        "message('done')\n"
        "relay.close()\n"
    )
    assert between_messages(log) == [
        {"stdout": "a b c\n"},
        "display",
        {"stdout": "sub\npython\n", "stderr": "fd two\n"},
        "done",
        {},
    ]


def test_a_burst_of_writes_is_a_few_messages_and_nothing_is_lost():
    log = run("for i in range(100_000):\n    print(i)\nmessage('done')\n")
    streams = [text for name, text in log if name == "stdout"]
    assert "".join(streams) == "".join(f"{i}\n" for i in range(100_000))
    assert len(streams) < 2_000, len(streams)  # one per write would be 200,000
    assert log[-1] == ("message", "done")


def test_flushed_text_is_sent_before_flush_returns():
    log = run("print('going', flush=True)\nos._exit(3)\n")
    assert log == [("stdout", "going\n")]


def test_a_split_utf8_character_arrives_whole():
    log = run("os.write(1, 'é'.encode()[:1])\nos.write(1, 'é'.encode()[1:])\nmessage('done')\n")
    assert between_messages(log)[0] == {"stdout": "é"}


def test_close_ends_the_relay_thread_while_a_subprocess_still_holds_the_pipes():
    # A relay thread left running as the worker exits can be frozen by the interpreter's
    # finalization while it holds the relay's lock, and the exit's flush then waits forever.
    log = run(
        "import threading\n"
        "child = subprocess.Popen(['sleep', '30'])\n"  # holds the pipes' write ends
        "print('x', flush=True)\n"
        "relay.close()\n"
        "send('threads', ','.join(t.name for t in threading.enumerate()))\n"
        "child.kill()\n"
        "child.wait()\n"
    )
    assert log == [("stdout", "x\n"), ("threads", "MainThread")]


def test_a_flush_after_close_takes_no_lock():
    # At exit Python flushes sys.stdout; a daemon thread may hold the relay's lock then.
    log = run(
        "relay.close()\n"
        "relay._lock.acquire()\n"
        "import threading\n"
        "t = threading.Thread(target=lambda: (sys.stdout.flush(), send('flushed', '')), daemon=True)\n"
        "t.start()\n"
        "t.join(5)\n"
        "send('alive', str(t.is_alive()))\n"
    )
    assert log == [("flushed", ""), ("alive", "False")]
