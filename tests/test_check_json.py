"""resnet-parity check --json into streams: a FIFO or our own stdout gets one document, the final report."""

from __future__ import annotations

import json
import os
import threading

from parity.cli import main

# A check that would hang fails after this many seconds instead.
BOUND_S = 240.0
QUICK = ["check", "--arch", "resnet18", "--precision", "fp64", "--checks", "eval logits", "--size", "9", "11"]


def _bounded(fn, *args):
    """fn(*args) on a daemon thread; its result, or a failure when it has not returned within BOUND_S."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    t.join(BOUND_S)
    assert out, f"{fn.__name__}{args} did not return within {BOUND_S} s"
    return out[0]


def test_a_fifo_gets_the_final_report_once(tmp_path):
    fifo = tmp_path / "report"
    os.mkfifo(fifo)
    documents: list[bytes] = []

    def read_all() -> None:  # a reader that, like `cat`, reads until the writer closes, then opens again
        for _ in range(2):
            with open(fifo, "rb") as f:
                documents.append(f.read())

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    assert _bounded(main, [*QUICK, "--json", str(fifo)]) == 0
    reader.join(1.0)
    assert len(documents) == 1, "the FIFO was opened for more than one document"
    report = json.loads(documents[0])
    assert report["complete"] and report["passed"] and len(report["runs"]) == 1


def test_a_fifo_nobody_reads_is_a_sentence_not_a_wait(tmp_path, capsys):
    fifo = tmp_path / "report"
    os.mkfifo(fifo)
    assert _bounded(main, [*QUICK, "--json", str(fifo)]) == 2
    assert f"cannot write --json {fifo}" in capsys.readouterr().err


def test_dev_stdout_gets_one_document_after_the_table(capfd):
    assert main([*QUICK, "--json", "/dev/stdout"]) == 0
    out = capfd.readouterr().out
    assert out.count('"versions"') == 1
    start, end = out.index("{\n"), out.rindex("}\n") + 2
    report = json.loads(out[start:end])
    assert report["complete"] and report["passed"]
    assert "PASS" in out[:start] and out[end:] == "all checks pass\n"
