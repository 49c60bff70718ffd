import sys

from d2build.cli import main

sys.exit(main())
