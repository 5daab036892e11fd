"""``python -m fcgi_toolkit``: the same entry point as the console script."""
import sys

from fcgi_toolkit.cli import main

sys.exit(main())
