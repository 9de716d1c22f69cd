"""``python -m bt_pipeline.infer SCAN_DIR ...``: the same as ``bt infer`` (README names it)."""

import sys

from bt_pipeline.cli import run_command


def main(argv: list[str] | None = None) -> int:
    return run_command("infer", sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
