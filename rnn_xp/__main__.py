"""``python -m rnn_xp``: the ``rnn-xp`` command; see `rnn_xp.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
