"""What several test folders share: the repository's root, media the tests make, the command
run as a process, and the server they talk to."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
