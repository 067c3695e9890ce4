"""chat.py: a piped session and one through a pseudo-terminal; each streamed reply is the reply
evaluate.Doctor gives the same conversation, `clear` forgets the history, `quit` leaves."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from evaluate import Doctor
from model import CONFIGS, Transformer
from pretrained import save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_file):
    out = tmp_path_factory.mktemp("chat") / "m"
    save_model(Transformer.from_config(CONFIGS["tiny"], seed=5), out, tokenizer=tokenizer_file)
    return out


def expected_replies(model_dir):
    doctor = Doctor(
        model_dir, max_new_tokens=10, temperature=0, top_p=0.9, repetition_penalty=1.1
    )  # chat.py's defaults
    first = [{"role": "user", "content": "头痛"}]
    r1 = doctor.reply([first])[0]
    r2 = doctor.reply([first + [{"role": "assistant", "content": r1}, {"role": "user", "content": "还有发烧"}]])[0]
    return r1, r2


COMMAND = ["--temperature", "0", "--max-new-tokens", "10"]


def test_a_piped_session_keeps_history_until_cleared(model_dir):
    r1, r2 = expected_replies(model_dir)
    assert r1 != r2
    proc = subprocess.run(
        [sys.executable, str(ROOT / "chat.py"), "--model", str(model_dir), *COMMAND],
        input="头痛\n还有发烧\n\nclear\n头痛\nquit\n忽略\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    replies = [line.split("<HuatuoGPT>：", 1)[1] for line in proc.stdout.split("\n") if "<HuatuoGPT>：" in line]
    assert replies == [r1, r2, r1]  # after `clear` the first question gets the first answer again
    assert "(a new consultation)" in proc.stdout
    # End of input leaves as `quit` does.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "chat.py"), "--model", str(model_dir), *COMMAND],
        input="头痛\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.count("<HuatuoGPT>：") == 1


def test_a_terminal_session(model_dir):
    r1, _ = expected_replies(model_dir)
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "chat.py"), "--model", str(model_dir), *COMMAND],
        stdin=child,
        stdout=child,
        stderr=child,
        close_fds=True,
    )
    os.close(child)
    seen = b""

    def read_until(marker: bytes, timeout=60):
        nonlocal seen
        end = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < end:
            try:
                seen += os.read(main, 4096)
            except OSError:
                break
        assert marker in seen, seen.decode(errors="replace")

    try:
        read_until("<病人>：".encode())
        os.write(main, "头痛\n".encode())
        read_until(("<HuatuoGPT>：" + r1).encode())
        os.write(main, b"quit\n")
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        os.close(main)


def test_bytes_that_are_not_utf8_and_a_reader_that_leaves_end_nothing(model_dir):
    """Issue 24: non-UTF-8 bytes on stdin crashed the chat and lost the conversation, and
    `chat.py | head` ended in a BrokenPipe traceback."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "chat.py"), "--model", str(model_dir), *COMMAND],
        input="头痛\n".encode() + b"\xff\xfe\n" + "还有发烧\n".encode(),
        capture_output=True,
        timeout=120,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr.decode(), proc.stderr.decode()
    assert "(part of that line was not UTF-8 text" in out
    assert out.count("<HuatuoGPT>：") == 3  # the conversation went on after the bad line
    pipeline = subprocess.run(
        f"{sys.executable} {ROOT / 'chat.py'} --model {model_dir} {' '.join(COMMAND)} | head -c 20",
        shell=True,
        input="头痛\n头痛\n头痛\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pipeline.returncode == 0 and "Traceback" not in pipeline.stderr and "BrokenPipe" not in pipeline.stderr, (
        pipeline.stderr
    )


def test_ctrl_d_typed_during_a_reply_ends_the_session_after_it(model_dir):
    """Issue 24: in a terminal, Ctrl-D typed while a reply streamed was lost: the terminal's
    line discipline turns it into an end of file for a read that readline, switching to raw mode
    for the next prompt, never makes; the session waited for a second Ctrl-D. A long reply (200
    greedy tokens of a random model, no eos) leaves the Ctrl-D time to arrive during it."""
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "chat.py"),
            "--model",
            str(model_dir),
            "--temperature",
            "0",
            "--max-new-tokens",
            "200",
        ],
        stdin=child,
        stdout=child,
        stderr=child,
        close_fds=True,
    )
    os.close(child)
    seen = b""
    try:
        while "<病人>：".encode() not in seen:
            seen += os.read(main, 4096)
        os.write(main, "头痛\n".encode())
        while "<HuatuoGPT>：".encode() not in seen:
            seen += os.read(main, 4096)
        os.write(main, b"\x04")  # Ctrl-D, while the reply streams
        # Wait for the reply's end, however long a loaded machine takes: the session ends, or the
        # next prompt shows (then the Ctrl-D must end it). The bound only stops a hang.
        end = time.monotonic() + 600
        while proc.poll() is None and seen.count("<病人>：".encode()) < 2 and time.monotonic() < end:
            if select.select([main], [], [], 0.2)[0]:
                try:
                    seen += os.read(main, 4096)
                except OSError:
                    break
        assert proc.wait(30) == 0, seen.decode(errors="replace")[-500:]
        assert seen.count("<病人>：".encode()) <= 2  # at most the next prompt, shown once
    except subprocess.TimeoutExpired:
        raise AssertionError(
            "the session did not end after the reply: the Ctrl-D was lost\n" + seen.decode(errors="replace")[-300:]
        ) from None
    finally:
        proc.kill()
        os.close(main)
