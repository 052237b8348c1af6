"""Flex Template entry point: the launcher calls this with the template's parameters as flags
(``--config=gs://... --input=gs://... --output=gs://...`` and Beam's own); it submits the job
and returns without waiting (``--detach``), as a launcher must."""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "--detach", *sys.argv[1:]]))
