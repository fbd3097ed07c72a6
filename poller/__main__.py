"""`python -m poller` is the `unleash-poller` command."""

import sys

from poller.cli import main

sys.exit(main())
