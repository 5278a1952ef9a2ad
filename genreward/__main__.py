import sys

from genreward.cli import main

sys.exit(main())
