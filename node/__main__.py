import sys

from aquila.node.cli import main

sys.exit(main())
