import sys

from alpc.cli import main

sys.exit(main())
