"""``python -m repfuse``: the ``repfuse`` command line."""

from repfuse.cli import main

if __name__ == "__main__":
    main(prog_name="repfuse")
