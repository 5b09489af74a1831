"""Exports into a folder over and over until killed: the child process of test_folders' kill test.

``python export_worker.py CKPT_A CKPT_B LIKE``: for each folder path read on stdin, fork a child that exports
A, B, A, ... into it (``overwrite=True``) and print the child's pid; the test kills the child (SIGKILL) at a random
moment, and this process prints ``reaped`` once the child is gone. torch runs on one thread, so forking is safe.
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

import polyak


def main() -> None:
    torch.set_num_threads(1)
    checkpoints, like = sys.argv[1:3], sys.argv[3]
    me = os.getpid()
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                for i in itertools.count():
                    if os.getppid() != me:  # this worker is gone: stop instead of exporting forever
                        break
                    polyak.export_pretrained(checkpoints[i % 2], like, line.strip(), overwrite=True)
            finally:
                os._exit(1)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)


if __name__ == "__main__":
    main()
