"""A real pseudo-terminal for the tests of what fsl_dist draws on a terminal (progress bars)."""

import fcntl
import os
import struct
import termios


class Terminal:
    """The writing end of a real pseudo-terminal as a text stream, and what reached it."""

    def __init__(self):
        self.leader, self.follower = os.openpty()
        # a new pty is 0 columns wide, and tqdm draws nothing in no width: 24 rows of 100
        fcntl.ioctl(self.follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.stream = os.fdopen(self.follower, "w", buffering=1)
        os.set_blocking(self.leader, False)

    def written(self) -> str:
        self.stream.flush()
        chunks = []
        try:
            while chunk := os.read(self.leader, 65536):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        return b"".join(chunks).decode(errors="replace")

    def close(self) -> None:
        self.stream.close()
        os.close(self.leader)
