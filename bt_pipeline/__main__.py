"""``python -m bt_pipeline COMMAND``: the ``bt`` command line."""

import sys

from bt_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
